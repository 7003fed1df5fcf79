"""A process tree moves between two hosts of `ctlive.testing.hosts`: the source runs inside
host A, the receiver is a process of its own inside host B, and they meet over the bridge.
The workload's own tmpfs /tmp (its state file) travels inside its CRIU image."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import pytest
from criu_harness import require_criu

from ctlive.identity import Identity
from ctlive.testing.hosts import FRESH_RUN_DIRS, Network

pytestmark = pytest.mark.criu
HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"
SRC, DST = Identity(bytes(range(1, 33))), Identity(bytes(range(33, 65)))
WORKLOAD = ("import time\nn = 0\nwhile True:\n    n += 1\n"
            "    open('/tmp/counter', 'w').write(str(n))\n    time.sleep(0.05)\n")


def test_process_between_two_hosts(tmp_path: pathlib.Path) -> None:
    require_criu()
    from ctlive.attest import SimulatedSnpPlatform

    # Outside /tmp: the hosts' /tmp are private, the machine's root is shared.
    shared = pathlib.Path("/var/lib") / f"ctlive-test-{tmp_path.name}"
    shared.mkdir(parents=True, exist_ok=True)
    ctl = shared / "ctl"
    ctl.mkdir(exist_ok=True)
    platform = shared / "platform.pem"
    SimulatedSnpPlatform(key_file=platform)
    py = sys.executable
    try:
        with Network(index=248) as net:
            a, b = net.host("host-a"), net.host("host-b")
            assert a.run(["sh", "-c", f"cat > /tmp/w.py <<'EOF'\n{WORKLOAD}EOF"]).returncode == 0
            a.popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                     f"{FRESH_RUN_DIRS}exec setsid {py} /tmp/w.py </dev/null >/dev/null 2>&1"],
                    start_new_session=True)
            deadline = time.monotonic() + 10
            while not (pids := a.run(["pgrep", "-x", "-f", f"{py} /tmp/w.py"]).stdout.split()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            pid = int(pids[0])
            rx_cfg = {"ctl": str(ctl), "platform": str(platform), "port": 7788,
                      "listen": "0.0.0.0", "key": DST.private_key.hex(),
                      "allow": SRC.public_key.hex(), "state": "/run/ctlive"}
            b.popen([py, str(HELPERS / "fault_procs.py"), "receiver", json.dumps(rx_cfg)])
            deadline = time.monotonic() + 30
            while not (ctl / "rx-addr.json").exists():
                assert time.monotonic() < deadline, "the receiver did not start"
                time.sleep(0.05)
            src_cfg = {"ctl": str(ctl), "platform": str(platform), "pid": pid,
                       "destination": [b.ip, 7788], "key": SRC.private_key.hex(),
                       "state": "/var/lib/ctlive-src"}
            out = a.run([py, str(HELPERS / "fault_procs.py"), "source", json.dumps(src_cfg)],
                        timeout=120)
            result = json.loads((ctl / "src-result.json").read_text())
            assert result["ok"], (result, out.stderr[-2000:])
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
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)
