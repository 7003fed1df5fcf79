"""``await ctlive.serve(...)``: the destination receiver, inside the guest.

For each authenticated session it answers the source's preflight, rebuilds every
iteration's image in its state directory (tmpfs: encrypted guest memory inside an SEV-SNP
VM), verifies the final image end to end against the source's manifest, restores the
workload *stopped*, answers READY, and on COMMIT resumes it and answers COMMIT_ACK.
Every decision goes to the journal before it is acted on (docs/operations.md, "The
receiver's journal": until COMMIT the copy never runs, after COMMIT nothing discards it).
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
from prometheus_client import CollectorRegistry

from ctlive import backends
from ctlive.backends.podman import _PodmanRestored
from ctlive.backends.runc import _RuncRestored
from ctlive.backends.workload import process_start_time
from ctlive.errors import (
    CtliveError,
    ImageTooLargeError,
    Phase,
    ReceiverLimitError,
    RemoteProtocolError,
    StorageError,
    map_os_errors,
)
from ctlive.fs import private_dir
from ctlive.identity import Identity
from ctlive.migration import preflight
from ctlive.migration.journal import DestinationState as DS
from ctlive.migration.journal import Entry, Journal, arecord
from ctlive.migration.limits import ReceiverLimits, refusal_code
from ctlive.migration.receiving import MigrationRecord, receive_iterations
from ctlive.migration.spool import EncryptedSpool, check_state_dir, closed_on_error, parse_size
from ctlive.migration.wipe import discard_copy, wipe_images_soon
from ctlive.ops.logs import bind_migration, get_logger
from ctlive.ops.metrics import MetricsServer, ReceiverMetrics, ReceiverObserver
from ctlive.protocol.evidence import EvidenceProvider
from ctlive.protocol.frames import Abort, Commit, CommitAck, MigrationMeta, Outcome, Ready, Resolve
from ctlive.transport.server import serve_sessions
from ctlive.transport.session import Session

__all__ = ["Destination", "DestinationHooks", "MigrationRecord", "ReceiverLimits", "serve"]

log = get_logger("ctlive.destination")
Hook = Callable[[str, dict[str, Any], backends.Restored], Any]


class DestinationHooks(Protocol):
    """Observes (or breaks) the receiver at named stages: ``on_stage(stage)`` runs at
    "mid-iteration", "before-restore", "before-ready" and "before-resume", and what
    it raises fails the migration there. For tests: ``ctlive.testing.hooks.
    FaultHooks`` implements it and documents the stages."""

    def on_stage(self, stage: str) -> None:
        """The receiver reached ``stage``."""


def _handle(restored: backends.Restored) -> dict[str, Any]:
    """What a restarted receiver needs to drive ``restored`` again."""
    return {"pid": restored.pid, "start": process_start_time(restored.pid),
            "container_id": restored._id, "runc_root": getattr(restored, "_root", None),
            "network": getattr(restored, "network", None)}  # a runc netns to announce


def _adopt(kind: str, h: dict[str, Any]) -> backends.Restored | None:
    """The restored copy a journal handle names, if it is still there (its pid not
    reused: the start time matches)."""
    pid = int(h["pid"])
    started = process_start_time(pid)
    if started is None or (h.get("start") is not None and started != h["start"]):
        return None
    if kind == "runc":
        return _RuncRestored(pid, h["runc_root"], h["container_id"], h.get("network"))
    if kind == "podman":
        return _PodmanRestored(pid, container_id=h["container_id"])
    return backends.Restored(pid)


@attrs.define
class _Pending:
    """A READY copy waiting for COMMIT or ABORT."""

    restored: backends.Restored
    kind: str
    spec: dict[str, Any]
    workdir: pathlib.Path
    since: float = attrs.field(factory=time.monotonic)
    alerted: bool = False
    final_at: float | None = None  # when the final iteration ended (for downtime)


class Destination:
    """The receiver behind one ``serve()``: its journal, the copies waiting for COMMIT,
    and the handling of each session (a migration, a COMMIT or an outcome query)."""

    def __init__(self, state_dir: pathlib.Path, *, hooks: DestinationHooks | None = None,
                 external_map: dict[str, str] | None = None,
                 restore_policy: backends.RestorePolicy | None = None,
                 post_restore: Hook | None = None, post_resume: Hook | None = None,
                 ready_alert_after: float = 600.0,
                 discard_ready_after: float | None = None,
                 limits: ReceiverLimits | None = None,
                 registry: CollectorRegistry | None = None,
                 on_refusal: Callable[[str, str], Any] | None = None,
                 spool: EncryptedSpool | None = None) -> None:
        # Plaintext memory images: memory or the open encrypted spool, never a disk.
        check_state_dir(state_dir, spool)
        self.state_dir = private_dir(state_dir)
        self.limits = limits or ReceiverLimits()
        self.max_state_bytes = self.limits.max_state_bytes or int(
            shutil.disk_usage(self.state_dir).total * 0.9)
        self.journal = Journal(self.state_dir, "destination")
        self.external_map = external_map
        self.restore_policy = restore_policy
        self.post_restore, self.post_resume = post_restore, post_resume
        self.ready_alert_after = ready_alert_after
        """Seconds after READY with no COMMIT or ABORT before an alert is raised (the
        copy is kept)."""
        self.discard_ready_after = discard_ready_after
        """If set, an operator's choice to discard READY copies that long after READY
        (None, the default: never)."""
        self.migrations: dict[str, MigrationRecord] = {}
        self._pending: dict[str, _Pending] = {}
        self._aborted: set[str] = set()
        self._locks: dict[str, anyio.Lock] = {}
        self.hooks = hooks
        self.metrics = ReceiverMetrics(registry, in_doubt=lambda: len(self._pending),
                                       state_dir=self.state_dir)
        self.obs = ReceiverObserver(self.metrics, on_refusal)

    def fault(self, stage: str) -> None:
        """Tell ``hooks`` (if any) that the receiver reached ``stage``; what the hook
        raises fails the migration at that point."""
        if self.hooks is not None:
            self.hooks.on_stage(stage)

    def _lock(self, mid: str) -> anyio.Lock:
        return self._locks.setdefault(mid, anyio.Lock())

    async def _record(self, mid: str, state: DS, **data: Any) -> Entry:
        return await arecord(self.journal, mid, state, **data)

    # -- sessions --------------------------------------------------------------------------

    async def handle(self, session: Session) -> None:
        """One authenticated session, whatever it carries."""
        with self.obs.session(session):
            if (first := await preflight.first_frame(session)) is None:
                return  # the source stopped after the preflight (`migrate --check`, refusal)
            mid = first.data.get("id") if isinstance(first, MigrationMeta) else getattr(
                first, "migration_id", None)
            with bind_migration(mid):
                if isinstance(first, Commit):
                    await self.commit(session, first.migration_id)
                elif isinstance(first, Resolve):
                    state = await self.resolve(first.migration_id, first.action)
                    log.info("resolve %s: %s", first.action, state, extra={"state": state})
                    await session.send(Outcome(first.migration_id, state))
                elif isinstance(first, MigrationMeta):
                    await self.receive_migration(session, first)
                else:
                    raise RemoteProtocolError("expected MIGRATION_META, COMMIT or RESOLVE")

    async def receive_iterations(self, session: Session, rec: MigrationRecord,
                                 workdir: pathlib.Path) -> pathlib.Path:
        """Rebuild the migration's images until the final one is verified (also the
        data-plane benchmark's destination side)."""
        return await receive_iterations(session, rec, workdir, self.fault, self._check_size)

    def _active(self) -> list[MigrationRecord]:
        return [r for r in self.migrations.values() if r.state in ("receiving", "restoring")]

    def _check_size(self, rec: MigrationRecord) -> None:
        if rec.image_bytes > self.limits.max_image_bytes:
            raise ImageTooLargeError(
                f"the image of migration {rec.migration_id} passed "
                f"{self.limits.max_image_bytes} bytes, the most this receiver accepts for one "
                "migration", limit="max_image_bytes", phase=Phase.ITERATE)
        in_use = sum(r.image_bytes for r in self._active())
        if in_use > self.max_state_bytes:
            raise ImageTooLargeError(
                f"the images being received take {in_use} bytes, more than the "
                f"{self.max_state_bytes} this receiver's state directory may hold",
                limit="max_state_bytes", phase=Phase.ITERATE)

    async def receive_migration(self, session: Session, meta: MigrationMeta) -> None:
        """A migration from META to READY, then COMMIT or ABORT on the same session."""
        mid = str(meta.data.get("id", ""))
        kind = str(meta.data.get("kind", ""))
        spec = meta.data.get("spec", {})
        if (not mid.isalnum() or len(mid) > 64 or mid in self.migrations
                or self.journal.get(mid) is not None or not isinstance(spec, dict)):
            self.obs.refused("bad-meta")
            await session.send_error("bad-meta", "missing, malformed or duplicate migration id")
            raise RemoteProtocolError(f"bad migration id {mid!r}")
        if len(self._active()) >= self.limits.max_migrations:
            await session.send_error("too-many-migrations",
                                     f"this receiver takes {self.limits.max_migrations} at once")
            raise ReceiverLimitError(f"migration {mid} refused: {self.limits.max_migrations} are "
                                     "already being received", limit="max_migrations")
        rec = self.migrations[mid] = MigrationRecord(mid)
        workdir = self.state_dir / mid
        await self._record(mid, DS.RECEIVING, kind=kind, spec=spec, workdir=str(workdir))
        self.obs.phase(session, "receiving")
        restored: backends.Restored | None = None
        try:
            with map_os_errors(StorageError, f"creating {workdir}", phase=Phase.ITERATE):
                private_dir(workdir)
            final_dir = await self.receive_iterations(session, rec, workdir)
            rec.state = "restoring"
            self.obs.phase(session, "restoring", iterations=rec.iterations)
            self.fault("before-restore")
            t = final_at = time.monotonic()
            restored = await backends.restore(kind, final_dir, spec,
                                              external_map=self.external_map,
                                              policy=self.restore_policy, trees=rec.trees)
            rec.restored_pid = restored.pid
            rec.timings["restore"] = time.monotonic() - t
            wipe_images_soon(workdir)  # the copy runs from memory now, not from its images
            # A crash from here on leaves a stopped copy: the journal must know it, so
            # that a restarted receiver discards it.
            await self._record(mid, DS.RECEIVING, restored=_handle(restored))
            if self.post_restore is not None:
                # Host-side plumbing (addresses, routes) while the workload is still stopped.
                t = time.monotonic()
                await self.post_restore(kind, spec, restored)
                rec.timings["post_restore"] = time.monotonic() - t
            self.fault("before-ready")
            async with self._lock(mid):
                if mid in self._aborted:
                    raise RemoteProtocolError("the source resolved the migration as aborted")
                # Written before READY goes out: from here the copy is kept until COMMIT,
                # ABORT, an abort by RESOLVE, or an operator's discard.
                await self._record(mid, DS.READY, kind=kind, spec=spec,
                                   restored=_handle(restored))
                self._pending[mid] = _Pending(restored, kind, spec, workdir, final_at=final_at)
        except BaseException as exc:
            rec.state, rec.error = "failed", f"{type(exc).__name__}: {exc}"
            self.obs.outcome("failed", rec.error[:200])
            with anyio.CancelScope(shield=True):
                await self._record(mid, DS.DISCARDED, error=rec.error[:500])
                await discard_copy(self.state_dir, mid, restored, kind, spec)
            raise
        rec.state = "ready"
        self.obs.timings(rec.timings, "verify", "restore")
        self.obs.phase(session, "ready")
        await session.send(Ready({"restored_pid": restored.pid, "iterations": rec.iterations,
                                  "timings": dict(rec.timings)}))
        try:
            event = await session.receive()
        except CtliveError:
            log.warning("migration %s: the session broke after READY; its copy stays stopped "
                        "until COMMIT, ABORT or `ctlive discard`", mid)
            raise
        if isinstance(event, Commit):
            await self.commit(session, mid)
        elif isinstance(event, Abort):
            await self.discard(mid, f"the source aborted: {event.reason}")
        else:
            raise RemoteProtocolError(f"expected COMMIT or ABORT, got {type(event).__name__}")

    # -- decisions -------------------------------------------------------------------------

    async def commit(self, session: Session, mid: str) -> None:
        """COMMIT for ``mid`` (on its own session or a fresh one): resume the READY copy
        and acknowledge; idempotent. A failure to resume keeps the copy and is reported
        to the source as an error."""
        async with self._lock(mid):
            entry = self.journal.get(mid)
            pending = self._pending.get(mid)
            if entry is None or entry.state not in (DS.READY, DS.COMMITTED) or (
                    entry.state == DS.READY and pending is None):
                await session.send_error("unknown-migration",
                                         f"no migration {mid} is waiting for COMMIT here")
                return
            rec = self.migrations.setdefault(mid, MigrationRecord(mid, state="ready"))
            if not entry.data.get("resumed"):
                if pending is None:  # committed before a restart, resumed at adoption
                    await session.send_error("resume-failed", f"the copy of {mid} is gone")
                    return
                self.fault("before-resume")
                await self._record(mid, DS.COMMITTED)  # decided: from here never discarded
                try:
                    await self._resume(pending, rec.timings)
                except CtliveError as exc:
                    log.error("migration %s: COMMIT received but the resume failed: %s; the "
                              "copy is kept", mid, exc)
                    await self._record(mid, DS.COMMITTED, resume_error=str(exc)[:500])
                    self.obs.outcome("failed", "resume failed after COMMIT")
                    await session.send_error("resume-failed", str(exc)[:500])
                    return
                await self._record(mid, DS.COMMITTED, resumed=True)
                self.obs.timings(rec.timings, "resume")
                self.obs.outcome("committed", since=pending.final_at)
                self._pending.pop(mid, None)
                shutil.rmtree(pending.workdir, ignore_errors=True)
            rec.state = "committed"
            pid = entry.data.get("restored", {}).get("pid")
            await session.send(CommitAck(mid, {"restored_pid": pid, "timings": dict(rec.timings)}))

    async def _resume(self, p: _Pending, timings: dict[str, float]) -> None:
        t = time.monotonic()
        await p.restored.resume()
        timings["resume"] = time.monotonic() - t
        if self.post_resume is not None:
            # Traffic may move to this copy now (the source's copy is gone).
            t = time.monotonic()
            await self.post_resume(p.kind, p.spec, p.restored)
            timings["post_resume"] = time.monotonic() - t

    async def discard(self, mid: str, reason: str) -> bool:
        """Discard ``mid``'s copy unless it was committed; returns whether it is (now)
        discarded."""
        async with self._lock(mid):
            entry = self.journal.get(mid)
            if entry is not None and entry.state == DS.COMMITTED:
                return False
            self._aborted.add(mid)
            if entry is None or entry.state == DS.DISCARDED:
                return True
            if entry.state == DS.RECEIVING:
                return True  # its session ends it (it checks _aborted before READY)
            with anyio.CancelScope(shield=True):
                await self._record(mid, DS.DISCARDED, reason=reason[:500])
                p = self._pending.pop(mid, None)
                await discard_copy(self.state_dir, mid, p.restored if p else None,
                                   str(entry.data.get("kind", "")), entry.data.get("spec"))
            self.obs.outcome("discarded", reason, migration_id=mid)
            return True

    async def resolve(self, mid: str, action: str) -> str:
        """The answer to a RESOLVE: the migration's state here after ``action``."""
        if action == "abort" and await self.discard(mid, "aborted by the source (resolve)"):
            return "discarded"
        entry = self.journal.get(mid)
        return "unknown" if entry is None else entry.state

    # -- startup and watch -----------------------------------------------------------------

    async def adopt(self) -> list[tuple[str, str]]:
        """After a restart: settle every unfinished journal entry; returns (migration id,
        what was done)."""
        done = []
        for e in self.journal.unfinished():
            mid, kind = e.migration_id, str(e.data.get("kind", ""))
            restored = _adopt(kind, e.data["restored"]) if "restored" in e.data else None
            workdir = self.state_dir / mid
            if e.state == DS.READY and restored is not None:
                self._pending[mid] = _Pending(restored, kind, dict(e.data.get("spec", {})),
                                              workdir)
                done.append((mid, "adopted its READY copy (stopped)"))
            elif e.state == DS.COMMITTED and restored is not None:
                p = _Pending(restored, kind, dict(e.data.get("spec", {})), workdir)
                await self._resume(p, {})
                await self._record(mid, DS.COMMITTED, resumed=True)
                shutil.rmtree(workdir, ignore_errors=True)
                done.append((mid, "resumed its committed copy"))
            elif e.state == DS.COMMITTED:
                log.error("migration %s was committed but its copy is gone", mid)
                await self._record(mid, DS.COMMITTED, resumed=True, lost=True)
                done.append((mid, "committed, but the copy is gone"))
            else:
                await discard_copy(self.state_dir, mid, restored, kind, e.data.get("spec"))
                await self._record(mid, DS.DISCARDED, reason=f"found {e.state} at startup")
                done.append((mid, f"discarded (was {e.state})"))
        keep = {m for m in self._pending}
        for d in self.state_dir.iterdir():  # stale directories of finished migrations
            if d.is_dir() and d.name not in keep | {"bundles", "runc"} and d.name.isalnum():
                shutil.rmtree(d, ignore_errors=True)
        for mid, what in done:
            log.info("migration %s: %s", mid, what)
        return done

    async def watch(self) -> None:
        """Alert on READY copies left waiting, and carry out operators' discards."""
        while True:
            await anyio.sleep(1)
            now = time.monotonic()
            for e in self.journal.in_state(DS.DISCARD_REQUESTED):
                await self.discard(e.migration_id, "discarded by the operator")
            for mid, p in list(self._pending.items()):
                waited = now - p.since
                if self.discard_ready_after is not None and waited > self.discard_ready_after:
                    await self.discard(mid, f"no COMMIT {waited:.0f} s after READY "
                                            "(discard_ready_after)")
                elif waited > self.ready_alert_after and not p.alerted:
                    p.alerted = True
                    log.warning("ALERT migration %s: READY for %.0f s with no COMMIT or ABORT; "
                                "the copy stays stopped (resolve with `ctlive recover` on the "
                                "source, or `ctlive discard`)", mid, waited)


