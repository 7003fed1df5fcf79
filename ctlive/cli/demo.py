"""``ctlive demo`` (a real migration on this machine) and ``ctlive bench``."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import anyio

from ctlive.attest import INSECURE_BANNER, SimulatedSnpPlatform, SnpPolicy, SnpVerifier
from ctlive.backends.criu import find_criu
from ctlive.errors import ConfigError, Phase
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence
from ctlive.migration.destination import serve
from ctlive.migration.report import MigrationReport, ProgressEvent
from ctlive.migration.source import migrate
from ctlive.testing.memory import memory_dir
from ctlive.testing.workloads import SampleService

__all__ = ["register", "run_demo"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive demo`` and ``ctlive bench``."""
    d = sub.add_parser("demo", help="migrate a sample workload on this machine (needs root)")
    d.add_argument("--lanes", type=int, default=1)
    d.add_argument("--mib", type=int, default=32, help="workload size")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)

    # Its options belong to the suite: none are parsed here ("+" is no option prefix).
    b = sub.add_parser("bench", help="the benchmark suite (from a source checkout; needs root)",
                       prefix_chars="+", add_help=False)
    b.add_argument("bench_args", nargs="*", help="arguments of python -m benchmarks")
    b.set_defaults(func=_bench)


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

    # soft_wrap: piped to a file, lines stay whole instead of breaking at 80 columns.
    console = Console(stderr=json_out, soft_wrap=True)
    console.print(f"[bold red]{INSECURE_BANNER}[/] (there is no SEV hardware here)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-demo-", dir="/var/tmp"))
    platform = SimulatedSnpPlatform()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    src, dst = Identity.generate(), Identity.generate()
    svc = SampleService(work, net=200 + os.getpid() % 50, mib=mib)
    # The receiver's state: memory (a receiver refuses a disk), hidden from the workload.
    rx_state = memory_dir("ctlive-demo-")
    try:
        console.print(f"workload: pid {svc.pid}, TCP service on {svc.ip}:7000 with {mib} MiB "
                      f"of changing memory; a client on this host has one connection open "
                      f"({len(svc.replies)} replies so far)")
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                ("127.0.0.1", 0), identity=dst, provider=platform, allow={src.public_key},
                state_dir=rx_state, task_status=task_status,
                **svc.receiver_options()))
            console.print(f"receiver (simulated SNP guest) listening on {addr[0]}:{addr[1]}")

            def show(ev: ProgressEvent) -> None:
                if ev.phase is not Phase.ITERATE:
                    console.print(f"  {ev.phase:<10} {ev.bytes_done / 1e6:7.2f} MB sent")
                    return
                console.print(f"  {ev.phase:<10} iteration {ev.iteration}: "
                              f"{ev.bytes_done / 1e6:7.2f} MB sent, dirty "
                              f"{ev.dirty_rate / 1e6:6.1f} MB/s, predicted downtime "
                              f"{ev.predicted_downtime * 1000:6.0f} ms")

            report = await migrate(svc.workload(), addr, identity=src, attestation=verifier,
                                   convergence=Convergence(max_downtime=0.3, max_iterations=6),
                                   lanes=lanes, on_progress=show)
            new_pid = int(report.destination_summary["restored_pid"])
            handed_over = len(svc.replies)
            with anyio.move_on_after(60):
                while len(svc.replies) < handed_over + 20 and not svc.errors:
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        survived = not svc.errors and len(svc.replies) >= handed_over + 20
        ok = survived and not _alive(svc.pid) and _alive(new_pid)
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
        last = svc.replies[-1][1] if svc.replies else 0
        console.print(
            f"TCP client: {len(svc.replies)} replies, last {last}, longest gap "
            f"{svc.max_gap() * 1000:.0f} ms, "
            + ("no reset and no lost reply" if not svc.errors else f"ERRORS {svc.errors}"))
        console.print(f"source pid {svc.pid} {'gone' if not _alive(svc.pid) else 'STILL RUNNING'}"
                      f", restored pid {new_pid} {'running' if _alive(new_pid) else 'DEAD'}")
        if not ok:
            raise ConfigError("the demo's checks failed (see above)")
        console.print("[bold green]OK[/]: the service moved and its client's connection "
                      "survived")
        if json_out:
            print(report.to_json(indent=2))
        return report
    finally:
        svc.cleanup()
        subprocess.run(["rm", "-rf", str(work), str(rx_state)], check=False)


def _demo(args: argparse.Namespace) -> int:
    from ctlive.cli.demo import run_demo

    anyio.run(lambda: run_demo(lanes=args.lanes, mib=args.mib, json_out=args.json))
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The suite lives in the repository (benchmarks/), not in the installed package: run
    # it as ``python -m benchmarks`` in the checkout this package was loaded from.
    checkout = pathlib.Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise ConfigError("ctlive bench runs from a source checkout (benchmarks/ is not "
                          "installed with the package)")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.bench_args],
                          cwd=checkout, check=False).returncode
