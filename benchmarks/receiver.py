"""The benchmark's destination: ``ctlive.serve()`` in a process of its own, so that its
CPU time and peak RSS are measured apart from the source.

    python -m benchmarks.receiver   (reads one JSON line of settings on stdin)

Settings: ``state`` (directory), ``key`` (hex private key), ``allow`` (hex public
key), ``external_map``, ``plumb`` and ``switch`` (commands run after restore and after
resume). It prints one JSON
line with its address and the simulated platform's ARK/ASK/measurement, serves
until stdin closes, then prints one JSON line of its own figures and exits.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import anyio
from cryptography.hazmat.primitives import serialization

from ctlive.attest import SimulatedSnpPlatform
from ctlive.identity import Identity
from ctlive.migration.destination import serve


def vm(field: str = "VmHWM") -> int:
    """``VmHWM`` (peak resident set) or ``VmRSS`` of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


async def run(cfg: dict[str, Any]) -> None:
    platform = SimulatedSnpPlatform()
    ident = Identity(bytes.fromhex(cfg["key"]))
    async def post_restore(kind: str, spec: dict[str, Any], restored: Any) -> None:
        for cmd in cfg.get("plumb", []):
            await anyio.run_process(cmd)

    async def post_resume(kind: str, spec: dict[str, Any], restored: Any) -> None:
        for cmd in cfg.get("switch", []):
            await anyio.run_process(cmd)

    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve(
            ("127.0.0.1", 0), identity=ident, provider=platform,
            allow={bytes.fromhex(cfg["allow"])}, state_dir=cfg["state"],
            external_map=cfg.get("external_map"), post_restore=post_restore,
            post_resume=post_resume,
            on_session_error=lambda exc: print(f"receiver: {type(exc).__name__}: {exc}",
                                               file=sys.stderr, flush=True),
            task_status=task_status))
        root = platform.trusted_root()
        pem = serialization.Encoding.PEM
        assert root.ask is not None
        print(json.dumps({"addr": list(addr), "ark": root.ark.public_bytes(pem).decode(),
                          "ask": root.ask.public_bytes(pem).decode(),
                          "measurement": platform.measurement.hex(),
                          "rss_idle": vm("VmRSS"),
                          "cpu_idle": cpu_seconds(resource.RUSAGE_SELF)}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes stdin
        tg.cancel_scope.cancel()


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    anyio.run(run, cfg)
    print(json.dumps({"cpu_self": cpu_seconds(resource.RUSAGE_SELF),
                      "cpu_children": cpu_seconds(resource.RUSAGE_CHILDREN),
                      "vm_hwm": vm()}), flush=True)


if __name__ == "__main__":
    main()
