"""Configuration files for the CLI: one mechanism for every command.

A TOML file holds one table per command (``[serve]``, ``[migrate]``, ...); its keys are
the command's long options with ``_`` for ``-`` (``max_sessions = 16`` for
``--max-sessions 16``). ``--config FILE`` loads the command's table; a flag given on the
command line overrides the file; the parser's defaults fill the rest. The file is checked
strictly against the parser itself, so every option is reachable from both and the rules
cannot drift: unknown tables and keys are errors, and a value of the wrong type names the
file, the key, what was expected and what was found. ``ctlive config check FILE`` checks
a file without running anything; ``ctlive config show`` prints the effective settings.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tomllib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from ctlive.errors import ConfigError

if TYPE_CHECKING:
    from attrs import AttrsInstance

__all__ = ["CONFIGURABLE", "apply", "check_address", "check_file", "from_options", "load",
           "register"]

CONFIGURABLE = ("migrate", "serve")
"""The commands a configuration file may have a table for."""
T = TypeVar("T", bound="AttrsInstance")
_SKIP = {"help", "config", "func", "command", "target", "destination"}


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    shown = json.dumps(value) if isinstance(value, str) else repr(value)
    return f"{shown} ({kind})"


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.dest not in _SKIP and a.option_strings and a.dest != argparse.SUPPRESS}


def _convert(action: argparse.Action, value: Any, label: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{label}: expected {expected}, found {_describe(value)}")

    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("an array of strings")
        return list(value)
    kind = action.type
    if callable(kind) and kind not in (int, float, str, pathlib.Path):
        # A parser of its own (a size such as "64G"): a string, or an integer as is.
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise bad("a string or an integer")
        try:
            return kind(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise bad(str(exc) or "a valid value") from None
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        value = float(value)
    elif not isinstance(value, str):
        raise bad("a string")
    elif kind is pathlib.Path:
        value = pathlib.Path(value).expanduser()
    if action.choices is not None and value not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return value


def load(path: str | pathlib.Path, command: str,
         parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ``[command]`` table of ``path``, checked against ``parser``'s options."""
    p = pathlib.Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot load config {p}: {exc}", cause=exc) from exc
    for table in data:
        if table not in CONFIGURABLE:
            raise ConfigError(f"{p}: [{table}]: unknown table (expected one of "
                              f"{', '.join(CONFIGURABLE)})")
        if not isinstance(data[table], dict):
            raise ConfigError(f"{p}: {table}: expected a table, found {_describe(data[table])}")
    actions = _actions(parser)
    out: dict[str, Any] = {}
    for key, value in data.get(command, {}).items():
        dest = key.replace("-", "_")
        label = f"{p}: [{command}] {key}"
        if dest not in actions:
            raise ConfigError(f"{label}: unknown key (the options of `ctlive {command}` are "
                              + ", ".join(sorted(actions)) + ")")
        out[dest] = _convert(actions[dest], value, label)
    return out


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The options that ``argv`` sets explicitly (whatever their defaults)."""
    saved = {a: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, d in saved.items():
            a.default = d
    return set(vars(ns))


def apply(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str],
          command: str, required: Sequence[str] = ()) -> argparse.Namespace:
    """Merge ``args.config``'s table into ``args`` (flags in ``argv`` win), then check that
    each ``required`` option came from one of them."""
    if getattr(args, "config", None) is not None:
        given = _given(parser, argv)
        for dest, value in load(args.config, command, parser).items():
            if dest not in given:
                setattr(args, dest, value)
    for dest in required:
        if getattr(args, dest, None) is None:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"ctlive {command}: {flag} is required (on the command line, or "
                              f"as {dest} in the [{command}] table of --config FILE)")
    return args


def check_address(flag: str, value: str | None) -> None:
    """ConfigError naming ``flag`` unless ``value`` (when given) is ``HOST:PORT``: checked
    before anything runs, as the file's types cannot."""
    if value is None:
        return
    from ctlive.ops.metrics import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


def from_options(cls: type[T], args: argparse.Namespace) -> T:
    """An attrs class built from the options of the same names (``ctlive migrate``'s
    convergence options for :class:`~ctlive.migration.convergence.Convergence`, ``ctlive
    serve``'s limits for :class:`~ctlive.migration.limits.ReceiverLimits`)."""
    return cls(**{f.name: getattr(args, f.name) for f in attrs.fields(cls)})


def check_file(path: str | pathlib.Path, parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Check every table of ``path``; ConfigError naming the first problem."""
    for command, parser in parsers.items():
        load(path, command, parser)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``ctlive config check FILE`` and ``ctlive config show [--config FILE]``."""
    c = sub.add_parser("config", help="check a configuration file, or show the settings",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = csub.add_parser("check", help="validate FILE without running anything")
    chk.add_argument("file", type=pathlib.Path)
    chk.set_defaults(func=lambda a: _check(a, parsers))
    show = csub.add_parser("show", help="the effective settings (defaults, then the file)")
    show.add_argument("--config", type=pathlib.Path)
    show.add_argument("only", nargs="?", choices=CONFIGURABLE)
    show.set_defaults(func=lambda a: _show(a, parsers))


def _check(args: argparse.Namespace, parsers: dict[str, argparse.ArgumentParser]) -> int:
    check_file(args.file, parsers)
    print(f"{args.file}: ok")
    return 0


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _show(args: argparse.Namespace, parsers: dict[str, argparse.ArgumentParser]) -> int:
    for command, parser in parsers.items():
        if args.only not in (None, command):
            continue
        values = {dest: a.default for dest, a in _actions(parser).items()}
        if args.config is not None:
            values.update(load(args.config, command, parser))
        print(f"[{command}]")
        for dest in sorted(values):
            v = values[dest]
            print(f"{dest} = {_toml_value(v)}" if v is not None else f"# {dest} = (unset)")
        print()
    return 0
