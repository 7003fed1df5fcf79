"""``ctlive migrate``: live-migrate a workload to a receiver."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import anyio

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive migrate``."""
    m = sub.add_parser("migrate", help="live-migrate a process tree to a ctlive receiver")
    m.add_argument("--pid", type=int, required=True, help="root of the process tree")
    m.add_argument("destination", help="HOST:PORT of the receiver")
    m.add_argument("--key", type=pathlib.Path, required=True, help="this source's identity")
    m.add_argument("--policy", type=pathlib.Path, required=True, help="SNP policy (TOML)")
    m.add_argument("--lanes", type=int, default=1)
    m.add_argument("--cipher", choices=["AESGCM", "ChaChaPoly"], default="AESGCM")
    m.add_argument("--max-downtime", type=float, default=0.3)
    m.add_argument("--max-iterations", type=int, default=8)
    m.add_argument("--tcp-established", action="store_true")
    m.add_argument("--criu-precopy", action="store_true",
                   help="pre-copy with CRIU dumps even without soft-dirty tracking (each "
                   "iteration then freezes the workload for a whole dump) instead of "
                   "reading its memory while it runs")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ctlive.attest import SnpPolicy
    from ctlive.backends.process import Process
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.json) as bar:
        # The bar counts iterations against the cap; the text shows the live figures.
        task = bar.add_task("connect", total=args.max_iterations, info="")

        def show(ev: Any) -> None:
            bar.update(task, completed=min(ev.iteration + 1, args.max_iterations),
                       description=f"{ev.phase} #{ev.iteration}",
                       info=f"{ev.bytes_done / 1e6:.1f} MB sent, dirty "
                            f"{ev.dirty_rate / 1e6:.1f} MB/s, link {ev.link_rate / 1e6:.0f} MB/s, "
                            f"predicted downtime {ev.predicted_downtime * 1000:.0f} ms")

        report = anyio.run(lambda: migrate(
            Process(args.pid, tcp_established=args.tcp_established,
                    live_read=False if args.criu_precopy else None), args.destination,
            identity=Identity.load(args.key), attestation=SnpPolicy.from_toml(args.policy),
            convergence=Convergence(max_downtime=args.max_downtime,
                                    max_iterations=args.max_iterations),
            lanes=args.lanes, cipher=args.cipher, on_progress=show))
        bar.update(task, completed=args.max_iterations, description="done")
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(f"migrated {report.migration_id}: downtime {report.downtime * 1000:.0f} ms, "
              f"total {report.total_time:.2f} s, {len(report.iterations)} iterations, "
              f"{report.bytes_on_wire / 1e6:.1f} MB on the wire")
    return 0


