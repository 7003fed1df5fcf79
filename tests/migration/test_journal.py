"""The journal: durable state changes, history, and what counts as unfinished."""

from __future__ import annotations

import pathlib
import stat
import subprocess
import sys

import pytest

from ctlive.errors import StorageError
from ctlive.migration.journal import DestinationState, Journal, SourceState


def test_record_merges_data_and_keeps_history(tmp_path: pathlib.Path) -> None:
    j = Journal(tmp_path / "state", "source")
    j.record("m1", SourceState.STARTED, destination="h:1", workdir="/w")
    e = j.record("m1", SourceState.FROZEN, final_dump="/w/dump-2")
    assert e.state == "frozen" and e.data == {"destination": "h:1", "workdir": "/w",
                                               "final_dump": "/w/dump-2"}
    assert [s for _, s in j.history("m1")] == ["started", "frozen"]
    j.record("m2", SourceState.STARTED)
    j.record("m2", SourceState.COMMITTED)
    assert [e.migration_id for e in j.unfinished()] == ["m1"]
    assert [e.migration_id for e in j.entries()] == ["m1", "m2"]
    j.close()
    # The directory and the database are private whatever the umask.
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "journal.sqlite").stat().st_mode) == 0o600


def test_a_destination_commit_is_unfinished_until_resumed(tmp_path: pathlib.Path) -> None:
    j = Journal(tmp_path, "destination")
    j.record("m", DestinationState.COMMITTED)
    assert [e.migration_id for e in j.unfinished()] == ["m"]
    j.record("m", DestinationState.COMMITTED, resumed=True)
    assert j.unfinished() == []
    j.record("n", DestinationState.DISCARD_REQUESTED)
    assert [e.migration_id for e in j.in_state(DestinationState.DISCARD_REQUESTED)] == ["n"]


def test_a_record_survives_the_writer_being_killed(tmp_path: pathlib.Path) -> None:
    """Written means durable: a process that records and is SIGKILLed right after
    leaves the state readable by the next process."""
    code = ("import os, signal, sys; from ctlive.migration.journal import Journal; "
            "j = Journal(sys.argv[1], 'source'); j.record('m', 'decided-commit', x=1); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    e = Journal(tmp_path, "source").get("m")
    assert e is not None and e.state == "decided-commit" and e.data == {"x": 1}


def test_bad_journal_is_a_storage_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "journal.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError, match="journal"):
        Journal(tmp_path, "source").entries()
