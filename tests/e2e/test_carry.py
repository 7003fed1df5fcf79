"""Files carried between two hosts of `ctlive.testing.hosts`, pre-copied like memory.

(a) A process tree appends a numbered line every 50 ms to a file it holds open, in a data
directory in host A's private /tmp, carried with `Process(pid, carry=[dir])`. (b) A runc
container whose rootfs exists only in host A's private /tmp appends a line every 50 ms to
a file in its rootfs. Each moves to host B (the source inside host A, the receiver a
process of its own inside host B, its state on host B's memory /run). Afterwards the
destination's copy of the file has every line once, in order, and goes on growing; host A
no longer runs the workload. The two processes are tests/helpers/host_procs.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import pytest
from host_procs import run_source, start_receiver

pytestmark = pytest.mark.criu
APPENDER = ("import sys, time\nf = open(sys.argv[1], 'a', buffering=1)\ni = 0\n"
            "while True:\n    i += 1\n    f.write(f'{i}\\n')\n    time.sleep(0.05)\n")
CONTAINER = "i=0; while true; do i=$((i+1)); echo $i >> /data/lines; sleep 0.05; done"


def _lines(path: pathlib.Path) -> list[int]:
    # The last line may be half written at the moment it is read.
    text = path.read_text()
    return [int(x) for x in text[: text.rfind("\n") + 1].split()]


def _check_lines(path: pathlib.Path) -> None:
    lines = _lines(path)
    assert lines and lines == list(range(1, len(lines) + 1)), lines[-20:]
    time.sleep(0.5)
    assert len(_lines(path)) > len(lines), "the file stopped growing at the destination"


def _start_appender(a: Any, script: pathlib.Path, target: str) -> tuple[int, str]:
    """The appender in its own PID namespace in host A, but in host A's mount namespace
    (its files are the host's, reopened by path at the destination: CRIU's --root /);
    its pid (pid 1 of its namespace, not the unshare above it) and pgrep pattern."""
    py = sys.executable
    a.popen(["unshare", "--pid", "--fork", "sh", "-c",
             f"exec setsid {py} {script} {target} </dev/null >/dev/null 2>&1"],
            start_new_session=True)
    match = f"^{py} {script} {target}"
    deadline = time.monotonic() + 10
    while not (pids := a.run(["pgrep", "-f", match]).stdout.split()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    return int(pids[0]), match


def _run_pair(a: Any, b: Any, shared: pathlib.Path, src: dict[str, Any], loop: str, *,
              ok: bool = True) -> dict[str, Any]:
    """The receiver inside host B, then the source inside host A; the source's result."""
    start_receiver(b, shared, backend=loop)
    return run_source(a, b, shared, ok=ok, backend=loop, **src)


def _appender(shared: pathlib.Path) -> pathlib.Path:
    """CRIU checked; the appender script in ``shared``."""
    from criu_harness import require_criu

    require_criu()
    script = shared / "appender.py"
    script.write_text(APPENDER)
    return script


