"""The durable journal of migrations, one per side, in SQLite.

A two-phase commit survives crashes only if each decision is on disk before it is acted
on. Every state change of a migration is one :meth:`Journal.record` call: an upsert of
the migration's row and an appended history event, in one transaction, with the
database in WAL mode and ``synchronous=FULL``, so that the change is durable when the
call returns. Then, and only then, does the caller act on it (kill the source copy,
resume the destination's).

The journal is synchronous, deliberately: it is small and each write is an fsync.
Callers on an event loop run it in a worker thread (:func:`arecord`).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import attrs

from ctlive.errors import StorageError
from ctlive.fs import private_dir

__all__ = [
    "DestinationState",
    "Entry",
    "Journal",
    "SourceState",
    "arecord",
]


class SourceState(enum.StrEnum):
    """A migration's states on the source, in order."""

    STARTED = "started"
    ATTESTED = "attested"
    ITERATING = "iterating"
    FROZEN = "frozen"
    """The final dump was taken: the workload is stopped (``data`` says how to resume or
    kill it, and where its final checkpoint is)."""
    FINAL_SENT = "final-sent"
    """The final iteration went out: the destination may reach READY from here on, so
    the source resumes only once the destination confirmed ABORT."""
    DECIDED_COMMIT = "decided-commit"
    """The decision to commit, written before the source copy is killed; from here on
    only COMMIT can finish the migration."""
    COMMITTED = "committed"
    ABORTED = "aborted"


class DestinationState(enum.StrEnum):
    """A migration's states on the destination."""

    RECEIVING = "receiving"
    READY = "ready"
    """Restored, stopped, READY sent: kept until COMMIT, ABORT, an outcome query that
    answers aborted, or an operator's discard."""
    COMMITTED = "committed"
    """COMMIT received (written before the copy is resumed)."""
    DISCARD_REQUESTED = "discard-requested"
    """An operator asked to discard a READY copy (``ctlive discard``)."""
    DISCARDED = "discarded"


_FINAL = {SourceState.COMMITTED, SourceState.ABORTED, DestinationState.DISCARDED}


@attrs.frozen
class Entry:
    """One migration's row."""

    migration_id: str
    role: str
    """``source`` or ``destination``."""
    state: str
    data: Mapping[str, Any]
    created: float
    updated: float

    @property
    def finished(self) -> bool:
        """Nothing is left to do for it (a committed destination entry counts as
        finished once its copy was resumed: ``data["resumed"]``)."""
        if self.role == "destination" and self.state == DestinationState.COMMITTED:
            return bool(self.data.get("resumed"))
        return self.state in _FINAL

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``ctlive status --json``."""
        return {"migration_id": self.migration_id, "role": self.role, "state": self.state,
                "created": self.created, "updated": self.updated, "data": dict(self.data)}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, role TEXT NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, state TEXT NOT NULL,
    detail TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS migrations_state ON migrations (state);
"""


class Journal:
    """A side's journal: ``journal.sqlite`` in ``state_dir`` (created 0700)."""

    def __init__(self, state_dir: Any, role: str) -> None:
        self.role = role
        root = private_dir(state_dir)
        self.path = root / "journal.sqlite"
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self.path.chmod(0o600)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the journal {self.path}: {exc}",
                               path=str(self.path), cause=exc) from exc

    def record(self, migration_id: str, state: str, **data: Any) -> Entry:
        """Write ``state`` (and merge ``data`` into the row's data) durably; returns the
        new row. Call it before acting on the state."""
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT data, created FROM migrations WHERE id = ?",
                                       (migration_id,)).fetchone()
                merged = {**(json.loads(row[0]) if row else {}), **data}
                created = row[1] if row else now
                self._db.execute(
                    "INSERT INTO migrations (id, role, state, data, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "state = excluded.state, data = excluded.data, updated = excluded.updated",
                    (migration_id, self.role, str(state), json.dumps(merged), created, now))
                self._db.execute("INSERT INTO events (id, state, detail, at) VALUES (?, ?, ?, ?)",
                                 (migration_id, str(state), json.dumps(data), now))
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError, TypeError, ValueError) as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StorageError(f"cannot write the journal {self.path}: {exc}",
                                   path=str(self.path), cause=exc) from exc
        return Entry(migration_id, self.role, str(state), merged, created, now)

    def get(self, migration_id: str) -> Entry | None:
        """The row of ``migration_id``, or None."""
        rows = self._select("WHERE id = ?", (migration_id,))
        return rows[0] if rows else None

    def entries(self) -> list[Entry]:
        """Every row, oldest first."""
        return self._select("", ())

    def in_state(self, state: str) -> list[Entry]:
        """Rows whose state is ``state`` (an indexed query, for polling)."""
        return self._select("WHERE state = ?", (str(state),))

    def unfinished(self) -> list[Entry]:
        """Rows with something left to do (see :attr:`Entry.finished`)."""
        return [e for e in self.entries() if not e.finished]

    def history(self, migration_id: str) -> list[tuple[float, str]]:
        """(time, state) of every change of ``migration_id``, in order."""
        with self._lock:
            return [(at, state) for at, state in self._db.execute(
                "SELECT at, state FROM events WHERE id = ? ORDER BY seq", (migration_id,))]

    def _select(self, where: str, args: tuple[Any, ...]) -> list[Entry]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, role, state, data, created, updated FROM migrations "
                    f"{where} ORDER BY created", args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the journal {self.path}: {exc}",
                                   path=str(self.path), cause=exc) from exc
        return [Entry(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


async def arecord(journal: Journal, migration_id: str, state: str, **data: Any) -> Entry:
    """:meth:`Journal.record` in a worker thread, shielded: once a decision is being
    written, a cancellation must not leave it half known."""
    with anyio.CancelScope(shield=True):
        entry = await anyio.to_thread.run_sync(
            lambda: journal.record(migration_id, state, **data))
    return entry