async def serve(
    listen: str | tuple[str, int],
    *,
    identity: Identity,
    provider: EvidenceProvider | None,
    allow: Collection[bytes] | Callable[[bytes], bool],
    state_dir: str | os.PathLike[str] = "/run/ctlive",
    window: int = 64 << 20,
    ready_alert_after: float = 600.0,
    discard_ready_after: float | None = None,
    limits: ReceiverLimits | None = None,
    on_refusal: Callable[[str, str], Any] | None = None,
    on_session_error: Callable[[BaseException], Any] | None = None,
    external_map: dict[str, str] | None = None,
    restore_policy: backends.RestorePolicy | None = None,
    post_restore: Hook | None = None,
    post_resume: Hook | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    hooks: DestinationHooks | None = None,
    metrics: str | tuple[str, int] | None = None,
    registry: CollectorRegistry | None = None,
    spool: str | os.PathLike[str] | None = None,
    spool_size: int | str = "4G",
) -> None:
    """Receive migrations until cancelled; reports ``(host, port)`` via ``task_status``.

    ``provider`` produces this guest's attestation evidence (``ctlive.attest.
    auto_provider()`` in a real guest). ``allow`` lists the source public keys
    accepted. Memory per migration is bounded by ``window`` (bytes in flight). At start
    the receiver settles its journal (``state_dir/journal.sqlite``): READY copies are
    adopted, still stopped. ``ready_alert_after`` (seconds from READY) raises an alert
    for a copy still waiting; ``discard_ready_after`` (default None: never) discards it.
    ``limits`` (:class:`ReceiverLimits`) caps sessions, handshakes in progress,
    migrations, image bytes and state bytes, and times out handshakes and quiet peers;
    each refusal is an ERROR frame with its own code to the peer, is logged (logger
    ``ctlive.destination``) with its reason, and goes to ``on_refusal(reason, peer)``.
    ``restore_policy`` says what a source's restore spec may ask for (None: the
    defaults of ``ctlive.backends.RestorePolicy``).
    ``external_map`` renames external resources (veth outer ends) for this host, and
    ``post_restore(kind, spec, restored)`` is awaited after each restore, while the
    workload is still stopped, for host-side network setup; ``post_resume`` (same
    arguments) right after COMMIT resumed it, to move traffic to it (not earlier: until
    COMMIT the source may still resume its own copy). ``hooks`` is told of each
    stage the receiver reaches (``DestinationHooks``; for tests, ``ctlive.testing.
    hooks.FaultHooks`` breaks it there). The receiver's Prometheus metrics go to
    ``registry`` (default: one of its own; docs/operations.md lists them), served over
    HTTP on ``metrics`` ("HOST:PORT") if given.
    ``state_dir`` must be memory (tmpfs, ramfs), else ConfigError: it holds plaintext
    images. ``spool`` (a file; ``spool_size`` bytes) puts it in an encrypted spool
    instead (docs/backends.md, "Data at rest"), whose key goes when serve() returns.
    """
    enc = EncryptedSpool(spool, parse_size(spool_size)) if spool is not None else None
    with map_os_errors(StorageError, f"creating the state directory {state_dir}"), \
            closed_on_error(enc):
        receiver = Destination(pathlib.Path(state_dir) if enc is None else enc.open() / "state",
                               hooks=hooks, external_map=external_map,
                               restore_policy=restore_policy, post_restore=post_restore,
                               post_resume=post_resume, ready_alert_after=ready_alert_after,
                               discard_ready_after=discard_ready_after, limits=limits,
                               registry=registry, on_refusal=on_refusal, spool=enc)
    exporter = MetricsServer(receiver.metrics.registry, metrics)
    try:
        await receiver.adopt()

        async def handler(session: Session) -> None:
            try:
                await receiver.handle(session)
            except CtliveError as exc:  # images/ and backends/ map OSError to ctlive errors
                code = refusal_code(exc)
                if code != "receiver-failed":
                    receiver.obs.refused(code, detail=str(exc))
                await session.send_error(code, str(exc)[:500])
                if on_session_error is not None:
                    on_session_error(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver.watch)
            lim = receiver.limits

            addr: tuple[str, int] = await tg.start(lambda task_status: serve_sessions(
                listen, identity=identity, provider=provider, allow=allow, handler=handler,
                window=window, handshake_timeout=lim.handshake_timeout,
                idle_timeout=lim.idle_timeout, max_sessions=lim.max_sessions,
                max_handshakes=lim.max_handshakes,
                max_sessions_per_peer=lim.max_sessions_per_peer, on_refusal=receiver.obs.refused,
                task_status=task_status))
            task_status.started(addr)
    finally:
        exporter.close()
        receiver.journal.close()
        if enc is not None:
            enc.close()  # the key goes: whatever is left in the spool is unreadable
