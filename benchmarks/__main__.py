"""The benchmark suite: downtime, bytes on the wire and speed, ctlive side by side with
the alternatives, in one run on the same workloads.

    python -m benchmarks [--quick] [--write] [--repeat N] [--skip SECTION ...]

Sections (see benchmarks/RESULTS.md for what each measures and the targets):
  tools      every workload migrated by the floor (local dump + restore), CRIU
             page-server, podman export/import, and ctlive (lanes 1/2, both ciphers)
  sweep      the mutating workload across dirty rates and bytes per dirtied page
  sizes      256 MiB to 4 GiB: downtime and the receiver's peak RSS
  dataplane  ctlive's pipeline over a corpus of real dumps, against a plain copy

``--quick`` runs every section on tiny workloads (for CI; its figures mean nothing).
``--write`` stores results.json, the plots and RESULTS.md in benchmarks/.
Needs root, CRIU, podman and redis-server (scripts/install-criu).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import anyio
import attrs

from benchmarks import dataplane, tools
from benchmarks.workloads import MutatingService, RedisService, have_redis, in_podman
from ctlive.testing.memory import podman_memory_store
from ctlive.testing.workloads import SampleService

HERE = pathlib.Path(__file__).resolve().parent
CTLIVE_CONFIGS = [(1, "AESGCM"), (2, "AESGCM"), (1, "ChaChaPoly"), (2, "ChaChaPoly")]


@attrs.frozen
class Spec:
    """A workload to start: kind ("mutating" or "redis"), size and mutation."""

    kind: str
    mib: int
    dirty: float = 0.05
    touch: int = 64

    def start(self, work: pathlib.Path, net: int, podman: bool = False) -> SampleService:
        cls: type[SampleService] = RedisService if self.kind == "redis" else MutatingService
        if podman:
            cls = in_podman(cls)
        if self.kind == "redis":
            return cls(work, net, self.mib)
        return cls(work, net, self.mib, dirty=self.dirty, touch=self.touch)

    def label(self) -> str:
        if self.kind == "redis":
            return f"redis {self.mib} MiB"
        return f"mutating {self.mib} MiB, {self.dirty:.0%}/s x {self.touch} B"


class Runner:
    """Starts a fresh workload for every measurement and keeps every row."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self.net = 209
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-bench-", dir="/var/tmp"))

    def one(self, spec: Spec, tool: str) -> tools.Row:
        self.net = 210 + (self.net - 209) % 40
        svc = spec.start(self.work, self.net, podman=tool == "podman")
        try:
            time.sleep(self.settle)  # let the mutator reach its rate
            label = spec.label()
            if tool == "floor":
                return tools.floor(svc, label)
            if tool == "page-server":
                return tools.page_server(svc, label)
            if tool == "podman":
                return tools.podman(svc, label)
            lanes, cipher = tool.split("/")
            return anyio.run(functools.partial(tools.ctlive_run, svc, label, lanes=int(lanes),
                                               cipher=cipher))
        except Exception as exc:  # a failed tool is a row with its error, not a crash
            return tools.Row(tool, spec.label(), errors=[f"{type(exc).__name__}: {exc}"[:400]])
        finally:
            svc.cleanup()

    def medians(self, spec: Spec, names: list[str], repeat: int) -> list[tools.Row]:
        """Each tool ``repeat`` times, interleaved (tool after tool, then again), so that
        drift in the machine's speed spreads over all tools; the median row of each."""
        runs: dict[str, list[tools.Row]] = {n: [] for n in names}
        for _ in range(repeat):
            for name in names:
                runs[name].append(self.one(spec, name))
        out = []
        for name in names:
            good = [r for r in runs[name] if not r.errors] or runs[name]
            good.sort(key=lambda r: r.downtime)
            best = good[len(good) // 2]
            if len(good) > 1:
                gaps = ", ".join(f"{r.downtime:.3f}" for r in good)
                best.errors = [*best.errors, f"median of {len(good)}; downtimes {gaps}"]
            print(f"  {spec.label()}: {best.tool}: gap {best.downtime:.3f} s, total "
                  f"{best.total:.2f} s, wire {best.wire / 1e6:.1f} MB, dst RSS "
                  f"{best.rss_dst / 2**20:.0f} MiB {best.errors or ''}", flush=True)
            out.append(best)
        return out


def ctlive_tool(lanes: int, cipher: str) -> str:
    return f"{lanes}/{cipher}"


def section_tools(run: Runner, specs: list[Spec], configs: list[tuple[int, str]],
                  repeat: int) -> list[tools.Row]:
    rows = []
    for spec in specs:
        names = ["floor", "page-server", "podman"] + [ctlive_tool(n, c) for n, c in configs]
        rows += run.medians(spec, names, repeat)
    return rows


def memory_speed(mib: int = 1024) -> dict[str, float]:
    """GB/s writing ``mib`` MiB into tmpfs with memory freed a moment ago ("recycled")
    and with memory freed seconds ago ("cold"). On a VM that hands freed memory back to
    its host (free page reporting), the two differ several-fold, and every dump,
    rebuild and restore writes at one speed or the other."""
    import time as _time

    from benchmarks.tools import drop_tmpfs, private_tmpfs

    d = private_tmpfs("memspeed", size=f"{mib + 64}m")
    block = os.urandom(1 << 20)
    speeds: dict[str, float] = {}

    def write() -> float:
        t = _time.perf_counter()
        with open(d / "x", "wb") as f:
            for _ in range(mib):
                f.write(block)
        took = _time.perf_counter() - t
        (d / "x").unlink()
        return mib * 2**20 / took / 1e9

    try:
        write()
        speeds["recycled"] = write()
        _time.sleep(5)
        speeds["cold"] = write()
    finally:
        drop_tmpfs(d)
    return speeds


def machine() -> dict[str, str]:
    import platform
    import subprocess

    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = pathlib.Path("/proc/meminfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
               "?")
    mem = next((ln.split()[1] for ln in meminfo if ln.startswith("MemTotal")), "0")
    from ctlive.backends.criu import find_criu

    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{int(mem) / 2**20:.1f} GiB",
            "kernel": platform.release(), "criu": str(find_criu().version),
            "podman": out(["podman", "--version"]),
            "redis": out(["redis-server", "--version"]).split(" sha")[0],
            "python": platform.python_version(),
            "memory_speed": ", ".join(f"{k} {v:.1f} GB/s" for k, v in memory_speed().items())
            + " (1 GiB)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--write", action="store_true", help="write results.json, plots, "
                    "RESULTS.md")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row (median)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tools", "sweep", "sizes",
                                                               "dataplane"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 2048, 4096])
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark suite needs root (CRIU)")
    q = args.quick
    run = Runner(settle=0.5 if q else 1.0)
    res: dict[str, Any] = {"machine": machine(), "quick": q,
                           "command": "python -m benchmarks " + " ".join(
                               a for a in (argv or __import__("sys").argv[1:])),
                           "date": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        if "tools" not in args.skip:
            # The podman rows use a store on memory, as a receiver needs (on a disk its
            # graph root would keep the restored container and the unpacked checkpoint).
            stack.enter_context(podman_memory_store("bench-podman-"))
            print("== tools: every workload, every tool", flush=True)
            specs = ([Spec("mutating", 16)] if q else
                     [Spec("mutating", 256), Spec("mutating", 1024)])
            if have_redis():
                specs.append(Spec("redis", 16 if q else 256))
            configs = [(1, "AESGCM"), (2, "ChaChaPoly")] if q else CTLIVE_CONFIGS
            res["tools"] = [attrs.asdict(r) for r in
                            section_tools(run, specs, configs, args.repeat)]
        if "sweep" not in args.skip:
            print("== sweep: dirty rate x bytes per dirtied page", flush=True)
            grid = ([(0.5, 4096)] if q else
                    [(d, t) for d in (0.01, 0.1, 0.5) for t in (16, 4096)])
            mib = 16 if q else 256
            rows = []
            for dirty, touch in grid:
                spec = Spec("mutating", mib, dirty, touch)
                rows += run.medians(spec, ["floor", ctlive_tool(1, "AESGCM")], args.repeat)
            res["sweep"] = [attrs.asdict(r) for r in rows]
        if "sizes" not in args.skip:
            print("== sizes: downtime and receiver peak RSS against image size", flush=True)
            rows = []
            for mib in ([16, 48] if q else args.sizes):
                rows += run.medians(Spec("mutating", mib), ["floor", ctlive_tool(1, "AESGCM")], 1)
            res["sizes"] = [attrs.asdict(r) for r in rows]
        if "dataplane" not in args.skip:
            print("== dataplane: ctlive's pipeline against a plain loopback copy", flush=True)
            res["dataplane"] = (dataplane.run(16, dumps=3, ciphers=("AESGCM",)) if q
                                else dataplane.run(256, dumps=4))
    finally:
        stack.close()
        shutil.rmtree(run.work, ignore_errors=True)
    res["seconds"] = time.monotonic() - t0
    from benchmarks.report import render

    text, failures = render(res, HERE / "results" if args.write else None)
    print(text)
    if args.write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "results.json").write_text(json.dumps(res, indent=1))
        (HERE / "RESULTS.md").write_text(text)
        print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'results'}/")
        if not q:
            from benchmarks.report import update_readme

            if update_readme(res, HERE.parent / "README.md"):
                print("updated README.md's headline table")
    if failures:
        raise SystemExit(f"rows failed: {failures}")


if __name__ == "__main__":
    main()
