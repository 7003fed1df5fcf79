"""Runs inside the test VM (tests/vm/test_guest.py): a migration between two namespace
hosts of the guest, pre-copied with CRIU ``pre-dump`` on the guest kernel's soft-dirty
tracking. Host B runs ``ctlive serve``; the source runs in the guest's own namespaces and
dumps the workload in host A. Writes the report (JSON) to OUT.

    python guest_predump.py SHARE WORKLOAD_SCRIPT MIB HOT OUT
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time

import anyio

from ctlive.attest import SnpPolicy
from ctlive.backends import Process
from ctlive.backends.criu import find_criu
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence
from ctlive.migration.source import migrate
from ctlive.testing.hosts import Network
from ctlive.testing.vm import portable_shell
from ctlive.testing.workloads import script_pids

SRC, DST = Identity(bytes(range(1, 33))), Identity(bytes(range(33, 65)))


def main() -> None:
    share, script, mib, hot, out = (pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                    int(sys.argv[4]), pathlib.Path(sys.argv[5]))
    if not find_criu().dirty_tracking:
        raise SystemExit("this kernel has no soft-dirty tracking")
    d = share / "predump"
    d.mkdir(exist_ok=True)
    DST.save(d / "dst.key", force=True)
    (d / "allow.txt").write_text(SRC.public_key.hex() + "\n")
    py = sys.executable
    with Network(index=241) as net:
        a, b = net.host("host-a"), net.host("host-b")
        # Only /, /proc, /sys and /dev in the workload's mount namespace: not the 9p
        # share, not the guest's overlays and tmpfs mounts (CRIU would carry those). Its
        # own network namespace (lo only): host A's eth0 has its peer outside.
        a.popen(["unshare", "--pid", "--net", "--fork", "--mount-proc", "sh", "-c",
                 portable_shell(f"{py} {script} {mib} {hot}", tunables=False)],
                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + 120
        while not (pids := script_pids(pathlib.Path(script))):
            assert time.monotonic() < deadline, "the workload did not start"
            time.sleep(0.2)
        outer = pids[0]
        time.sleep(3)  # the workload filled its memory
        with open(d / "rx.log", "wb") as log:
            rx = b.popen([str(pathlib.Path(py).parent / "ctlive"), "serve", "--listen",
                          "0.0.0.0:7788", "--key", str(d / "dst.key"), "--allow",
                          str(d / "allow.txt"), "--state", "/run/ctlive", "--provider",
                          "simulated", "--simulated-chain", str(d / "chain.pem")],
                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection((b.ip, 7788), 2).close()
                break
            except OSError:
                assert rx.poll() is None, (d / "rx.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "ctlive serve did not start in host B"
                time.sleep(0.5)
        policy = SnpPolicy(allow_any_measurement=True, simulated_chain=str(d / "chain.pem"))
        t0 = time.monotonic()
        report = anyio.run(lambda: migrate(
            Process(outer), (b.ip, 7788), identity=SRC, attestation=policy,
            convergence=Convergence(max_iterations=4, max_downtime=0.0),
            state_dir="/run/ctlive-vm/src", connect_timeout=120, ready_timeout=600,
            progress_timeout=300))
        took = time.monotonic() - t0
        new = report.destination_summary.get("restored_pid")
        result = {"report": report.to_dict(), "seconds": took, "restored_pid": new,
                  "running": script_pids(pathlib.Path(script)),
                  "source_pid": outer,
                  "restored_in_b": b.run(["kill", "-0", str(new)]).returncode == 0}
        out.write_text(json.dumps(result, default=str))
        rx.kill()


if __name__ == "__main__":
    main()
