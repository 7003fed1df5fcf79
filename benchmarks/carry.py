"""Filesystem pre-copy: bytes of files carried per iteration and the downtime, for a
process tree with a carried data directory and a runc container with its rootfs carried,
each against the same migration with no files, between two hosts of
``ctlive.testing.hosts`` (the receiver a process of its own inside host B).

    python -m benchmarks.carry [--mib N] [--repeat N]

``--mib``: random data in the process's data directory and in the container's rootfs
(besides busybox; default 64). Prints one JSON line per migration and a table of medians.
Needs root, CRIU, runc and busybox-static.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

SRC_KEY, DST_KEY = bytes(range(1, 33)), bytes(range(33, 65))
APPENDER = ("import sys, time\nf = open(sys.argv[1], 'a', buffering=1)\ni = 0\n"
            "while True:\n    i += 1\n    f.write(f'{i}\\n')\n    time.sleep(0.05)\n")
CONTAINER = "i=0; while true; do i=$((i+1)); echo $i >> /data/lines; sleep 0.05; done"


def _pair(a: Any, b: Any, shared: pathlib.Path, src: dict[str, Any]) -> dict[str, Any]:
    ctl = pathlib.Path(tempfile.mkdtemp(dir=shared))
    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    rx = {"ctl": str(ctl), "platform": str(shared / "platform.pem"), "store": str(shared)}
    receiver = b.popen([*me, "receiver", json.dumps(rx)])
    deadline = time.monotonic() + 30
    while not (ctl / "rx-addr.json").exists():
        if time.monotonic() > deadline or receiver.poll() is not None:
            raise RuntimeError("the receiver did not start")
        time.sleep(0.05)
    cfg = {**src, "ctl": str(ctl), "platform": rx["platform"], "destination": [b.ip, 7788]}
    out = a.run([*me, "source", json.dumps(cfg)], timeout=600)
    receiver.kill()
    receiver.wait()
    result: dict[str, Any] = json.loads((ctl / "src-result.json").read_text())
    if not result["ok"]:
        raise RuntimeError(f"{result} {out.stderr[-2000:]}")
    return result


def _process(net: Any, shared: pathlib.Path, mib: int, carry: bool, n: int) -> dict[str, Any]:
    a, b = net.host(f"pa{n}"), net.host(f"pb{n}")
    data = f"/tmp/data{n}"
    a.run(["mkdir", "-p", data], check=True)
    for i in range(max(mib // 4, 1)):
        a.path(f"{data}/blob{i}").write_bytes(os.urandom(4 << 20))
    target = f"{data}/log" if carry else "/dev/null"
    a.popen(["unshare", "--pid", "--fork", "sh", "-c", f"exec setsid {sys.executable} "
             f"{shared / 'appender.py'} {target} </dev/null >/dev/null 2>&1"],
            start_new_session=True)
    match = f"^{sys.executable} {shared / 'appender.py'} {target}"
    deadline = time.monotonic() + 10
    while not (pids := a.run(["pgrep", "-f", match]).stdout.split()):
        if time.monotonic() > deadline:
            raise RuntimeError("the appender did not start")
        time.sleep(0.05)
    time.sleep(0.5)
    return _pair(a, b, shared, {"kind": "process", "pid": int(pids[0]),
                                "carry": [data] if carry else []})


def _runc(net: Any, shared: pathlib.Path, mib: int, carry: bool, n: int) -> dict[str, Any]:
    a, b = net.host(f"ra{n}"), net.host(f"rb{n}")
    cid = f"bench{os.getpid()}x{n}"
    # Carried: the bundle only in host A's /tmp. Not carried: where both hosts see it,
    # and the receiver's store.
    inside = f"/tmp/{cid}" if carry else str(shared / cid)
    bundle = a.path(inside) if carry else pathlib.Path(inside)
    rootfs = bundle / "rootfs"
    for d in ("bin", "tmp", "proc", "dev", "sys", "data"):
        (rootfs / d).mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for tool in ("sh", "sleep"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (rootfs / "opt").mkdir()
    for i in range(mib // 4):
        (rootfs / "opt" / f"blob{i}").write_bytes(os.urandom(4 << 20))
    a.run(["sh", "-c", f"cd {inside} && runc spec"], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sh", "-c", CONTAINER]
    cfg["root"] = {"path": str(pathlib.Path(inside) / "rootfs"), "readonly": False}
    (bundle / "config.json").write_text(json.dumps(cfg))
    a.run(["sh", "-c", f"runc run --detach --bundle {inside} {cid} </dev/null >/dev/null 2>&1"],
          check=True)
    time.sleep(0.5)
    try:
        return _pair(a, b, shared, {"kind": "runc", "id": cid, "carry": carry})
    finally:
        b.run(["runc", "--root", "/run/ctlive/runc", "delete", "--force", cid])
        for cg in pathlib.Path("/sys/fs/cgroup").glob(f"**/{cid}*"):
            with contextlib.suppress(OSError):
                cg.rmdir()


def main() -> None:
    """Run the four migrations ``--repeat`` times; print each and the medians."""
    from ctlive.attest import SimulatedSnpPlatform
    from ctlive.testing.hosts import Network

    ap = argparse.ArgumentParser(prog="python -m benchmarks.carry")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shared = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-bench-carry-", dir="/var/lib"))
    (shared / "appender.py").write_text(APPENDER)
    SimulatedSnpPlatform(key_file=shared / "platform.pem")
    runs: dict[str, list[dict[str, Any]]] = {}
    cases = [("process, no files", "process", False), (f"process, {args.mib} MiB carried",
                                                        "process", True),
             (f"runc, {args.mib} MiB rootfs in the store", "runc", False),
             (f"runc, {args.mib} MiB rootfs carried", "runc", True)]
    n = 0
    try:
        for _ in range(args.repeat):
            for name, kind, carry in cases:
                n += 1
                with Network(index=230) as net:
                    r = (_process(net, shared, args.mib, carry, n) if kind == "process"
                         else _runc(net, shared, args.mib, carry, n))
                print(json.dumps({"case": name, **r}), flush=True)
                runs.setdefault(name, []).append(r)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    print(f"\n| case | file bytes per iteration (median) | downtime ms (median of "
          f"{args.repeat}) |\n| --- | --- | --- |")
    for name, rs in runs.items():
        per = [int(statistics.median(x)) for x in zip(*(r["file_bytes"] for r in rs),
                                                       strict=False)]
        print(f"| {name} | {per} | {statistics.median(r['downtime'] for r in rs) * 1000:.0f} |")


async def _receiver(cfg: dict[str, Any]) -> None:
    import anyio

    from ctlive.attest import SimulatedSnpPlatform
    from ctlive.backends import RestorePolicy
    from ctlive.identity import Identity
    from ctlive.migration.destination import serve

    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve(
            ("0.0.0.0", 7788), identity=Identity(DST_KEY),
            provider=SimulatedSnpPlatform(key_file=cfg["platform"]),
            allow={Identity(SRC_KEY).public_key}, state_dir="/run/ctlive",
            restore_policy=RestorePolicy(store=cfg["store"]), task_status=task_status))
        (pathlib.Path(cfg["ctl"]) / "rx-addr.json").write_text(json.dumps(list(addr)))
        await anyio.sleep_forever()


async def _source(cfg: dict[str, Any]) -> None:
    import hashlib

    from ctlive.attest import SnpPolicy, SnpVerifier
    from ctlive.attest.verifier import simulated_root
    from ctlive.backends import Process, RuncContainer
    from ctlive.errors import CtliveError
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    verifier = SnpVerifier(SnpPolicy(measurements=[hashlib.sha384(
        b"ctlive simulated guest").digest()]), trusted_roots=[simulated_root(cfg["platform"])])
    workload = (Process(cfg["pid"], carry=cfg["carry"]) if cfg["kind"] == "process"
                else RuncContainer(cfg["id"], carry_rootfs=cfg["carry"]))
    try:
        report = await migrate(
            workload, tuple(cfg["destination"]), identity=Identity(SRC_KEY),
            attestation=verifier, convergence=Convergence(max_iterations=3, max_downtime=0.0),
            state_dir="/run/ctlive-src", connect_timeout=5)
        result: dict[str, Any] = {
            "ok": True, "downtime": report.downtime,
            "file_bytes": [i.file_bytes for i in report.iterations],
            "wire_bytes": [i.wire_bytes for i in report.iterations],
            "phases": {k: round(v, 4) for k, v in report.downtime_phases.items()},
            "destination": report.destination_summary.get("timings", {})}
    except CtliveError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    (pathlib.Path(cfg["ctl"]) / "src-result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("receiver", "source"):
        import anyio

        anyio.run({"receiver": _receiver, "source": _source}[sys.argv[1]],
                  json.loads(sys.argv[2]))
    else:
        main()
