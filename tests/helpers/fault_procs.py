"""The fault matrix's processes: a receiver and a source, each a process of its own so
that a test can SIGKILL it, stopped at a named point until the test has injected its
fault. Run as ``python fault_procs.py receiver|source CONFIG_JSON``; the receiver is
``host_procs.receiver`` (its config described there).

Control files in ``ctl`` (a directory): ``rx-<stage>`` / ``src-<phase>`` mark points
reached; a pause waits for ``rx-go`` / ``src-go``; ``src-cancel`` cancels the migration
from inside (``migrate()`` cancelled, as a scheduler would); ``src-result.json`` and
``rx-addr.json`` carry results back.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import anyio
from host_procs import block_until, receiver, verifier

from ctlive import errors
from ctlive.backends import Process
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence
from ctlive.migration.source import migrate


async def source(cfg: dict[str, Any]) -> None:
    ctl = pathlib.Path(cfg["ctl"])
    scope = anyio.CancelScope()
    result: dict[str, Any] = {"ok": False}

    def progress(ev: Any) -> None:
        (ctl / f"src-{ev.phase}").touch()
        if ev.phase == cfg.get("pause_at"):
            block_until(ctl / "src-go")
        if ev.phase == cfg.get("cancel_at"):
            scope.cancel()

    async def cancel_on_request() -> None:
        while not (ctl / "src-cancel").exists():
            await anyio.sleep(0.02)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_request)
        with scope:
            try:
                report = await migrate(
                    Process(cfg["pid"]), tuple(cfg["destination"]),
                    identity=Identity(bytes.fromhex(cfg["key"])),
                    attestation=verifier(cfg["platform"]),
                    convergence=Convergence(max_iterations=3, max_downtime=0.0),
                    state_dir=cfg["state"], on_progress=progress, connect_timeout=3,
                    ready_timeout=cfg.get("ready_timeout", 10),
                    commit_timeout=cfg.get("commit_timeout", 6),
                    abort_timeout=cfg.get("abort_timeout", 6), progress_timeout=3)
                result = {"ok": True, "restored_pid": report.destination_summary.get(
                    "restored_pid")}
            except errors.CtliveError as exc:
                result = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                          "in_doubt": isinstance(exc, errors.InDoubtError)}
        if scope.cancelled_caught:
            result["cancelled"] = True
        tg.cancel_scope.cancel()
    (ctl / "src-result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    role, conf = sys.argv[1], json.loads(sys.argv[2])
    anyio.run({"receiver": receiver, "source": source}[role], conf,
              backend=conf.get("backend", "asyncio"))
