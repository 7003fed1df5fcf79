"""``await ctlive.serve(...)``: the destination receiver, inside the guest.

For each authenticated session it rebuilds every iteration's image in its state
directory (tmpfs: encrypted guest memory inside an SEV-SNP VM), verifies the
final image end to end against the source's manifest, restores the workload
*stopped*, answers READY, and on COMMIT resumes it and answers COMMIT_ACK.

Until COMMIT, the restored copy never runs. ABORT, an error, or a session that
breaks before READY discards everything. A session that breaks *after* READY
leaves the copy stopped and pending for ``commit_grace`` seconds, so that a
source that killed its copy can reconnect and repeat COMMIT; a source that
resumed its copy instead sends ABORT or lets the grace period expire.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs

from ctlive import backends
from ctlive.errors import (
    CtliveError,
    Phase,
    RemoteProtocolError,
    StorageError,
    map_os_errors,
)
from ctlive.identity import Identity
from ctlive.images.changes import decode_change
from ctlive.images.rebuild import Rebuilder
from ctlive.protocol.evidence import EvidenceProvider
from ctlive.protocol.frames import (
    Abort,
    Change,
    Commit,
    CommitAck,
    Error,
    IterationBegin,
    IterationEnd,
    MigrationMeta,
    Ready,
    Reassembler,
)
from ctlive.transport.server import serve_sessions
from ctlive.transport.session import Session

__all__ = [
    "Destination",
    "DestinationHooks",
    "MigrationRecord",
    "serve",
]



class DestinationHooks(Protocol):
    """Observes (or breaks) the receiver at named stages: ``on_stage(stage)`` runs at
    "mid-iteration", "before-restore", "before-ready" and "before-resume", and what
    it raises fails the migration there. For tests: ``ctlive.testing.hooks.
    FaultHooks`` implements it and documents the stages."""

    def on_stage(self, stage: str) -> None:
        """The receiver reached ``stage``."""


@attrs.define
class MigrationRecord:
    """What the receiver knows about one migration (``Destination.migrations``)."""

    migration_id: str
    state: str = "receiving"
    iterations: int = 0
    bytes_received: int = 0
    started: float = attrs.field(factory=time.monotonic)
    restored_pid: int | None = None
    error: str | None = None
    timings: dict[str, float] = attrs.field(factory=dict)
    """Seconds spent in the final phase: ``verify`` (completing and checking the last
    image once its last item arrived), ``restore``, ``post_restore``, ``resume``,
    ``post_resume``."""


class Destination:
    """The receiver behind one ``serve()``: the state its sessions share (migrations,
    copies waiting for COMMIT) and the handling of each session (rebuild, verify,
    restore stopped, resume on COMMIT)."""

    def __init__(self, state_dir: pathlib.Path, commit_grace: float,
                 hooks: DestinationHooks | None = None,
                 external_map: dict[str, str] | None = None,
                 post_restore: Callable[[str, dict[str, Any], backends.Restored], Any]
                 | None = None,
                 post_resume: Callable[[str, dict[str, Any], backends.Restored], Any]
                 | None = None) -> None:
        self.state_dir = state_dir
        self.external_map = external_map
        self.post_restore = post_restore
        self.post_resume = post_resume
        self._specs: dict[str, tuple[str, dict[str, Any]]] = {}
        self.commit_grace = commit_grace
        self.migrations: dict[str, MigrationRecord] = {}
        self._pending: dict[str, tuple[backends.Restored, pathlib.Path]] = {}
        self.hooks = hooks

    def fault(self, stage: str) -> None:
        """Tell ``hooks`` (if any) that the receiver reached ``stage``; what the hook
        raises fails the migration at that point."""
        if self.hooks is not None:
            self.hooks.on_stage(stage)

    async def handle(self, session: Session) -> None:
        first = await session.receive()
        if isinstance(first, Commit):
            await self._resume_pending(session, first.migration_id)
            return
        if not isinstance(first, MigrationMeta):
            raise RemoteProtocolError("expected MIGRATION_META")
        mid = str(first.data.get("id", ""))
        kind = str(first.data.get("kind", ""))
        spec = first.data.get("spec", {})
        if not mid.isalnum() or len(mid) > 64 or mid in self.migrations:
            await session.send_error("bad-meta", "missing, malformed or duplicate migration id")
            raise RemoteProtocolError(f"bad migration id {mid!r}")
        rec = MigrationRecord(mid)
        self.migrations[mid] = rec
        workdir = self.state_dir / mid
        with map_os_errors(StorageError, f"creating {workdir}", phase=Phase.ITERATE):
            workdir.mkdir(parents=True)
        restored: backends.Restored | None = None
        handed_over = False
        try:
            final_dir = await self.receive_iterations(session, rec, workdir)
            rec.state = "restoring"
            self.fault("before-restore")
            t = time.monotonic()
            restored = await backends.restore(kind, final_dir, spec,
                                              external_map=self.external_map)
            rec.restored_pid = restored.pid
            rec.timings["restore"] = time.monotonic() - t
            if self.post_restore is not None:
                # Host-side plumbing (addresses, routes) while the workload is still stopped.
                t = time.monotonic()
                await self.post_restore(kind, spec, restored)
                rec.timings["post_restore"] = time.monotonic() - t
            self.fault("before-ready")
            await session.send(Ready({"restored_pid": restored.pid,
                                      "iterations": rec.iterations,
                                      "timings": dict(rec.timings)}))
            rec.state = "ready"
            try:
                event = await session.receive()
            except CtliveError:
                # The source may have killed its copy: keep ours stopped for a while.
                self._pending[mid] = (restored, workdir)
                self._specs[mid] = (kind, spec)
                handed_over = True
                rec.state = "commit-pending"
                raise
            if isinstance(event, Commit):
                self.fault("before-resume")
                await self._resume(kind, spec, restored, rec.timings)
                handed_over = True
                rec.state = "committed"
                await session.send(CommitAck(mid, {"restored_pid": restored.pid,
                                                   "timings": dict(rec.timings)}))
                shutil.rmtree(workdir, ignore_errors=True)
                return
            if isinstance(event, Abort):
                rec.state = "aborted"
                return
            raise RemoteProtocolError(f"expected COMMIT or ABORT, got {type(event).__name__}")
        except BaseException as exc:
            if rec.state not in ("committed", "commit-pending"):
                rec.state = "failed" if rec.state != "aborted" else "aborted"
                rec.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if not handed_over:
                with anyio.CancelScope(shield=True):
                    if restored is not None:
                        await restored.discard()
                    shutil.rmtree(workdir, ignore_errors=True)

    async def receive_iterations(self, session: Session, rec: MigrationRecord,
                                 workdir: pathlib.Path) -> pathlib.Path:
        """Rebuild each iteration's image under ``workdir`` until the final one, which
        is verified against its manifest; returns its directory."""
        prev: pathlib.Path | None = None
        hashes: dict[str, bytes] = {}
        while True:
            event = await session.receive()
            if isinstance(event, Abort):
                raise RemoteProtocolError(f"the source aborted: {event.reason}")
            if isinstance(event, Error):
                raise RemoteProtocolError(f"the source failed: {event.message}")
            if not isinstance(event, IterationBegin):
                raise RemoteProtocolError(f"expected ITERATION_BEGIN, got {event!r}")
            out = workdir / f"img-{event.index}"
            # The previous image is discarded: patch it in place, and re-hash only what
            # changed when verifying.
            rb = Rebuilder(prev, out, consume_old=True, old_hashes=hashes)
            frags = Reassembler()
            try:
                while True:
                    ev = await session.receive()
                    if isinstance(ev, IterationEnd):
                        break
                    if not isinstance(ev, Change):
                        raise RemoteProtocolError(f"unexpected {type(ev).__name__} in iteration")
                    rec.bytes_received += len(ev.data)
                    item = frags.feed(ev.lane, ev.data)
                    if item is not None:
                        await anyio.to_thread.run_sync(rb.apply, decode_change(item))
                    await session.grant(len(ev.data))
                    if event.index == 1:
                        self.fault("mid-iteration")
                frags.end_iteration()
                t = time.monotonic()
                await anyio.to_thread.run_sync(rb.finish)
                if ev.final:
                    rec.timings["verify"] = time.monotonic() - t
                hashes = rb.page_hashes
            finally:
                rb.close()
            if prev is not None:
                shutil.rmtree(prev, ignore_errors=True)
            prev = out
            rec.iterations += 1
            if ev.final:
                return out

    async def _resume_pending(self, session: Session, mid: str) -> None:
        entry = self._pending.pop(mid, None)
        rec = self.migrations.get(mid)
        if entry is None or rec is None:
            if rec is not None and rec.state == "committed":
                await session.send(CommitAck(mid, {"restored_pid": rec.restored_pid}))
                return
            await session.send_error("unknown-migration",
                                     f"no migration {mid} is waiting for COMMIT here")
            return
        restored, workdir = entry
        kind, spec = self._specs.pop(mid, ("", {}))
        await self._resume(kind, spec, restored, rec.timings)
        rec.state = "committed"
        await session.send(CommitAck(mid, {"restored_pid": restored.pid,
                                           "timings": dict(rec.timings)}))
        shutil.rmtree(workdir, ignore_errors=True)

    async def _resume(self, kind: str, spec: dict[str, Any], restored: backends.Restored,
                      timings: dict[str, float]) -> None:
        t = time.monotonic()
        await restored.resume()
        timings["resume"] = time.monotonic() - t
        if self.post_resume is not None:
            # Traffic may move to this copy now (the source's copy is gone).
            t = time.monotonic()
            await self.post_resume(kind, spec, restored)
            timings["post_resume"] = time.monotonic() - t

    async def expire_pending(self) -> None:
        """Discard READY copies whose COMMIT never came, after the grace period."""
        while True:
            await anyio.sleep(1)
            now = time.monotonic()
            for mid in list(self._pending):
                rec = self.migrations[mid]
                if now - rec.started > self.commit_grace:
                    restored, workdir = self._pending.pop(mid)
                    self._specs.pop(mid, None)
                    await restored.discard()
                    shutil.rmtree(workdir, ignore_errors=True)
                    rec.state = "expired"


async def serve(
    listen: str | tuple[str, int],
    *,
    identity: Identity,
    provider: EvidenceProvider | None,
    allow: Collection[bytes] | Callable[[bytes], bool],
    state_dir: str | os.PathLike[str] = "/run/ctlive",
    window: int = 64 << 20,
    commit_grace: float = 600.0,
    on_session_error: Callable[[BaseException], Any] | None = None,
    external_map: dict[str, str] | None = None,
    post_restore: Callable[[str, dict[str, Any], backends.Restored], Any] | None = None,
    post_resume: Callable[[str, dict[str, Any], backends.Restored], Any] | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    hooks: DestinationHooks | None = None,
) -> None:
    """Receive migrations until cancelled; reports ``(host, port)`` via ``task_status``.

    ``provider`` produces this guest's attestation evidence (``ctlive.attest.
    auto_provider()`` in a real guest). ``allow`` lists the source public keys
    accepted. Memory per migration is bounded by ``window`` (bytes in flight).
    ``external_map`` renames external resources (veth outer ends) for this host, and
    ``post_restore(kind, spec, restored)`` is awaited after each restore, while the
    workload is still stopped, for host-side network setup; ``post_resume`` (same
    arguments) right after COMMIT resumed it, to move traffic to it (not earlier: until
    COMMIT the source may still resume its own copy). ``hooks`` is told of each
    stage the receiver reaches (``DestinationHooks``; for tests, ``ctlive.testing.
    hooks.FaultHooks`` breaks it there).
    """
    root = pathlib.Path(state_dir)
    with map_os_errors(StorageError, f"creating the state directory {root}"):
        root.mkdir(parents=True, exist_ok=True)
    receiver = Destination(root, commit_grace, hooks, external_map, post_restore, post_resume)

    async def handler(session: Session) -> None:
        try:
            await receiver.handle(session)
        except CtliveError as exc:  # images/ and backends/ map OSError to ctlive errors
            await session.send_error("receiver-failed", str(exc)[:500])
            if on_session_error is not None:
                on_session_error(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver.expire_pending)
        addr: tuple[str, int] = await tg.start(lambda task_status: serve_sessions(
            listen, identity=identity, provider=provider, allow=allow, handler=handler,
            window=window, task_status=task_status))
        task_status.started(addr)
