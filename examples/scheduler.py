"""Embedding ctlive in a scheduler: migrate a workload when a node is drained.

Run on the source host (as root, CRIU installed):

    python examples/scheduler.py PID HOST:PORT source.key policy.toml

It shows the pieces a scheduler uses: the coroutine (here under trio; asyncio works
the same), progress events on a memory channel, a policy file, and the report.
"""

from __future__ import annotations

import sys

import anyio
import trio

import ctlive


async def main(pid: int, destination: str, key: str, policy: str) -> None:
    send, recv = anyio.create_memory_object_stream[ctlive.ProgressEvent](16)

    async def log_progress() -> None:
        async with recv:
            async for ev in recv:
                print(f"[{ev.phase}] iteration {ev.iteration}: {ev.bytes_done / 1e6:.1f} MB, "
                      f"predicted downtime {ev.predicted_downtime * 1000:.0f} ms")

    async with anyio.create_task_group() as tg:
        tg.start_soon(log_progress)
        async with send:
            try:
                report = await ctlive.migrate(
                    ctlive.Process(pid), destination,
                    identity=ctlive.Identity.load(key),
                    attestation=ctlive.SnpPolicy.from_toml(policy),
                    convergence=ctlive.Convergence(max_downtime=0.3, max_iterations=8),
                    progress_channel=send)
            except ctlive.MigrationError as exc:
                # The workload is running on the source again; reschedule later.
                print(f"migration failed in phase {exc.phase}: {exc}", file=sys.stderr)
                return
    print(report.to_json(indent=2))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
