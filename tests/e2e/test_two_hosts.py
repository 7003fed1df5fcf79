"""A process tree moves between two hosts of `ctlive.testing.hosts`: the source runs inside
host A, the receiver is a process of its own inside host B, and they meet over the bridge.
The workload's own tmpfs /tmp (its state file) travels inside its CRIU image."""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

import pytest
from criu_harness import require_criu
from host_procs import run_source, start_receiver

from ctlive.testing.hosts import FRESH_RUN_DIRS, Network

pytestmark = pytest.mark.criu
WORKLOAD = ("import time\nn = 0\nwhile True:\n    n += 1\n"
            "    open('/tmp/counter', 'w').write(str(n))\n    time.sleep(0.05)\n")


def _start_counter(a: Any, prefix: str) -> list[str]:
    """The counter tree in host A, in PID and mount namespaces of its own (its shell
    starting with ``prefix``); its pids as host A numbers them."""
    py = sys.executable
    assert a.run(["sh", "-c", f"cat > /tmp/w.py <<'EOF'\n{WORKLOAD}EOF"]).returncode == 0
    a.popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
             f"{prefix}exec setsid {py} /tmp/w.py </dev/null >/dev/null 2>&1"],
            start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pids := a.run(["pgrep", "-x", "-f", f"{py} /tmp/w.py"]).stdout.split()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return pids


def test_process_between_two_hosts(shared: pathlib.Path) -> None:
    require_criu()
    # `shared` is outside /tmp: the hosts' /tmp are private, the machine's root is shared.
    py = sys.executable
    with Network(index=248) as net:
        a, b = net.host("host-a"), net.host("host-b")
        pid = int(_start_counter(a, FRESH_RUN_DIRS)[0])
        start_receiver(b, shared)
        result = run_source(a, b, shared, kind="process", pid=pid, state="/var/lib/ctlive-src",
                            timeout=120)
        new = result["restored_pid"]
        # Gone from host A, running in host B, its counter going on.
        assert a.run(["pgrep", "-x", "-f", f"{py} /tmp/w.py"]).stdout.strip() == ""
        running = b.run(["pgrep", "-x", "-f", f"{py} /tmp/w.py"]).stdout.split()
        assert running == [str(new)]
        first = int(b.run(["cat", f"/proc/{new}/root/tmp/counter"]).stdout or 0)
        time.sleep(0.5)
        assert int(b.run(["cat", f"/proc/{new}/root/tmp/counter"]).stdout) > first > 0
        # No image left in host B's state directory (it is host B's own /run).
        assert [p.name for p in b.path("/run/ctlive").iterdir() if p.is_dir()] == []


def test_a_dump_directory_the_workload_sees_on_a_tmpfs_is_refused(shared: pathlib.Path
                                                                  ) -> None:
    """The same tree, but its mount namespace keeps host A's /var/tmp, where the source's
    dumps go by default: CRIU would archive each dump into the next, so the migration is
    refused before the first dump, saying why and what to set, and the tree runs on."""
    require_criu()
    py = sys.executable
    with Network(index=247) as net:
        a, b = net.host("host-a"), net.host("host-b")
        pids = _start_counter(a, "")
        start_receiver(b, shared)
        result = run_source(a, b, shared, ok=False, kind="process", pid=int(pids[0]),
                            state="/var/lib/ctlive-src", timeout=120)
        assert "on a tmpfs that process" in result["message"], result
        assert "--workdir" in result["message"], result
        assert a.run(["pgrep", "-x", "-f", f"{py} /tmp/w.py"]).stdout.split() == pids
        assert a.run(["cat", "/tmp/counter"]).returncode == 0
