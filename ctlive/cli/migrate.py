"""``ctlive migrate TARGET HOST:PORT``: live-migrate a workload to a receiver.

``TARGET`` is ``pid:N`` (a process tree), ``runc:ID`` or ``podman:NAME``. The command
exits 0 only when the workload runs at the destination; the other exit codes are in
:data:`ctlive.cli.EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio

from ctlive.errors import ConfigError, CtliveError, InDoubtError
from ctlive.ops.logs import add_arguments as add_log_arguments

if TYPE_CHECKING:
    from ctlive.cli.source_metrics import SourceMetrics

__all__ = ["parse_target", "register"]

EXAMPLE = """examples:
  ctlive migrate pid:4242 10.0.0.7:7788 --key source.key --policy policy.toml
  ctlive migrate runc:web-1 10.0.0.7:7788 --key source.key --policy policy.toml --json
  ctlive migrate podman:db 10.0.0.7:7788 --key source.key --policy policy.toml --lanes 2
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive migrate``."""
    m = sub.add_parser("migrate", help="live-migrate a process tree or a container",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Live-migrate TARGET (pid:N, runc:ID or podman:NAME) to "
                       "the ctlive receiver at HOST:PORT. Exit 0 only when the workload runs "
                       "at the destination.")
    m.add_argument("target", metavar="TARGET", nargs="?",
                   help="pid:N, runc:ID or podman:NAME")
    m.add_argument("destination", metavar="HOST:PORT", help="the receiver")
    m.add_argument("--pid", type=int, help="same as TARGET pid:N (kept for old scripts)")
    m.add_argument("--config", type=pathlib.Path, metavar="FILE",
                   help="settings from the [migrate] table of FILE (flags override it)")
    m.add_argument("--key", type=pathlib.Path, help="this source's identity (required)")
    m.add_argument("--policy", type=pathlib.Path, help="SNP policy (TOML; required)")
    m.add_argument("--state", type=pathlib.Path, default=None,
                   help="the source's journal directory (default $CTLIVE_STATE_DIR or "
                   "/var/lib/ctlive)")
    m.add_argument("--runc-root", help="runc's --root for a runc: target")
    m.add_argument("--lanes", type=int, default=1)
    m.add_argument("--cipher", choices=["AESGCM", "ChaChaPoly"], default="AESGCM")
    conv = m.add_argument_group("convergence (ctlive.Convergence; docs/operations.md)")
    conv.add_argument("--max-downtime", type=float, default=0.3,
                      help="target downtime in seconds")
    conv.add_argument("--max-iterations", type=int, default=8,
                      help="dumps including the final one")
    conv.add_argument("--min-shrink", type=float, default=0.1,
                      help="stop when the changed-page count shrinks by less than this "
                      "fraction")
    conv.add_argument("--smoothing", type=float, default=0.5,
                      help="weight of the newest sample in the rate averages (1: none)")
    conv.add_argument("--restore-rate", type=float, default=1.0e9,
                      help="assumed restore speed, image bytes per second")
    conv.add_argument("--freeze-cost", type=float, default=1.0,
                      help="with --criu-precopy: stop once the final transfer is below this "
                      "multiple of another iteration's freeze (0: off)")
    conv.add_argument("--predump-freeze-cost", type=float, default=0.0,
                      help="on the pre-dump (soft-dirty) path: the same rule for each "
                      "pre-dump's own, short, freeze (0: off)")
    m.add_argument("--tcp-established", action="store_true",
                   help="keep the workload's established TCP connections (runc: by default "
                   "when the container joins a named network namespace)")
    m.add_argument("--external", action="append", default=[], metavar="RESOURCE",
                   help="CRIU --external resource of a pid: target, e.g. veth[eth0]:vh0")
    m.add_argument("--carry", action="append", default=[], metavar="DIR",
                   help="a directory a pid: target needs (its data), pre-copied with its "
                   "memory and rebuilt at the same path at the destination (repeatable)")
    m.add_argument("--no-carry-rootfs", action="store_true",
                   help="runc: send the rootfs's path, not the rootfs (the destination "
                   "already has it at that path in its store)")
    m.add_argument("--shell-job", action="store_true",
                   help="CRIU --shell-job, for a pid: target attached to a terminal session")
    m.add_argument("--network-lock", choices=["iptables", "nftables", "skip"],
                   help="CRIU --network-lock of a pid: target (default: CRIU's)")
    m.add_argument("--criu-precopy", action="store_true",
                   help="pre-copy with CRIU dumps even without soft-dirty tracking (each "
                   "iteration then freezes the workload for a whole dump) instead of "
                   "reading its memory while it runs")
    m.add_argument("--connect-timeout", type=float, default=30.0)
    m.add_argument("--ready-timeout", type=float, default=300.0,
                   help="how long the destination may take to restore")
    m.add_argument("--commit-timeout", type=float, default=120.0)
    m.add_argument("--abort-timeout", type=float, default=30.0,
                   help="how long a failure after the final iteration waits for the "
                   "destination to confirm the abort")
    m.add_argument("--progress-timeout", type=float, default=150.0,
                   help="fail an iteration whose bytes stopped moving this long")
    m.add_argument("--workdir", type=pathlib.Path,
                   help="where the dumps go (default: a private directory in /var/tmp)")
    m.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    m.add_argument("--check", action="store_true",
                   help="attestation and the preflight only (CPU, kernel, CRIU, mounts, "
                   "cgroups; docs/backends.md): print the differences, exit 0 if the "
                   "destination can restore the workload, 6 if not; nothing is dumped")
    m.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve this migration's Prometheus metrics over HTTP here while it "
                   "runs (docs/operations.md)")
    add_log_arguments(m)
    m.set_defaults(func=_migrate, parser=m)


def parse_target(text: str | None, *, pid: int | None = None, runc_root: str | None = None,
                 tcp_established: bool = False, external: tuple[str, ...] = (),
                 criu_precopy: bool = False, shell_job: bool = False,
                 network_lock: str | None = None, carry: tuple[str, ...] = (),
                 no_carry_rootfs: bool = False) -> Any:
    """The workload a ``TARGET`` string names; ConfigError if it names none."""
    from ctlive.backends import PodmanContainer, Process, RuncContainer

    if text is None and pid is None:
        raise ConfigError("give a TARGET (pid:N, runc:ID or podman:NAME)")
    if text is not None and pid is not None:
        raise ConfigError("give TARGET or --pid, not both")
    kind, _, name = (f"pid:{pid}" if text is None else text).partition(":")
    live_read = False if criu_precopy else None
    if kind == "pid":
        if not name.isdigit():
            raise ConfigError(f"TARGET {text!r}: pid:N takes a process id")
        return Process(int(name), tcp_established=tcp_established, external=external,
                       live_read=live_read, shell_job=shell_job, network_lock=network_lock,
                       carry=carry)
    if not name:
        raise ConfigError(f"TARGET {text!r}: expected pid:N, runc:ID or podman:NAME")
    if external or shell_job or network_lock or carry:
        raise ConfigError("--external, --carry, --shell-job and --network-lock go with a pid: "
                          "TARGET (a container's files and resources come from its config)")
    # Without --tcp-established: the backend's own rule (runc keeps the connections when the
    # container joins a named network namespace).
    extra: dict[str, Any] = {"tcp_established": True} if tcp_established else {}
    if kind == "runc":
        if no_carry_rootfs:
            extra["carry_rootfs"] = False
        return RuncContainer(name, root=runc_root, live_read=not criu_precopy, **extra)
    if no_carry_rootfs:
        raise ConfigError("--no-carry-rootfs goes with a runc: TARGET")
    if kind == "podman":
        return PodmanContainer(name, live_read=not criu_precopy, **extra)
    raise ConfigError(f"TARGET {text!r}: expected pid:N, runc:ID or podman:NAME")


def _migrate(args: argparse.Namespace) -> int:
    from ctlive.attest import SnpPolicy
    from ctlive.cli.config import apply, from_options
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.ops.logs import configure

    apply(args.parser, args, args.argv, "migrate", required=("key", "policy"))
    configure(args.log_level, args.log_format)  # after apply: the file may set them
    workload = parse_target(args.target, pid=args.pid, runc_root=args.runc_root,
                            tcp_established=args.tcp_established,
                            external=tuple(args.external), criu_precopy=args.criu_precopy,
                            shell_job=args.shell_job, network_lock=args.network_lock,
                            carry=tuple(args.carry), no_carry_rootfs=args.no_carry_rootfs)
    identity, policy = Identity.load(args.key), SnpPolicy.from_toml(args.policy)
    convergence = from_options(Convergence, args)
    if args.check:
        return _check(args, workload, identity, policy)
    with _exporter(args.metrics) as metrics:
        return _run(args, workload, identity, policy, convergence, metrics)


def _check(args: argparse.Namespace, workload: Any, identity: Any, policy: Any) -> int:
    """``--check``: the preflight alone; a refusal raises PreflightError (exit code 6)."""
    from ctlive.migration.check import PreflightError, check

    try:
        result = anyio.run(lambda: check(workload, args.destination, identity=identity,
                                         attestation=policy,
                                         connect_timeout=args.connect_timeout))
    except PreflightError as exc:
        if args.json:
            print(json.dumps({"compatible": False, "differences": [
                d.as_dict() for d in exc.differences]}, indent=2))
        else:
            print("not compatible: the destination cannot restore this workload")
            for d in exc.differences:
                print(f"  {'refused' if d.refuse else 'note'} ({d.fact}): {d.message}")
        raise
    if args.json:
        print(json.dumps({"compatible": True, **result.summary()}, indent=2))
    else:
        summary = result.summary()
        print(f"compatible: the destination can restore {workload.kind} "
              f"(kernel {summary['kernel']}, CRIU {summary['criu']})")
        for d in result.differences:
            print(f"  note: {d.message}")
    return 0


@contextlib.contextmanager
def _exporter(listen: str | None) -> Iterator[SourceMetrics | None]:
    """The ``--metrics`` endpoint (None without the flag), closed on exit."""
    if listen is None:
        yield None
        return
    from ctlive.cli.config import check_address
    from ctlive.cli.source_metrics import SourceMetrics
    from ctlive.ops.metrics import MetricsServer

    check_address("--metrics", listen)
    metrics = SourceMetrics()
    server = MetricsServer(metrics.registry, listen)
    try:
        yield metrics
    finally:
        server.close()


def _run(args: argparse.Namespace, workload: Any, identity: Any, policy: Any,
         convergence: Any, metrics: SourceMetrics | None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ctlive.migration.source import migrate

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.json or not sys.stderr.isatty()
                  ) as bar:
        # The bar counts iterations against the cap; the text shows the live figures.
        task = bar.add_task("connect", total=args.max_iterations, info="")

        plain = not args.json and not sys.stderr.isatty()

        def show(ev: Any) -> None:
            if metrics is not None:
                metrics.progress(ev)
            figures = (f"{ev.bytes_done / 1e6:.1f} MB sent, dirty {ev.dirty_rate / 1e6:.1f} "
                       f"MB/s, link {ev.link_rate / 1e6:.0f} MB/s, predicted downtime "
                       f"{ev.predicted_downtime * 1000:.0f} ms")
            if plain:  # not a terminal: one whole line per event, no bar
                print(f"{ev.phase} iteration {ev.iteration}: {figures}", file=sys.stderr,
                      flush=True)
                return
            bar.update(task, completed=min(ev.iteration + 1, args.max_iterations),
                       description=f"{ev.phase} #{ev.iteration}", info=figures)

        try:
            report = anyio.run(lambda: migrate(
                workload, args.destination, identity=identity, attestation=policy,
                convergence=convergence, lanes=args.lanes, cipher=args.cipher,
                on_progress=show, state_dir=args.state, workdir=args.workdir,
                connect_timeout=args.connect_timeout, ready_timeout=args.ready_timeout,
                commit_timeout=args.commit_timeout, abort_timeout=args.abort_timeout,
                progress_timeout=args.progress_timeout))
        except InDoubtError:
            if metrics is not None:
                metrics.finished("in-doubt")
            raise
        except CtliveError:
            if metrics is not None:
                metrics.finished("failed")
            raise
        if metrics is not None:
            metrics.finished("committed", report.downtime)
        bar.update(task, completed=args.max_iterations, description="done")
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(f"migrated {report.migration_id}: downtime {report.downtime * 1000:.0f} ms, "
              f"total {report.total_time:.2f} s, {len(report.iterations)} iterations, "
              f"{report.bytes_on_wire / 1e6:.1f} MB on the wire")
    return 0
