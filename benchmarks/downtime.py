"""Downtime of a real migration against the local floor, side by side in one run.

    python -m benchmarks.downtime [--mib 64 128] [--repeat 3] [--quick]

For each workload size: the *floor* is the final dump (``criu dump``, workload
frozen) plus a local restore of those images, with no network, no diff and no
verification: no CRIU-based migration can be down for less on this machine. The
*ctlive* row is a full migration over loopback with the simulated SNP receiver;
its downtime runs from the start of the final dump until the destination has
resumed the workload (COMMIT_ACK). Target: ctlive <= 1.2x the floor.
Needs root and CRIU (scripts/install-criu).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

import anyio

from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier
from ctlive.backends import Process
from ctlive.convergence import Convergence
from ctlive.criubin import find_criu
from ctlive.demo import start_sample_workload
from ctlive.identity import Identity
from ctlive.migrate import migrate
from ctlive.serve import serve


def private_tmpfs(tag: str) -> pathlib.Path:
    """A fresh tmpfs mounted *after* the workload started: its private mount namespace
    does not see it, so CRIU does not archive our images as part of the workload."""
    d = pathlib.Path(tempfile.mkdtemp(prefix=f"ctlive-{tag}-", dir="/run"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g", "ctlive-bench", str(d)],
                   check=True)
    return d


def drop_tmpfs(d: pathlib.Path) -> None:
    subprocess.run(["umount", "-l", str(d)], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def floor_once(mib: int) -> tuple[float, float]:
    """(final dump seconds, restore seconds) for one local dump + restore."""
    criu = find_criu().path
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-floor-", dir="/var/tmp"))
    pid, _ = start_sample_workload(work, mib)
    time.sleep(1.0)
    img = private_tmpfs("floor")
    try:
        t = time.perf_counter()
        subprocess.run([criu, "dump", "-t", str(pid), "-D", str(img), "-o", "dump.log"],
                       check=True, capture_output=True)
        t_dump = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([criu, "restore", "-D", str(img), "-d", "--root", "/", "--pidfile",
                        str(img / "pid"), "-o", "restore.log"], check=True, capture_output=True)
        t_restore = time.perf_counter() - t
        _kill(int((img / "pid").read_text()))
        return t_dump, t_restore
    finally:
        _kill(pid)
        drop_tmpfs(img)
        shutil.rmtree(work, ignore_errors=True)


async def ctlive_once(mib: int, platform: SimulatedSnpPlatform, lanes: int) -> tuple[float, int]:
    """(downtime seconds, iterations) of one migration over loopback."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-bench-", dir="/var/tmp"))
    pid, _ = start_sample_workload(work, mib)
    await anyio.sleep(1.0)
    src, dst = Identity.generate(), Identity.generate()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    restored = None
    state = private_tmpfs("recv")
    try:
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                ("127.0.0.1", 0), identity=dst, provider=platform, allow={src.public_key},
                state_dir=state, task_status=task_status))
            report = await migrate(Process(pid), addr, identity=src, attestation=verifier,
                                   convergence=Convergence(max_downtime=0.2, max_iterations=6),
                                   lanes=lanes)
            restored = int(report.destination_summary["restored_pid"])
            tg.cancel_scope.cancel()
        return report.downtime, len(report.iterations)
    finally:
        _kill(pid)
        if restored:
            _kill(restored)
        shutil.rmtree(work, ignore_errors=True)
        drop_tmpfs(state)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lanes", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sizes = [16] if args.quick else args.mib
    repeat = 1 if args.quick else args.repeat
    platform = SimulatedSnpPlatform()
    print("| workload | floor: dump + restore (s) | ctlive downtime (s) | ratio | iterations |")
    print("|---|---|---|---|---|")
    for mib in sizes:
        floors = [sum(floor_once(mib)) for _ in range(repeat)]
        runs = [anyio.run(ctlive_once, mib, platform, args.lanes) for _ in range(repeat)]
        floor = statistics.median(floors)
        down = statistics.median(r[0] for r in runs)
        its = statistics.median(r[1] for r in runs)
        print(f"| mutating process {mib} MiB | {floor:.3f} | {down:.3f} | {down / floor:.2f} | "
              f"{its:.0f} |")
    print("\nmedian of", repeat, "runs each; target: ratio <= 1.2")


if __name__ == "__main__":
    main()
