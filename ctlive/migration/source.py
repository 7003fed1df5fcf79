"""``await ctlive.migrate(...)``: iterative pre-copy with two-phase commit, source side.

Phases: connect and attest (no image byte leaves before the verifier accepts);
iterate (dump while running, diff against the previous dump, send); final-dump
(the workload is stopped from here); restore (wait for the destination's READY);
commit (kill the source copy, COMMIT, wait for COMMIT_ACK).

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
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence, ConvergencePolicy
from ctlive.migration.iteration import send_iteration
from ctlive.migration.report import Decision, IterationReport, MigrationReport, ProgressEvent
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import (
    Abort,
    Commit,
    CommitAck,
    Error,
    MigrationMeta,
    Ready,
)
from ctlive.transport.client import open_session
from ctlive.transport.session import Session

__all__ = [
    "migrate",
]


def _work_dir() -> pathlib.Path:
    # Not /dev/shm or another tmpfs: CRIU archives the tmpfs mounts a workload can see,
    # so dumps kept there would end up inside the next dump (and in the restored
    # workload). The page cache keeps a disk directory fast.
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    return pathlib.Path(tempfile.mkdtemp(prefix="ctlive-src-", dir=base))


async def migrate(
    source: Workload,
    destination: str | tuple[str, int],
    *,
    identity: Identity,
    attestation: SnpPolicy | EvidenceVerifier,
    convergence: ConvergencePolicy | None = None,
    lanes: int = 1,
    cipher: str = "AESGCM",
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
    sure the source workload runs again. Cancellation aborts the same way.
    """
    verifier = SnpVerifier(attestation) if isinstance(attestation, SnpPolicy) else attestation
    policy = convergence or Convergence()
    mid = uuid.uuid4().hex
    own_dir = workdir is None
    root = _work_dir() if workdir is None else pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    phase = "connect"
    stopped = killed = False
    iterations: list[IterationReport] = []
    decisions: list[Decision] = []
    intervals: list[float] = []
    dest_summary: dict[str, Any] = {}
    session_stats: list[int] = [0]
    attest_summary: dict[str, Any] = {}
    t_freeze = 0.0
    phases: dict[str, float] = {}

    async def progress(ev: ProgressEvent) -> None:
        if on_progress is not None:
            on_progress(ev)
        if progress_channel is not None:
            await progress_channel.send(ev)

    try:
        async with open_session(destination, identity=identity, verifier=verifier, lanes=lanes,
                                cipher=cipher, timeout=connect_timeout,
                                hello={"migration_id": mid}) as s:
            try:
                phase = "iterate"
                att = s.attestation
                if att is not None:
                    attest_summary = {"platform": att.platform, "insecure": att.insecure,
                                      "measurement": att.measurement.hex(), **att.details}
                await s.send(MigrationMeta({"id": mid, "kind": source.kind,
                                            "spec": source.restore_spec()}))
                prev: pathlib.Path | None = None
                last_dump_at = 0.0
                k = 0
                lane_rr = 0
                while True:
                    final = k + 1 >= getattr(policy, "max_iterations", 1 << 30) or (
                        bool(decisions) and decisions[-1].final_next)
                    phase = "final-dump" if final else "iterate"
                    d = root / f"dump-{k}"
                    now = time.monotonic()
                    intervals.append(now - last_dump_at if k else 0.0)
                    last_dump_at = now
                    if final:
                        t_freeze = time.monotonic()
                        stopped = True  # from here on, failure means resume
                    res = await source.dump(d, final=final, parent=prev)
                    t_send = time.monotonic()
                    wire_before = s.statistics().bytes_sent
                    st, lane_rr = await send_iteration(s, k, final, prev, d, lane_rr)
                    transfer = time.monotonic() - t_send
                    if final:
                        phases.update(dump=t_send - t_freeze, send=transfer)
                    wire = s.statistics().bytes_sent - wire_before
                    stats = res.stats
                    it = IterationReport(
                        index=k, final=final, dump_seconds=res.duration, transfer_seconds=transfer,
                        pages_total=st.pages_total, pages_changed=st.pages_changed,
                        pages_zero=st.pages_zero, pages_delta=st.pages_delta,
                        pages_raw=st.pages_raw, image_bytes=st.bytes_in, wire_bytes=wire,
                        frozen_time_us=stats.frozen_time if stats else None,
                        memdump_time_us=stats.memdump_time if stats else None,
                        method=res.method)
                    iterations.append(it)
                    if prev is not None and prev.parent == root:
                        shutil.rmtree(prev, ignore_errors=True)
                    prev = d
                    if final:
                        break
                    dec = policy.decide(iterations, intervals)
                    decisions.append(dec)
                    await progress(ProgressEvent(
                        "iterate", k, s.statistics().bytes_sent,
                        int(dec.inputs.get("predicted_wire_bytes", 0)),
                        dec.inputs.get("dirty_rate", 0.0), dec.inputs.get("link_rate", 0.0),
                        dec.predicted_downtime))
                    k += 1
                phase = "restore"
                await progress(ProgressEvent("restore", k, s.statistics().bytes_sent, 0, 0, 0, 0))
                t_sent = time.monotonic()
                with anyio.fail_after(ready_timeout):
                    reply = await s.receive()
                phases["destination"] = time.monotonic() - t_sent
                if isinstance(reply, Error):
                    raise MigrationError(f"the destination failed: {reply.code}: {reply.message}",
                                         phase="restore")
                if not isinstance(reply, Ready):
                    raise RemoteProtocolError(f"expected READY, got {type(reply).__name__}")
                dest_summary = dict(reply.summary)
                # Point of no return: the destination holds a verified copy, stopped.
                phase = "commit"
                with anyio.CancelScope(shield=True):
                    t_kill = time.monotonic()
                    await source.kill()
                    killed = True
                    t_commit = time.monotonic()
                    ack = await _commit(s, mid, commit_timeout)
                    phases.update(kill=t_commit - t_kill, commit=time.monotonic() - t_commit)
                dest_summary.update(ack.summary)
                session_stats[0] = s.statistics().bytes_sent + s.statistics().bytes_received
            except BaseException as exc:
                if not killed:
                    # Tell the destination to discard, best effort; it also discards on its
                    # own when the session breaks before COMMIT.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2), \
                            contextlib.suppress(CtliveError, OSError):
                        await s.send(Abort(f"{type(exc).__name__}: {exc}"[:500]))
                raise
    except BaseException as exc:
        if killed:
            # The source copy is gone: only COMMIT can complete this; retry it on new
            # sessions (never resume, never guess).
            with anyio.CancelScope(shield=True):
                ack = await _commit_reconnect(destination, identity, verifier, cipher, mid,
                                              commit_timeout, connect_timeout, exc)
            dest_summary.update(ack.summary)
        else:
            with anyio.CancelScope(shield=True):
                if stopped:
                    await source.resume()
            if own_dir:
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(exc, MigrationError):
                raise
            if isinstance(exc, AttestationError):
                raise MigrationError(f"attestation refused: {exc}", phase="attest",
                                     cause=exc) from exc
            if isinstance(exc, CtliveError | OSError | TimeoutError):
                raise MigrationError(f"migration failed during {phase}: {exc}", phase=phase,
                                     cause=exc) from exc
            raise
    t_done = time.monotonic()
    if own_dir:
        shutil.rmtree(root, ignore_errors=True)
    await progress(ProgressEvent("done", len(iterations) - 1, session_stats[0], 0, 0, 0, 0))
    return MigrationReport(
        migration_id=mid,
        workload=source.kind,
        destination=str(destination),
        total_time=t_done - t_start,
        downtime=t_done - t_freeze,
        downtime_method="source clock: final dump start until COMMIT_ACK (after the "
                        "destination resumed); an upper bound",
        iterations=tuple(iterations),
        decisions=tuple(decisions),
        bytes_on_wire=session_stats[0],
        image_bytes=sum(i.image_bytes for i in iterations),
        cipher=cipher,
        lanes=lanes,
        attestation=attest_summary,
        destination_summary=dest_summary,
        downtime_phases=phases,
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
                                         phase="commit")
                continue
            await s.send(Commit(mid))


async def _commit_reconnect(destination: str | tuple[str, int], identity: Identity,
                            verifier: EvidenceVerifier, cipher: str, mid: str,
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
        f"until it receives COMMIT for migration {mid}", phase="commit", cause=last)

