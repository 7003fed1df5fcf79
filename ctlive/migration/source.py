"""``await ctlive.migrate(...)``: iterative pre-copy with two-phase commit, source side.

One :class:`_Migration` runs one migration; its methods are the phases, in order: connect,
attest and preflight (no image byte leaves before both pass), iterate (dump while running,
diff, send), final-dump (the workload stops here) and send, restore (the destination's
READY), commit (kill the source copy, COMMIT until COMMIT_ACK). Each :class:`Phase
<ctlive.errors.Phase>` is announced in a progress event and names the phase of an error.

Failure rules (the source never loses its workload):

- before the source kills its copy, any failure, timeout or cancellation resumes
  the source (shielded from cancellation) and tells the destination to ABORT;
- after it killed its copy, COMMIT is repeated, on a new session if the old one
  broke, until the destination acknowledges or ``commit_timeout`` passes. It is
  never guessed at: a destination holding a READY copy resumes only on COMMIT.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from ctlive.attest import SnpPolicy, SnpVerifier
from ctlive.backends import Workload
from ctlive.errors import (
    AttestationError,
    CtliveError,
    InDoubtError,
    MigrationError,
    Phase,
    RemoteProtocolError,
)
from ctlive.fs import private_dir, private_tempdir, tighten_tree
from ctlive.identity import Identity
from ctlive.images.chain import flatten, has_parent_pages
from ctlive.images.diff import DiffStats
from ctlive.migration import preflight
from ctlive.migration.convergence import Convergence, ConvergencePolicy
from ctlive.migration.iteration import send_iteration, tree_sender
from ctlive.migration.journal import Journal, SourceState, arecord
from ctlive.migration.recovery import (
    DEFAULT_SOURCE_STATE,
    GONE,
    cleanup_workdir,
    commit_on_new_sessions,
    commit_until_acked,
    confirm_abort,
    workload_handle,
)
from ctlive.migration.report import Decision, IterationReport, MigrationReport, ProgressEvent
from ctlive.ops.logs import bind, get_logger, peer_name
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import Abort, Error, MigrationMeta, Ready
from ctlive.protocol.handshake import Cipher
from ctlive.transport.client import open_session
from ctlive.transport.session import Session

__all__ = ["migrate"]

log = get_logger("ctlive.source")


def _work_base() -> str | None:
    # Not /dev/shm or another tmpfs: CRIU archives the tmpfs mounts a workload can see,
    # so dumps kept there would end up inside the next dump (and in the restored
    # workload). The page cache keeps a disk directory fast.
    return "/var/tmp" if os.path.isdir("/var/tmp") else None


class _Migration:
    """One migration from the source's side; ``run()`` drives the phases."""

    def __init__(self, source: Workload, destination: str | tuple[str, int], *,
                 identity: Identity, verifier: EvidenceVerifier, policy: ConvergencePolicy,
                 lanes: int, cipher: Cipher,
                 on_progress: Callable[[ProgressEvent], Any] | None,
                 progress_channel: MemoryObjectSendStream[ProgressEvent] | None,
                 workdir: str | os.PathLike[str] | None, connect_timeout: float,
                 ready_timeout: float, commit_timeout: float, abort_timeout: float,
                 progress_timeout: float, journal: Journal) -> None:
        self.source, self.destination = source, destination
        self.identity, self.verifier, self.policy = identity, verifier, policy
        self.lanes, self.cipher = lanes, cipher
        self.on_progress, self.progress_channel = on_progress, progress_channel
        self.connect_timeout = connect_timeout
        self.ready_timeout, self.commit_timeout = ready_timeout, commit_timeout
        self.abort_timeout, self.progress_timeout = abort_timeout, progress_timeout
        self.journal = journal
        self.state = SourceState.STARTED
        self.mid = uuid.uuid4().hex
        self.own_dir = workdir is None
        self.root = private_tempdir("ctlive-src-", _work_base()) if workdir is None else \
            private_dir(workdir)
        self.phase = Phase.CONNECT
        self.stopped = self.killed = False
        self.iterations: list[IterationReport] = []
        self.decisions: list[Decision] = []
        self.intervals: list[float] = []
        self.dest_summary: dict[str, Any] = {}
        self.attest_summary: dict[str, Any] = {}
        self.downtime_phases: dict[str, float] = {}
        self.wire_total = 0
        self.trees = tree_sender(source)  # carried files, pre-copied with the memory
        self.t_start = self.t_freeze = time.monotonic()

    async def _send_watched(self, s: Session, k: int, final: bool,
                            prev: pathlib.Path | None, d: pathlib.Path,
                            lane_rr: int) -> tuple[DiffStats, int]:
        """``send_iteration``, failed when no byte moved for ``progress_timeout`` seconds
        (a stalled or partitioned network would otherwise hold the migration forever)."""
        result: tuple[DiffStats, int] | None = None
        failure: BaseException | None = None
        stalled = False
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal stalled
                last, since = s.statistics().bytes_sent, time.monotonic()
                while True:
                    await anyio.sleep(min(1.0, self.progress_timeout / 4))
                    now = s.statistics().bytes_sent
                    if now != last:
                        last, since = now, time.monotonic()
                    elif time.monotonic() - since > self.progress_timeout:
                        stalled = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            try:
                result = await send_iteration(s, k, final, prev, d, lane_rr, self.trees)
            except Exception as exc:  # re-raised below, outside the task group
                failure = exc
            tg.cancel_scope.cancel()
        if stalled:
            raise MigrationError(f"no progress for {self.progress_timeout:.0f} s: the network "
                                 "to the destination is stalled", phase=self.phase)
        if failure is not None:
            raise failure
        assert result is not None
        return result

    # -- the journal -----------------------------------------------------------------------

    async def record(self, state: SourceState, **data: Any) -> None:
        """Write ``state`` down (durably) before acting on it."""
        self.state = state
        await arecord(self.journal, self.mid, state, **data)

    # -- progress --------------------------------------------------------------------------

    async def progress(self, phase: Phase, bytes_done: int = 0,
                       decision: Decision | None = None) -> None:
        """Enter ``phase`` and tell the caller."""
        self.phase = phase
        log.info("phase %s", phase, extra={"phase": str(phase), "bytes": bytes_done or None})
        inputs = decision.inputs if decision is not None else {}
        ev = ProgressEvent(
            phase, max(len(self.iterations) - 1, 0), bytes_done,
            int(inputs.get("predicted_wire_bytes", 0)), inputs.get("dirty_rate", 0.0),
            inputs.get("link_rate", 0.0),
            decision.predicted_downtime if decision is not None else 0.0)
        if self.on_progress is not None:
            self.on_progress(ev)
        if self.progress_channel is not None:
            # Never wait for a slow consumer (the workload may be frozen): an event that
            # finds the channel's buffer full is dropped; the next one says where it is.
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError):
                self.progress_channel.send_nowait(ev)

    # -- the phases ------------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        """The whole migration; on failure the source workload runs again (or, after it
        was killed, COMMIT was confirmed) before the exception leaves."""
        await self.record(SourceState.STARTED, destination=_address(self.destination),
                          cipher=self.cipher, kind=self.source.kind,
                          workload=workload_handle(self.source), workdir=str(self.root),
                          own_workdir=self.own_dir)
        await anyio.to_thread.run_sync(self._clean_stale)
        keep_dir = False
        try:
            await self.progress(Phase.CONNECT)
            async with open_session(self.destination, identity=self.identity,
                                    verifier=self.verifier, lanes=self.lanes,
                                    cipher=self.cipher, timeout=self.connect_timeout,
                                    hello={"migration_id": self.mid}) as s:
                try:
                    await self.attested(s)
                    await self.iterate(s)
                    await self.await_ready(s)
                    await self.commit(s)
                    self.wire_total = (s.statistics().bytes_sent
                                       + s.statistics().bytes_received)
                except BaseException as exc:
                    if not self.killed:
                        await self._tell_abort(s, exc)
                    raise
        except BaseException as exc:
            if self.state is not SourceState.DECIDED_COMMIT:
                # In doubt, the final checkpoint stays: `ctlive recover` may resume from it.
                keep_dir = not await self._abandon(exc)
                raise
            await self._finish_commit(exc)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise  # the move is complete, but the caller was cancelled
        finally:
            if self.own_dir and not keep_dir:
                shutil.rmtree(self.root, ignore_errors=True)
        t_done = time.monotonic()
        log.info("migration committed: downtime %.0f ms", (t_done - self.t_freeze) * 1000,
                 extra={"outcome": "committed", "seconds": round(t_done - self.t_freeze, 4)})
        await self.progress(Phase.DONE, self.wire_total)
        return self.report(t_done)

    def _clean_stale(self) -> None:
        """Work directories that crashed runs left behind, once their journal entry is
        settled (an unsettled one may still need its final checkpoint to resume)."""
        for e in self.journal.entries():
            if e.finished and e.migration_id != self.mid:
                cleanup_workdir(dict(e.data))

    async def attested(self, s: Session) -> None:
        """Record what the verifier established, run the preflight, say what is migrated."""
        await self.progress(Phase.ATTEST)
        await self.record(SourceState.ATTESTED)
        att = s.attestation
        if att is not None:
            self.attest_summary = {"platform": att.platform, "insecure": att.insecure,
                                   "measurement": att.measurement.hex(), **att.details}
        log.log(30 if att is None or att.insecure else 20, "destination %s attested: %s",
                peer_name(s.remote_static), "accepted" if att else "no evidence",
                extra={"peer": peer_name(s.remote_static), "verdict": "accepted",
                       "platform": att.platform if att else None,
                       "insecure": att.insecure if att else None})
        await self.progress(Phase.PREFLIGHT)
        self.preflight = await preflight.exchange(s, self.source)  # refusals raise here
        getattr(self.source, "use_destination_facts", lambda _: None)(self.preflight.destination)
        await s.send(MigrationMeta({"id": self.mid, "kind": self.source.kind,
                                    "spec": self.source.restore_spec()}))

    async def iterate(self, s: Session) -> None:
        """Pre-copy iterations until the policy says the next dump is final, then the
        final dump and its send."""
        await self.record(SourceState.ITERATING)
        prev: pathlib.Path | None = None  # the last dump, CRIU's parent for a pre-dump
        held: pathlib.Path | None = None  # the image the destination holds (flat)
        last_dump_at = 0.0
        k = 0
        lane_rr = 0
        while True:
            final = k + 1 >= getattr(self.policy, "max_iterations", 1 << 30) or (
                bool(self.decisions) and self.decisions[-1].final_next)
            d = self.root / f"dump-{k}"
            now = time.monotonic()
            self.intervals.append(now - last_dump_at if k else 0.0)
            last_dump_at = now
            if final:
                await self.progress(Phase.FINAL_DUMP, s.statistics().bytes_sent)
                # Written before the dump that stops the workload: a crash from here on
                # leaves it stopped, and the journal says how to resume it.
                await self.record(SourceState.FROZEN, final_dump=str(d))
                self.t_freeze = time.monotonic()
                self.stopped = True  # from here on, failure means resume
            else:
                self.phase = Phase.ITERATE
            res = await self.source.dump(d, final=final, parent=prev)
            # CRIU, runc and podman write with their own umask: the images are ours alone.
            await anyio.to_thread.run_sync(tighten_tree, d)
            image = d
            if await anyio.to_thread.run_sync(has_parent_pages, d):
                # An incremental pre-dump: resolve its PE_PARENT runs from the image the
                # destination holds, so the diff sees the pages it really has.
                image = self.root / f"flat-{k}"
                await anyio.to_thread.run_sync(flatten, d, held, image)
            t_send = time.monotonic()
            if final:
                await self.progress(Phase.SEND, s.statistics().bytes_sent)
                # From here the destination may reach READY: resume only after it
                # confirmed the abort. (The podman backend's final archive is known now.)
                await self.record(SourceState.FINAL_SENT, workload=workload_handle(self.source))
            wire_before = s.statistics().bytes_sent
            st, lane_rr = await self._send_watched(s, k, final, held, image, lane_rr)
            transfer = time.monotonic() - t_send
            if final:
                self.downtime_phases.update(dump=t_send - self.t_freeze, send=transfer)
            self.iterations.append(IterationReport(
                index=k, final=final, dump_seconds=res.duration, transfer_seconds=transfer,
                pages_total=st.pages_total, pages_changed=st.pages_changed,
                pages_zero=st.pages_zero, pages_delta=st.pages_delta,
                pages_raw=st.pages_raw, image_bytes=st.bytes_in,
                wire_bytes=s.statistics().bytes_sent - wire_before,
                **IterationReport.criu_figures(res.stats),
                method=res.method, file_bytes=self.trees.bytes_sent))
            for old in {prev, held} - {d, image, None}:
                if old is not None and old.parent == self.root:
                    shutil.rmtree(old, ignore_errors=True)
            prev, held = d, image
            if final:
                return
            dec = self.policy.decide(self.iterations, self.intervals)
            self.decisions.append(dec)
            await self.progress(Phase.ITERATE, s.statistics().bytes_sent, dec)
            k += 1

    async def await_ready(self, s: Session) -> None:
        """Wait for the destination's READY: its copy is rebuilt, verified and restored
        stopped."""
        await self.progress(Phase.RESTORE, s.statistics().bytes_sent)
        t_sent = time.monotonic()
        with anyio.fail_after(self.ready_timeout):
            reply = await s.receive()
        self.downtime_phases["destination"] = time.monotonic() - t_sent
        if isinstance(reply, Error):
            raise MigrationError(f"the destination failed: {reply.code}: {reply.message}",
                                 phase=Phase.RESTORE)
        if not isinstance(reply, Ready):
            raise RemoteProtocolError(f"expected READY, got {type(reply).__name__}")
        self.dest_summary = dict(reply.summary)

    async def commit(self, s: Session) -> None:
        """Point of no return: the destination holds a verified copy, stopped. Kill ours,
        then COMMIT until it is acknowledged (shielded: a cancellation cannot leave the
        workload with no running copy)."""
        await self.progress(Phase.COMMIT, s.statistics().bytes_sent)
        with anyio.CancelScope(shield=True):
            # The decision is on disk before the source copy goes.
            await self.record(SourceState.DECIDED_COMMIT)
            t_kill = time.monotonic()
            await self.source.kill()
            self.killed = True
            t_commit = time.monotonic()
            ack = await commit_until_acked(s, self.mid, self.commit_timeout)
            self.downtime_phases.update(kill=t_commit - t_kill,
                                        commit=time.monotonic() - t_commit)
            await self.record(SourceState.COMMITTED)
        self.dest_summary.update(ack.summary)

    # -- failure ---------------------------------------------------------------------------

    async def _tell_abort(self, s: Session, exc: BaseException) -> None:
        # Tell the destination to discard, best effort; it also discards on its own when
        # the session breaks before COMMIT.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), \
                contextlib.suppress(CtliveError, OSError):
            await s.send(Abort(f"{type(exc).__name__}: {exc}"[:500]))

    async def _finish_commit(self, exc: BaseException) -> None:
        """The source copy is gone: only COMMIT can complete this, so retry it on new
        sessions (never resume, never guess); MigrationError if it cannot be confirmed."""
        with anyio.CancelScope(shield=True):
            if not self.killed:  # decided, then failed before the kill: finish the kill
                await self.source.kill()
                self.killed = True
            ack = await commit_on_new_sessions(
                self.destination, self.identity, self.verifier, self.cipher, self.mid,
                self.commit_timeout, self.connect_timeout, exc)
            await self.record(SourceState.COMMITTED)
        self.dest_summary.update(ack.summary)

    async def _abandon(self, exc: BaseException) -> bool:
        """Before the decision to commit: make the workload run again, then raise the
        error the caller sees (or return, for a cancellation, which the caller re-raises
        as it is). Once the final iteration went out, the destination may be READY, so
        the workload resumes only after it confirmed the abort; if it cannot be
        reached, the workload stays stopped and InDoubtError says so. Returns whether
        the migration is settled."""
        phase = self.phase
        settled = True
        if isinstance(exc, AttestationError):
            log.warning("attestation refused: %s", exc,
                        extra={"verdict": "refused", "reason": str(exc)[:300]})
        with anyio.CancelScope(shield=True):
            if self.state is SourceState.FINAL_SENT:
                outcome = await confirm_abort(self.destination, self.identity, self.verifier,
                                              self.cipher, self.mid, self.abort_timeout)
                settled = outcome in GONE
            if settled:
                if self.stopped:
                    await self.source.resume()
                await self.record(SourceState.ABORTED, error=f"{type(exc).__name__}: {exc}"[:500])
            with anyio.move_on_after(1), contextlib.suppress(Exception):
                await self.progress(Phase.FAILED)
        log.log(40 if not settled else 30, "migration %s during %s: %s",
                "in doubt" if not settled else "aborted", phase, exc,
                extra={"outcome": "in-doubt" if not settled else "aborted",
                       "phase": str(phase), "reason": f"{type(exc).__name__}: {exc}"[:300]})
        if not settled:
            raise InDoubtError(
                f"migration {self.mid} failed during {phase} ({exc}) after its final "
                "iteration was sent, and the destination could not confirm the abort: the "
                "workload stays stopped so that two copies never run; run `ctlive recover` "
                "once the destination is reachable", migration_id=self.mid, phase=phase,
                cause=exc) from exc
        if isinstance(exc, MigrationError):
            return True
        if isinstance(exc, AttestationError):
            raise MigrationError(f"attestation refused: {exc}", phase=Phase.ATTEST,
                                 cause=exc) from exc
        if isinstance(exc, CtliveError | OSError | TimeoutError):
            raise MigrationError(f"migration failed during {phase}: {exc}", phase=phase,
                                 cause=exc) from exc
        return True

    def report(self, t_done: float) -> MigrationReport:
        """The frozen report of a migration that succeeded."""
        return MigrationReport(
            migration_id=self.mid,
            workload=self.source.kind,
            destination=str(self.destination),
            total_time=t_done - self.t_start,
            downtime=t_done - self.t_freeze,
            downtime_method="source clock: final dump start until COMMIT_ACK (after the "
                            "destination resumed); an upper bound",
            iterations=tuple(self.iterations),
            decisions=tuple(self.decisions),
            bytes_on_wire=self.wire_total,
            image_bytes=sum(i.image_bytes for i in self.iterations),
            cipher=self.cipher,
            lanes=self.lanes,
            attestation=self.attest_summary, preflight=self.preflight.summary(),
            destination_summary=self.dest_summary,
            downtime_phases=self.downtime_phases,
        )


async def migrate(
    source: Workload,
    destination: str | tuple[str, int],
    *,
    identity: Identity,
    attestation: SnpPolicy | EvidenceVerifier,
    convergence: ConvergencePolicy | None = None,
    lanes: int = 1,
    cipher: Cipher = "AESGCM",
    on_progress: Callable[[ProgressEvent], Any] | None = None,
    progress_channel: MemoryObjectSendStream[ProgressEvent] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    connect_timeout: float = 30.0,
    ready_timeout: float = 300.0,
    commit_timeout: float = 120.0,
    abort_timeout: float = 30.0,
    progress_timeout: float = 150.0,
    state_dir: str | os.PathLike[str] | None = None,
) -> MigrationReport:
    """Live-migrate ``source`` to the ctlive receiver at ``destination``.

    ``attestation`` is an :class:`~ctlive.attest.SnpPolicy` (verified against AMD's
    roots) or any ``EvidenceVerifier``. Returns a :class:`MigrationReport`; raises
    :class:`~ctlive.errors.MigrationError` (with ``phase``) on failure, after making
    sure the source workload runs again, or :class:`~ctlive.errors.InDoubtError` when
    that could not be made safe (run :func:`~ctlive.migration.recovery.recover`).
    Cancellation is re-raised as the event loop's own cancellation, after the same
    cleanup.

    Progress: ``on_progress(event)`` is called in the event loop and must not block;
    events for ``progress_channel`` that find its buffer full are dropped (never waited
    for), so a slow consumer never stalls the migration.

    Every state change is written to the journal in ``state_dir`` (default
    ``$CTLIVE_STATE_DIR``, else ``/var/lib/ctlive``) before it is acted on, so that
    ``ctlive recover`` can finish or undo a migration whose process died.
    ``abort_timeout`` bounds how long a failure after the final iteration waits for
    the destination to confirm the abort before leaving the workload stopped;
    ``progress_timeout`` fails an iteration's send when no byte moved that long.
    """
    verifier = SnpVerifier(attestation) if isinstance(attestation, SnpPolicy) else attestation
    journal = await anyio.to_thread.run_sync(
        Journal, state_dir if state_dir is not None else
        os.environ.get("CTLIVE_STATE_DIR", DEFAULT_SOURCE_STATE), "source")
    try:
        m = _Migration(
            source, destination, identity=identity, verifier=verifier,
            policy=convergence or Convergence(), lanes=lanes, cipher=cipher,
            on_progress=on_progress, progress_channel=progress_channel, workdir=workdir,
            connect_timeout=connect_timeout, ready_timeout=ready_timeout,
            commit_timeout=commit_timeout, abort_timeout=abort_timeout,
            progress_timeout=progress_timeout, journal=journal)
        with bind(migration_id=m.mid):
            log.info("migrating %s to %s", source.kind, _address(destination))
            return await m.run()
    finally:
        journal.close()


def _address(destination: str | tuple[str, int]) -> str:
    if isinstance(destination, tuple):
        host, port = destination
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return destination
