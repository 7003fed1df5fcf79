"""The ``ctlive`` command line.

Each subsystem contributes its subcommands from its own ``ctlive.cli.<name>``
module, which defines ``register(subparsers)``. Each registered parser sets a
``func`` default that takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ctlive.cli import attest, demo, image, migrate, recover, serve
from ctlive.errors import CtliveError

__all__ = ["main"]

# Subcommand modules, in the order of ``ctlive --help``.
_MODULES = (image, attest, migrate, recover, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="ctlive", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _MODULES:
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctlive`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CtliveError as exc:
        print(f"ctlive: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
