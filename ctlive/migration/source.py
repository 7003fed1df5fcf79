"""``await ctlive.migrate(...)``: iterative pre-copy with two-phase commit, source side.

One :class:`_Migration` runs one migration; its methods are the phases, in order:
connect and attest (no image byte leaves before the verifier accepts), iterate (dump
while running, diff against the previous dump, send), final-dump (the workload is
stopped from here) and send, restore (wait for the destination's READY), commit (kill
the source copy, COMMIT, wait for COMMIT_ACK). Each phase is announced as a
:class:`~ctlive.errors.Phase` in a progress event, and names the phase of any error.

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
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ctlive.attest import SnpPolicy, SnpVerifier
from ctlive.backends import Workload
from ctlive.errors import (
    AttestationError,
    CtliveError,
    MigrationError,
    Phase,
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence, ConvergencePolicy
from ctlive.migration.iteration import send_iteration
from ctlive.migration.report import Decision, IterationReport, MigrationReport, ProgressEvent
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import Abort, Commit, CommitAck, Error, MigrationMeta, Ready
from ctlive.protocol.handshake import Cipher
from ctlive.transport.client import open_session
from ctlive.transport.session import Session

__all__ = ["migrate"]


def _work_dir() -> pathlib.Path:
    # Not /dev/shm or another tmpfs: CRIU archives the tmpfs mounts a workload can see,
    # so dumps kept there would end up inside the next dump (and in the restored
    # workload). The page cache keeps a disk directory fast.
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    return pathlib.Path(tempfile.mkdtemp(prefix="ctlive-src-", dir=base))


class _Migration:
    """One migration from the source's side; ``run()`` drives the phases."""

    def __init__(self, source: Workload, destination: str | tuple[str, int], *,
                 identity: Identity, verifier: EvidenceVerifier, policy: ConvergencePolicy,
                 lanes: int, cipher: Cipher,
                 on_progress: Callable[[ProgressEvent], Any] | None,
                 progress_channel: anyio.abc.ObjectSendStream[ProgressEvent] | None,
                 workdir: str | os.PathLike[str] | None, connect_timeout: float,
                 ready_timeout: float, commit_timeout: float) -> None:
        self.source, self.destination = source, destination
        self.identity, self.verifier, self.policy = identity, verifier, policy
        self.lanes, self.cipher = lanes, cipher
        self.on_progress, self.progress_channel = on_progress, progress_channel
        self.connect_timeout = connect_timeout
        self.ready_timeout, self.commit_timeout = ready_timeout, commit_timeout
        self.mid = uuid.uuid4().hex
        self.own_dir = workdir is None
        self.root = _work_dir() if workdir is None else pathlib.Path(workdir)
        self.phase = Phase.CONNECT
        self.stopped = self.killed = False
        self.iterations: list[IterationReport] = []
        self.decisions: list[Decision] = []
        self.intervals: list[float] = []
        self.dest_summary: dict[str, Any] = {}
        self.attest_summary: dict[str, Any] = {}
        self.downtime_phases: dict[str, float] = {}
        self.wire_total = 0
        self.t_start = self.t_freeze = time.monotonic()

    # -- progress --------------------------------------------------------------------------

    async def progress(self, phase: Phase, bytes_done: int = 0,
                       decision: Decision | None = None) -> None:
        """Enter ``phase`` and tell the caller."""
        self.phase = phase
        inputs = decision.inputs if decision is not None else {}
        ev = ProgressEvent(
            phase, max(len(self.iterations) - 1, 0), bytes_done,
            int(inputs.get("predicted_wire_bytes", 0)), inputs.get("dirty_rate", 0.0),
            inputs.get("link_rate", 0.0),
            decision.predicted_downtime if decision is not None else 0.0)
        if self.on_progress is not None:
            self.on_progress(ev)
        if self.progress_channel is not None:
            await self.progress_channel.send(ev)

    # -- the phases ------------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        """The whole migration; on failure the source workload runs again (or, after it
        was killed, COMMIT was confirmed) before the exception leaves."""
        self.root.mkdir(parents=True, exist_ok=True)
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
            if not self.killed:
                await self._abandon(exc)
                raise
            await self._finish_commit(exc)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise  # the move is complete, but the caller was cancelled
        finally:
            if self.own_dir:
                shutil.rmtree(self.root, ignore_errors=True)
        t_done = time.monotonic()
        await self.progress(Phase.DONE, self.wire_total)
        return self.report(t_done)

    async def attested(self, s: Session) -> None:
        """The verifier accepted the destination inside the handshake: record what it
        established, then say what is migrated."""
        await self.progress(Phase.ATTEST)
        att = s.attestation
        if att is not None:
            self.attest_summary = {"platform": att.platform, "insecure": att.insecure,
                                   "measurement": att.measurement.hex(), **att.details}
        await s.send(MigrationMeta({"id": self.mid, "kind": self.source.kind,
                                    "spec": self.source.restore_spec()}))

    async def iterate(self, s: Session) -> None:
        """Pre-copy iterations until the policy says the next dump is final, then the
        final dump and its send."""
        prev: pathlib.Path | None = None
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
                self.t_freeze = time.monotonic()
                self.stopped = True  # from here on, failure means resume
            else:
                self.phase = Phase.ITERATE
            res = await self.source.dump(d, final=final, parent=prev)
            t_send = time.monotonic()
            if final:
                await self.progress(Phase.SEND, s.statistics().bytes_sent)
            wire_before = s.statistics().bytes_sent
            st, lane_rr = await send_iteration(s, k, final, prev, d, lane_rr)
            transfer = time.monotonic() - t_send
            if final:
                self.downtime_phases.update(dump=t_send - self.t_freeze, send=transfer)
            stats = res.stats
            self.iterations.append(IterationReport(
                index=k, final=final, dump_seconds=res.duration, transfer_seconds=transfer,
                pages_total=st.pages_total, pages_changed=st.pages_changed,
                pages_zero=st.pages_zero, pages_delta=st.pages_delta,
                pages_raw=st.pages_raw, image_bytes=st.bytes_in,
                wire_bytes=s.statistics().bytes_sent - wire_before,
                frozen_time_us=stats.frozen_time if stats else None,
                memdump_time_us=stats.memdump_time if stats else None,
                method=res.method))
            if prev is not None and prev.parent == self.root:
                shutil.rmtree(prev, ignore_errors=True)
            prev = d
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
            t_kill = time.monotonic()
            await self.source.kill()
            self.killed = True
            t_commit = time.monotonic()
            ack = await _commit(s, self.mid, self.commit_timeout)
            self.downtime_phases.update(kill=t_commit - t_kill,
                                        commit=time.monotonic() - t_commit)
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
            ack = await _commit_reconnect(
                self.destination, self.identity, self.verifier, self.cipher, self.mid,
                self.commit_timeout, self.connect_timeout, exc)
        self.dest_summary.update(ack.summary)

    async def _abandon(self, exc: BaseException) -> None:
        """Before the kill: resume the workload (if the final dump stopped it), then
        raise the error the caller sees, or return for a cancellation, which the caller
        re-raises as it is."""
        phase = self.phase
        with anyio.CancelScope(shield=True):
            if self.stopped:
                await self.source.resume()
            with anyio.move_on_after(1), contextlib.suppress(Exception):
                await self.progress(Phase.FAILED)
        if isinstance(exc, MigrationError):
            return
        if isinstance(exc, AttestationError):
            raise MigrationError(f"attestation refused: {exc}", phase=Phase.ATTEST,
                                 cause=exc) from exc
        if isinstance(exc, CtliveError | OSError | TimeoutError):
            raise MigrationError(f"migration failed during {phase}: {exc}", phase=phase,
                                 cause=exc) from exc

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
            attestation=self.attest_summary,
            destination_summary=self.dest_summary,
            downtime_phases=self.downtime_phases,
        )


async def _commit(s: Session, mid: str, timeout: float) -> CommitAck:
    """Send COMMIT and wait for its ACK on the current session, repeating COMMIT."""
    with anyio.fail_after(timeout):
        await s.send(Commit(mid))
        while True:
            with anyio.move_on_after(5):
                reply = await s.receive()
                if isinstance(reply, CommitAck):
                    return reply
                if isinstance(reply, Error):
                    raise MigrationError(f"destination refused COMMIT: {reply.message}",
                                         phase=Phase.COMMIT)
                continue
            await s.send(Commit(mid))


async def _commit_reconnect(destination: str | tuple[str, int], identity: Identity,
                            verifier: EvidenceVerifier, cipher: Cipher, mid: str,
                            timeout: float, connect_timeout: float,
                            first: BaseException) -> CommitAck:
    deadline = time.monotonic() + timeout
    last: BaseException = first
    while time.monotonic() < deadline:
        try:
            async with open_session(destination, identity=identity, verifier=verifier,
                                    cipher=cipher, timeout=connect_timeout,
                                    hello={"migration_id": mid, "commit": True}) as s:
                return await _commit(s, mid, max(deadline - time.monotonic(), 1))
        except MigrationError:
            raise
        except (CtliveError, OSError, TimeoutError) as exc:
            last = exc
            await anyio.sleep(1)
    raise MigrationError(
        f"the source workload was stopped and handed over, but COMMIT could not be "
        f"confirmed within {timeout}s ({last}); the destination keeps the workload stopped "
        f"until it receives COMMIT for migration {mid}", phase=Phase.COMMIT, cause=last)


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
    progress_channel: anyio.abc.ObjectSendStream[ProgressEvent] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    connect_timeout: float = 30.0,
    ready_timeout: float = 300.0,
    commit_timeout: float = 120.0,
) -> MigrationReport:
    """Live-migrate ``source`` to the ctlive receiver at ``destination``.

    ``attestation`` is an :class:`~ctlive.attest.SnpPolicy` (verified against AMD's
    roots) or any ``EvidenceVerifier``. Returns a :class:`MigrationReport`; raises
    :class:`~ctlive.errors.MigrationError` (with ``phase``) on failure, after making
    sure the source workload runs again. Cancellation is re-raised as the event loop's
    own cancellation, after the same cleanup.
    """
    verifier = SnpVerifier(attestation) if isinstance(attestation, SnpPolicy) else attestation
    return await _Migration(
        source, destination, identity=identity, verifier=verifier,
        policy=convergence or Convergence(), lanes=lanes, cipher=cipher,
        on_progress=on_progress, progress_channel=progress_channel, workdir=workdir,
        connect_timeout=connect_timeout, ready_timeout=ready_timeout,
        commit_timeout=commit_timeout).run()
