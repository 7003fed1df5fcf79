"""``ctlive demo``: a real migration on this machine, with nothing to configure.

It starts a sample workload (a process in its own PID and mount namespace that
keeps mutating 32 MiB and counting), a receiver on loopback that attests with the
*simulated* SNP platform (clearly insecure: there is no SEV hardware here), and
migrates the workload with real CRIU. It checks that exactly one copy runs
afterwards and that its counter went on from where it was, prints the report,
and cleans up.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import anyio

from ctlive.attest import INSECURE_BANNER, SimulatedSnpPlatform, SnpPolicy, SnpVerifier
from ctlive.backends import Process
from ctlive.convergence import Convergence
from ctlive.criubin import find_criu
from ctlive.errors import ConfigError
from ctlive.identity import Identity
from ctlive.migrate import migrate
from ctlive.report import MigrationReport, ProgressEvent
from ctlive.serve import serve

__all__ = ["run_demo", "start_sample_workload"]

_WORKLOAD = r"""
import os, random, sys, time
os.setsid()  # its own session inside the PID namespace, as CRIU requires
size = int(sys.argv[1]) << 20; counter = sys.argv[2]
buf = bytearray(size); r = random.Random(7)
for i in range(0, size, 4096):
    buf[i:i + 128] = r.randbytes(128)
n = 0
while True:
    for _ in range(200):
        p = r.randrange(size // 4096) * 4096 + r.randrange(4000)
        buf[p:p + 16] = r.randbytes(16)
    n += 1
    with open(counter, "w") as f:
        f.write(str(n))
    time.sleep(0.02)
"""


def start_sample_workload(workdir: pathlib.Path, mib: int = 32) -> tuple[int, pathlib.Path]:
    """Start the sample workload; returns (pid, counter file)."""
    script = workdir / "workload.py"
    script.write_text(_WORKLOAD)
    counter = workdir / "counter"
    cmd = f"exec {sys.executable} {script} {mib} {counter} </dev/null >/dev/null 2>&1"
    # Own PID and mount namespace, session leader inside it (CRIU needs both), and no
    # descriptors inherited from the host's mount namespace.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", cmd],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for d in pathlib.Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    argv = (d / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if len(argv) > 1 and argv[1] == str(script).encode() and b"python" in argv[0]:
                    while not counter.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    return int(d.name), counter
        time.sleep(0.05)
    proc.kill()
    raise ConfigError("the sample workload did not start")


def _count(counter: pathlib.Path) -> int:
    try:
        return int(counter.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


async def run_demo(*, lanes: int = 1, mib: int = 32, json_out: bool = False) -> MigrationReport:
    """Run the demo; returns the report after checking the outcome."""
    if os.geteuid() != 0:
        raise ConfigError("the demo needs root (CRIU checkpoints other processes)")
    find_criu()
    from rich.console import Console

    console = Console(stderr=json_out)
    console.print(f"[bold red]{INSECURE_BANNER}[/] (there is no SEV hardware here)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-demo-", dir="/var/tmp"))
    platform = SimulatedSnpPlatform()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    src, dst = Identity.generate(), Identity.generate()
    pid, counter = start_sample_workload(work, mib)
    restored: int | None = None
    try:
        console.print(f"workload: pid {pid}, {mib} MiB, counter at {_count(counter)}")
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                ("127.0.0.1", 0), identity=dst, provider=platform, allow={src.public_key},
                state_dir=work / "receiver", task_status=task_status))
            console.print(f"receiver (simulated SNP guest) listening on {addr[0]}:{addr[1]}")

            def show(ev: ProgressEvent) -> None:
                console.print(f"  {ev.phase:<8} iteration {ev.iteration}: "
                              f"{ev.bytes_done / 1e6:7.2f} MB sent, dirty "
                              f"{ev.dirty_rate / 1e6:6.1f} MB/s, predicted downtime "
                              f"{ev.predicted_downtime * 1000:6.0f} ms")

            before = _count(counter)
            report = await migrate(Process(pid), addr, identity=src, attestation=verifier,
                                   convergence=Convergence(max_downtime=0.3, max_iterations=6),
                                   lanes=lanes, on_progress=show)
            restored = new_pid = int(report.destination_summary["restored_pid"])
            at_handover = _count(counter)
            await anyio.sleep(0.5)
            after = _count(counter)
            tg.cancel_scope.cancel()
        ok = (not _alive(pid) and _alive(new_pid) and after > at_handover >= before)
        it = report.iterations
        console.print(f"\nmigrated in {report.total_time:.2f} s, downtime "
                      f"{report.downtime * 1000:.0f} ms ({len(it)} iterations)")
        for i in it:
            console.print(f"  iteration {i.index}{' (final)' if i.final else ''}: "
                          f"{i.pages_changed}/{i.pages_total} pages changed, "
                          f"{i.wire_bytes / 1e6:.2f} MB on the wire for "
                          f"{i.image_bytes / 1e6:.1f} MB of image; CRIU frozen "
                          f"{(i.frozen_time_us or 0) / 1000:.0f} ms")
        for d in report.decisions:
            console.print(f"  after iteration {d.after_iteration}: {d.reason}")
        console.print(f"wire bytes {report.bytes_on_wire / 1e6:.2f} MB for "
                      f"{report.image_bytes / 1e6:.1f} MB of dumped image; attestation: "
                      f"{report.attestation.get('platform')}")
        console.print(f"counter {before} before, {at_handover} at hand-over, {after} after: "
                      f"source pid {pid} {'gone' if not _alive(pid) else 'STILL RUNNING'}, "
                      f"restored pid {new_pid} {'running' if _alive(new_pid) else 'DEAD'}")
        if not ok:
            raise ConfigError("the demo's checks failed (see above)")
        console.print("[bold green]OK[/]: the workload moved and kept counting")
        if json_out:
            print(report.to_json(indent=2))
        return report
    finally:
        for p in (pid, restored):
            if p:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        subprocess.run(["rm", "-rf", str(work)], check=False)

