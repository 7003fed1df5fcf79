"""The ``ctlive`` command line.

Each subsystem contributes its subcommands from its own ``ctlive.cli.<name>``
module, which defines ``register(subparsers)``. Each registered parser sets a
``func`` default that takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ctlive.cli import attest, config, demo, image, migrate, recover, serve
from ctlive.errors import (
    AttestationError,
    ConfigError,
    CtliveError,
    InDoubtError,
    MigrationError,
    Phase,
)

__all__ = ["EXIT_CODES", "exit_code", "main"]

EXIT_CODES = {
    0: "success (for migrate: the workload runs at the destination)",
    1: "another ctlive error",
    2: "a usage or configuration error (nothing was started)",
    3: "the destination's attestation was refused (no image byte left the source)",
    4: "in doubt: the outcome needs `ctlive recover` (the workload is stopped, or "
       "COMMIT is unconfirmed)",
    5: "the migration failed and the source workload runs again",
    6: "the preflight refused the migration (migrate, migrate --check): the destination "
       "cannot restore the workload; no image byte left, the workload runs on",
}
"""The ``ctlive`` command's exit codes, which scripts can rely on."""


def exit_code(exc: CtliveError) -> int:
    """The exit code for a ctlive error (see :data:`EXIT_CODES`)."""
    if isinstance(exc, InDoubtError):
        return 4
    if isinstance(exc, AttestationError) or isinstance(exc.cause, AttestationError):
        return 3
    if isinstance(exc, MigrationError):
        return 6 if exc.phase == Phase.PREFLIGHT else 5
    if isinstance(exc, ConfigError):
        return 2
    return 1

# Subcommand modules, in the order of ``ctlive --help``.
_MODULES = (image, attest, migrate, recover, serve, demo)


EXAMPLES = {
    "image": "ctlive image diff dump-0 dump-1 -o delta.bin\n"
             "ctlive image patch dump-0 delta.bin -o rebuilt",
    "attest": "ctlive attest verify report.bin --vcek vcek.der --chain ask_ark.pem "
              "--policy policy.toml\nctlive attest report -o report.bin   (inside the guest)",
    "migrate": "",  # its own epilog
    "recover": "ctlive recover --key /etc/ctlive/source.key --policy policy.toml\n"
               "ctlive recover --key source.key --policy policy.toml --json "
               "--state /var/lib/ctlive",
    "status": "ctlive status\nctlive status --state /run/ctlive --all --json",
    "discard": "ctlive discard 3f2a9c... --state /run/ctlive",
    "keygen": "ctlive keygen -o /etc/ctlive/receiver.key\n"
              "ctlive keygen -o source.key --force   (replaces the old key)",
    "serve": "ctlive serve --key receiver.key --allow sources.txt --state /run/ctlive\n"
             "ctlive serve --config /etc/ctlive/serve.toml --metrics 127.0.0.1:9788 "
             "--log-format json\n"
             "ctlive serve --listen 127.0.0.1:0 --key k --allow a --provider simulated "
             "--simulated-chain chain.pem   (INSECURE)",
    "config": "ctlive config check /etc/ctlive/ctlive.toml\n"
              "ctlive config show --config /etc/ctlive/ctlive.toml serve",
    "demo": "ctlive demo\nctlive demo --mib 64 --lanes 2 --json",
    "bench": "ctlive bench --quick\nctlive bench --write --repeat 3",
}
"""An example or two for every command's ``--help``."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    from ctlive import __version__

    parser = argparse.ArgumentParser(
        prog="ctlive", description=__doc__.splitlines()[0],
        epilog="exit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ctlive {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _MODULES:
        mod.register(sub)
    config.register(sub, {name: sub.choices[name] for name in config.CONFIGURABLE})
    for name, text in EXAMPLES.items():
        p = sub.choices[name]
        if text:
            p.epilog = "examples:\n" + "\n".join("  " + ln for ln in text.splitlines())
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    for p in sub.choices.values():
        _show_defaults(p)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's --help states its default (named knobs with documented defaults)."""
    for a in parser._actions:
        if (a.option_strings and a.help != argparse.SUPPRESS
                and a.default not in (None, False, [], argparse.SUPPRESS)
                and "%(default)" not in (a.help or "") and "default" not in (a.help or "")):
            a.help = f"{a.help} (default: %(default)s)" if a.help else "default: %(default)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctlive`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The command's own arguments, for ``ctlive.cli.config.apply`` (flags beat the file).
    args.argv = argv[argv.index(args.command) + 1:] if args.command in argv else []
    try:
        return int(args.func(args))
    except CtliveError as exc:
        print(f"ctlive: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
