"""Downtime of a real migration against the local floor, side by side in one run.

    python -m benchmarks.downtime [--mib 64 128] [--repeat 3] [--quick]

Two tables. The first uses the mutating process: the *floor* is the final dump
(``criu dump``, workload frozen) plus a local restore of those images, with no
network, no diff and no verification: no CRIU-based migration can be down for less
on this machine. The *ctlive* row is a full migration over loopback with the
simulated SNP receiver; its downtime runs from the start of the final dump until
the destination has resumed the workload (COMMIT_ACK). Target: ctlive <= 1.2x.

The second uses a TCP service with a client outside its namespaces (the demo's
workload) and reports downtime as the *client* sees it: the longest gap between
two replies. Rows: the floor (dump + restore), CRIU's page-server path (pages
streamed to ``criu page-server``, then restore), and ctlive.
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
from ctlive.demo import SampleService, start_sample_workload
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


def _plumb(svc: SampleService) -> None:
    for cmd in (f"ip addr add {svc.host_ip}/24 dev {svc.outer2}",
                f"ip link set {svc.outer2} up"):
        subprocess.run(cmd.split(), check=True, capture_output=True)


def _wait_replies(svc: SampleService, more: int, timeout: float = 60.0) -> None:
    start = len(svc.replies)
    deadline = time.monotonic() + timeout
    while len(svc.replies) < start + more and not svc.errors and time.monotonic() < deadline:
        time.sleep(0.05)


def tcp_local(mib: int, net: int, page_server: bool) -> float:
    """Client-seen gap for dump + restore on this host (optionally via page-server)."""
    criu = find_criu().path
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-tcp-", dir="/var/tmp"))
    svc = SampleService(work, net=net, mib=mib)
    time.sleep(1.0)
    img, pages = private_tmpfs("tcpimg"), private_tmpfs("tcppages")
    ext = ["--tcp-established", "--external", f"veth[ceth0]:{svc.outer}"]
    srv = None
    try:
        dump = [criu, "dump", "-t", str(svc.pid), "-D", str(img), "-o", "dump.log", *ext]
        if page_server:
            srv = subprocess.Popen([criu, "page-server", "-D", str(pages), "--port", "27700",
                                    "-o", "ps.log"])
            time.sleep(0.3)
            dump += ["--page-server", "--address", "127.0.0.1", "--port", "27700"]
        subprocess.run(dump, check=True, capture_output=True)
        if page_server:
            for f in img.iterdir():  # the rest of the images travel beside the pages
                if f.is_file():
                    shutil.copy(f, pages / f.name)
        src = pages if page_server else img
        subprocess.run([criu, "restore", "-D", str(src), "-d", "--root", "/", "-o",
                        "restore.log", "--tcp-established", "--external",
                        f"veth[ceth0]:{svc.outer2}"], check=True, capture_output=True)
        _plumb(svc)
        _wait_replies(svc, 10)
        if svc.errors:
            raise RuntimeError(f"client errors: {svc.errors}")
        return svc.max_gap()
    finally:
        if srv is not None:
            srv.kill()
        svc.cleanup()
        drop_tmpfs(img)
        drop_tmpfs(pages)
        shutil.rmtree(work, ignore_errors=True)


async def tcp_ctlive(mib: int, net: int, platform: SimulatedSnpPlatform) -> float:
    """Client-seen gap for a ctlive migration of the TCP service."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-tcp-", dir="/var/tmp"))
    svc = SampleService(work, net=net, mib=mib)
    await anyio.sleep(1.0)
    src, dst = Identity.generate(), Identity.generate()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    state = private_tmpfs("tcprecv")
    try:
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                ("127.0.0.1", 0), identity=dst, provider=platform, allow={src.public_key},
                state_dir=state, task_status=task_status, **svc.receiver_options()))
            await migrate(svc.workload(), addr, identity=src, attestation=verifier,
                          convergence=Convergence(max_downtime=0.2, max_iterations=6))
            await anyio.to_thread.run_sync(_wait_replies, svc, 10)
            tg.cancel_scope.cancel()
        if svc.errors:
            raise RuntimeError(f"client errors: {svc.errors}")
        return svc.max_gap()
    finally:
        svc.cleanup()
        drop_tmpfs(state)
        shutil.rmtree(work, ignore_errors=True)


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
    print("\nDowntime seen by a TCP client of the service (longest gap between replies, s):\n")
    print("| workload | floor: dump + restore | CRIU page-server | ctlive | ctlive / floor |")
    print("|---|---|---|---|---|")
    net = 210
    for mib in sizes:
        rows = []
        for kind in ("floor", "page-server", "ctlive"):
            gaps = []
            for _ in range(repeat):
                net = 210 + (net - 209) % 40
                if kind == "ctlive":
                    gaps.append(anyio.run(tcp_ctlive, mib, net, platform))
                else:
                    gaps.append(tcp_local(mib, net, kind == "page-server"))
            rows.append(statistics.median(gaps))
        print(f"| TCP service {mib} MiB | {rows[0]:.3f} | {rows[1]:.3f} | {rows[2]:.3f} | "
              f"{rows[2] / rows[0]:.2f} |")


if __name__ == "__main__":
    main()
