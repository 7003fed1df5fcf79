"""Logging through the standard library, with the migration id on every record.

Each migration binds its id (and, on the receiver, the peer's key prefix) in a
:mod:`contextvars` variable with :func:`bind`; :class:`ContextFilter` copies it onto
every record logged from that task and the tasks it starts (contextvars are per task
under asyncio and trio alike). :func:`configure` installs one handler on the
``ctlive`` logger: human lines by default, or one JSON object per line
(``--log-format json``) with ``time``, ``level``, ``logger``, ``message``,
``migration_id`` (when known) and the record's fields (``peer``, ``phase``,
``reason``, ...).

Nothing secret is ever passed to a logger: no key material, identities, attestation
report bytes or frames; ``peer`` is the first 16 hex digits of a public key.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["FIELDS", "ContextFilter", "HumanFormatter", "JsonFormatter", "add_arguments",
           "bind", "bind_migration", "configure", "current_migration_id", "get_logger", "peer_name"]

FIELDS = ("migration_id", "peer", "phase", "reason", "outcome", "verdict", "state", "code",
          "seconds", "bytes", "iterations", "platform", "insecure")
"""The structured fields a ctlive record may carry (``extra=``), in output order."""

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "ctlive_log_context", default={})  # noqa: B039 (never mutated: replaced whole)


def peer_name(public_key: bytes) -> str:
    """How a peer appears in logs and metrics: its public key's first 16 hex digits."""
    return public_key.hex()[:16]


def current_migration_id() -> str | None:
    """The migration id bound in this task, if any."""
    return _context.get().get("migration_id")


@contextlib.contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Put ``fields`` (``migration_id``, ``peer``) on every record logged in this
    task (and the tasks it starts) until the block ends."""
    new = {**_context.get(), **{k: v for k, v in fields.items() if v}}
    token = _context.set(new)
    try:
        yield
    finally:
        _context.reset(token)


def bind_migration(migration_id: object) -> contextlib.AbstractContextManager[None]:
    """:func:`bind` a migration id a peer sent, if it is one (alphanumeric, at most 64
    characters: nothing else reaches a log line); else bind nothing."""
    ok = isinstance(migration_id, str) and migration_id.isalnum() and len(migration_id) <= 64
    return bind(migration_id=migration_id if ok else None)  # type: ignore[arg-type]


class ContextFilter(logging.Filter):
    """Adds the fields bound with :func:`bind` to each record (a record's own
    ``extra=`` fields win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops one."""
        for k, v in _context.get().items():
            if getattr(record, k, None) is None:
                setattr(record, k, v)
        return True


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with a :class:`ContextFilter`: its records carry the
    bound fields whichever handler (or test's capture) receives them."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, ContextFilter) for f in logger.filters):
        logger.addFilter(ContextFilter())
    return logger


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in FIELDS:
        v = getattr(record, k, None)
        if v is not None:
            out[k] = v if isinstance(v, bool | int | float) else str(v)
    return out


class HumanFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [MIGRATION] message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        """One line for people."""
        fields = _fields(record)
        mid = fields.pop("migration_id", None)
        t = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        head = f"{t} {record.levelname:<7} {record.name}" + (f" [{mid}]" if mid else "")
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        line = f"{head} {record.getMessage()}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, then the fields of :data:`FIELDS` the record carries."""

    def format(self, record: logging.LogRecord) -> str:
        """One line for machines."""
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        obj.update(_fields(record))
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(obj, separators=(",", ":"))


def configure(level: str | int = "INFO", fmt: str = "human",
              stream: IO[str] | None = None) -> logging.Handler:
    """Send the ``ctlive`` loggers' records at ``level`` or above to ``stream``
    (default stderr), as ``fmt`` ("human" or "json"); replaces a handler an earlier
    call installed. Returns the handler."""
    root = logging.getLogger("ctlive")
    for h in list(root.handlers):
        if getattr(h, "_ctlive", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(ContextFilter())
    handler._ctlive = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--log-level`` (for ``ctlive serve`` and ``migrate``)."""
    g = parser.add_argument_group("logging")
    g.add_argument("--log-format", choices=["human", "json"], default="human",
                   help="human lines (default) or one JSON object per line")
    g.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