def test_process_carries_its_data_directory(anyio_backend: str, shared: pathlib.Path) -> None:
    from ctlive.testing.hosts import Network

    loop = anyio_backend
    script = _appender(shared)
    data = f"/tmp/carry-{os.getpid()}"
    with Network(index=240 if loop == "asyncio" else 241) as net:
        a, b = net.host("host-a"), net.host("host-b")
        a.run(["mkdir", "-p", f"{data}/sub"], check=True)
        a.run(["sh", "-c", f"echo kept > {data}/sub/other; ln -s sub/other {data}/link"],
              check=True)
        a.path(f"{data}/sub/big").write_bytes(os.urandom(1 << 20))  # unchanged: sent once
        pid, match = _start_appender(a, script, f"{data}/log")
        result = _run_pair(a, b, shared, {"kind": "process", "pid": pid, "carry": [data]},
                           loop)
        print(f"\nprocess with a carried directory ({loop}): file bytes per iteration "
              f"{result['file_bytes']}, downtime {result['downtime']:.3f} s")
        assert a.run(["pgrep", "-f", match]).stdout.strip() == ""
        assert b.run(["pgrep", "-f", match]).stdout.split() == [str(result["restored_pid"])]
        _check_lines(b.path(f"{data}/log"))
        assert b.path(f"{data}/sub/other").read_text() == "kept\n"
        assert os.readlink(b.path(f"{data}/link")) == "sub/other"
        # Later iterations carried only what changed (the log), not the whole tree.
        first, *rest = result["file_bytes"]
        assert first > 1 << 20 and rest and all(0 < n < first // 4 for n in rest), result
        assert b.path(f"{data}/sub/big").stat().st_size == 1 << 20
        # No image left behind in host B's state directory.
        assert list(b.path("/run/ctlive").rglob("pages-*.img")) == []


def test_an_open_file_left_behind_is_named(anyio_backend: str, shared: pathlib.Path) -> None:
    """The process holds open a file that is not carried: the receiver reads the dump's
    files.img, finds it missing, and refuses naming it; the source runs on."""
    from ctlive.testing.hosts import Network

    loop = anyio_backend
    script = _appender(shared)
    with Network(index=232 if loop == "asyncio" else 233) as net:
        a, b = net.host("host-a"), net.host("host-b")
        a.run(["mkdir", "-p", "/tmp/left"], check=True)
        pid, match = _start_appender(a, script, "/tmp/left/log")
        result = _run_pair(a, b, shared, {"kind": "process", "pid": pid, "carry": []},
                           loop, ok=False)
        assert "/tmp/left/log (missing here; not carried" in result["message"]
        assert a.run(["pgrep", "-f", match]).stdout.split() == [str(pid)]
        assert b.run(["pgrep", "-f", match]).stdout.strip() == ""
        before = len(_lines(a.path("/tmp/left/log")))
        time.sleep(0.3)
        assert len(_lines(a.path("/tmp/left/log"))) > before  # it runs on at the source


def test_runc_rootfs_only_on_the_source_host(anyio_backend: str, shared: pathlib.Path) -> None:
    from criu_harness import require_criu

    from ctlive.testing.hosts import Network

    require_criu()
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("runc") is None:
        pytest.skip("runc or busybox-static missing: run scripts/install-criu")
    loop = anyio_backend
    cid = f"carry{os.getpid()}{loop[0]}"
    try:
        with Network(index=242 if loop == "asyncio" else 243) as net:
            a, b = net.host("host-a"), net.host("host-b")
            # The bundle is in host A's private /tmp: host B cannot see it.
            bundle = a.path(f"/tmp/{cid}")
            rootfs = bundle / "rootfs"
            for d in ("bin", "tmp", "proc", "dev", "sys", "data"):
                (rootfs / d).mkdir(parents=True)
            shutil.copy(busybox, rootfs / "bin" / "busybox")
            for tool in ("sh", "sleep"):
                (rootfs / "bin" / tool).symlink_to("busybox")
            a.run(["sh", "-c", f"cd /tmp/{cid} && runc spec"], check=True)
            cfg = json.loads((bundle / "config.json").read_text())
            cfg["process"]["terminal"] = False
            cfg["process"]["args"] = ["sh", "-c", CONTAINER]
            cfg["root"] = {"path": "rootfs", "readonly": False}
            (bundle / "config.json").write_text(json.dumps(cfg))
            # stdio on /dev/null: a host log file would be outside the container's mounts.
            a.run(["sh", "-c", f"runc run --detach --bundle /tmp/{cid} {cid} "
                   "</dev/null >/dev/null 2>&1"], check=True)
            time.sleep(0.5)
            assert not b.path(f"/tmp/{cid}").exists()
            result = _run_pair(a, b, shared, {"kind": "runc", "id": cid}, loop)
            print(f"\nrunc with its rootfs carried ({loop}): file bytes per iteration "
                  f"{result['file_bytes']}, downtime {result['downtime']:.3f} s")
            assert cid not in a.run(["runc", "list", "-q"]).stdout.split()
            assert b.run(["runc", "--root", "/run/ctlive/runc", "state", cid]).returncode == 0
            copy = b.path(f"/run/ctlive/bundles/{cid}/rootfs")
            _check_lines(copy / "data" / "lines")
            assert os.readlink(copy / "bin" / "sh") == "busybox"
            # The busybox binary went in iteration 0 only.
            first, *rest = result["file_bytes"]
            assert first > 100_000 and all(n < first // 4 for n in rest)
            b.run(["runc", "--root", "/run/ctlive/runc", "delete", "--force", cid])
    finally:
        for cg in pathlib.Path("/sys/fs/cgroup").glob(f"**/{cid}*"):
            with contextlib.suppress(OSError):
                cg.rmdir()


@pytest.mark.anyio
async def test_a_carry_the_receiver_refuses_leaves_the_source_running(
        mutator: Any, receiver_factory: Any, verifier: Any, tmp_path: pathlib.Path) -> None:
    """A carried directory the receiver will not rebuild (here: /tmp is disk on this
    machine) is refused before READY with an error that says why; the source resumes."""
    import anyio
    from criu_harness import state

    from ctlive.backends import Process
    from ctlive.errors import MigrationError
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate
    from ctlive.migration.spool import memory_backed
    from tests.e2e.conftest import SRC

    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    if memory_backed(data):
        pytest.skip("this machine's /tmp is memory: the refusal needs a disk directory")
    rx = await receiver_factory()
    with pytest.raises(MigrationError, match="not on a memory filesystem"):
        await migrate(Process(mutator.pid, carry=[str(data)]), rx.addr, identity=SRC,
                      attestation=verifier,
                      convergence=Convergence(max_iterations=2, max_downtime=0.0))
    assert state(mutator.pid) in ("S", "R")
    before = mutator.count()
    await anyio.sleep(0.4)
    assert mutator.count() > before
