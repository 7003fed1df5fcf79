"""``ctlive migrate``, ``ctlive serve``, ``ctlive keygen`` and ``ctlive demo``."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from typing import Any

import anyio

from ctlive.errors import ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the migration commands."""
    k = sub.add_parser("keygen", help="make an X25519 identity (writes KEY and KEY.pub)")
    k.add_argument("-o", "--output", type=pathlib.Path, required=True)
    k.set_defaults(func=_keygen)

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

    s = sub.add_parser("serve", help="receive migrations (run inside the SEV-SNP guest)")
    s.add_argument("--listen", default="0.0.0.0:7788")
    s.add_argument("--state", type=pathlib.Path, default=pathlib.Path("/run/ctlive"))
    s.add_argument("--key", type=pathlib.Path, required=True, help="this receiver's identity")
    s.add_argument("--allow", type=pathlib.Path, required=True,
                   help="file of allowed source public keys (hex, one per line)")
    s.add_argument("--provider", choices=["configfs", "sev-guest"])
    s.set_defaults(func=_serve)

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


def _keygen(args: argparse.Namespace) -> int:
    from ctlive.identity import Identity

    ident = Identity.generate()
    ident.save(args.output)
    print(ident.public_key.hex())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ctlive.attest import SnpPolicy
    from ctlive.backends import Process
    from ctlive.convergence import Convergence
    from ctlive.identity import Identity
    from ctlive.migrate import migrate

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


def _serve(args: argparse.Namespace) -> int:
    from ctlive.attest import auto_provider
    from ctlive.identity import Identity, load_public_keys
    from ctlive.serve import serve

    provider = auto_provider(args.provider)
    allow = load_public_keys(args.allow)
    if not allow:
        raise ConfigError(f"{args.allow} lists no source keys: nobody could migrate here")

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                args.listen, identity=Identity.load(args.key), provider=provider, allow=allow,
                state_dir=args.state, task_status=task_status))
            print(f"ctlive receiver listening on {addr[0]}:{addr[1]}", file=sys.stderr)

    anyio.run(run)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ctlive.demo import run_demo

    anyio.run(lambda: run_demo(lanes=args.lanes, mib=args.mib, json_out=args.json))
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The suite lives in the repository (benchmarks/), not in the installed package.
    checkout = pathlib.Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise ConfigError("ctlive bench runs from a source checkout (benchmarks/ is not "
                          "installed with the package)")
    sys.path.insert(0, str(checkout))
    bench = importlib.import_module("benchmarks.__main__")
    bench.main(list(args.bench_args))
    return 0
