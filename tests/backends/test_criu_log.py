"""CriuError messages lead with the CRIU log line that matters, not with the non-fatal
rlimit line that opens nearly every CRIU log."""

from __future__ import annotations

import pathlib
import stat

import pytest

from ctlive.backends import criu
from ctlive.backends.criu import Criu, summarize_log
from ctlive.errors import CriuError, Phase

RLIMIT = ("(00.030910) Error (criu/util.c:1532): rlimit: Can't setup RLIMIT_NOFILE for self: "
          "Operation not permitted")

# Shaped like a real `criu dump -t 999999 -v4` log (CRIU 4.3), cut down.
DUMP_LOG = f"""\
(00.000000) CRIU run id = 55aa7808-9823-47a6-93ae-15629247452d
(00.000054) Version: 4.3 (gitid 0)
(00.030870) files stat: fs/nr_open 1048576
(00.030887) ========================================
(00.030901) Warn  (criu/seize.c:63): Failed to open /proc/999999/comm: No such file or directory
(00.030903) Dumping processes (pid: 999999 comm: )
(00.030904) ========================================
{RLIMIT}
(00.030915) Running pre-dump scripts
(00.031468) Detected cgroup V1 freezer
(00.031472) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 999999 (No such process)
(00.031478) net: Unlock network
(00.031484) Error (compel/src/lib/infect.c:426): Unable to detach from 999999: No such process
(00.031490) Error (criu/cr-dump.c:2005): Dumping FAILED.
"""

RESTORE_LOG = f"""\
(00.045800) Version: 4.3 (gitid 0)
{RLIMIT.replace("00.030910", "00.045824")}
(00.045846) Error (criu/protobuf.c:72): Unexpected EOF on (empty-image)
(00.045900) Error (criu/cr-restore.c:2400): Restoring FAILED.
"""


def test_the_rlimit_line_is_not_the_summary() -> None:
    assert DUMP_LOG.splitlines()[7] == RLIMIT  # the first line marked as an error
    assert summarize_log(DUMP_LOG) == (
        "Error (compel/src/lib/infect.c:426): Unable to detach from 999999: No such process")
    assert summarize_log(RESTORE_LOG) == (
        "Error (criu/protobuf.c:72): Unexpected EOF on (empty-image)")


def test_the_rlimit_line_first_with_nothing_else() -> None:
    assert summarize_log(RLIMIT + "\n") == ""
    assert summarize_log(RLIMIT + "\n(00.1) Error (criu/cr-dump.c:2005): Dumping FAILED.\n") == (
        "Error (criu/cr-dump.c:2005): Dumping FAILED.")  # better than nothing


def test_the_first_real_error_wins_and_warnings_are_not_errors() -> None:
    log = (f"{RLIMIT}\n"
           "(00.2) Warn  (criu/x.c:1): only a warning\n"
           "(00.3) Error (criu/mem.c:10): first real error\n"
           "(00.4) Error (criu/mem.c:20): a consequence\n")
    assert summarize_log(log) == "Error (criu/mem.c:10): first real error"
    assert summarize_log("(00.2) Warn  (criu/x.c:1): only a warning\n") == ""
    assert summarize_log("") == ""
    # the restorer's lines carry "pie: PID: " before the mark; no timestamp also works
    assert summarize_log("pie: 7: Error (criu/pie/restorer.c:99): bad vma\n") == (
        "pie: 7: Error (criu/pie/restorer.c:99): bad vma")
    assert summarize_log("Error (criu/a.c:1): no timestamp\n") == (
        "Error (criu/a.c:1): no timestamp")
    # "Error" elsewhere in a line is not a mark
    assert summarize_log("(00.1) Errors found: none\n(00.1) tcp: Error in socket\n") == ""


def test_the_tail_keeps_every_marked_line() -> None:
    tail = criu._tail(DUMP_LOG)
    assert tail.splitlines() == [ln for ln in DUMP_LOG.splitlines()
                                 if "Error (" in ln or "Warn  (" in ln]
    assert criu._tail("a\nb\nc\n", lines=2) == "b\nc"  # nothing marked: the last lines


@pytest.fixture
def fake_criu(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A "criu" that writes DUMP_LOG to its -o file and fails."""
    (tmp_path / "log.txt").write_text(DUMP_LOG)
    script = tmp_path / "criu"
    script.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
                      f'cp {tmp_path / "log.txt"} "$2"\nexit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(criu, "find_criu", lambda: Criu(str(script), (4, 3), False))
    return tmp_path


@pytest.mark.anyio
async def test_criu_error_message_leads_with_the_real_error(fake_criu: pathlib.Path) -> None:
    work = fake_criu / "images"
    work.mkdir()
    with pytest.raises(CriuError) as info:
        await criu.run_criu(["dump", "-t", "999999"], workdir=work, log="dump.log",
                            phase=Phase.FINAL_DUMP)
    err = info.value
    first = str(err).splitlines()[0]
    assert first == (f"[final-dump] criu dump failed (exit 1): Error (compel/src/lib/infect.c"
                     f":426): Unable to detach from 999999: No such process "
                     f"(log: {work / 'dump.log'})")
    assert "rlimit" not in first
    assert RLIMIT in err.log_tail and "--- log tail ---" in str(err)  # still attached


@pytest.mark.anyio
async def test_criu_error_without_a_log(tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "criu"
    script.write_text("#!/bin/sh\necho 'criu: unknown option' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(criu, "find_criu", lambda: Criu(str(script), (4, 3), False))
    with pytest.raises(CriuError) as info:
        await criu.run_criu(["dump"], workdir=tmp_path, log="dump.log", phase=Phase.ITERATE)
    assert "no log at" in str(info.value).splitlines()[0]
    assert info.value.log_tail == "criu: unknown option"
