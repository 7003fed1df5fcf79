"""Settling migrations on the source: COMMIT until acknowledged, outcome queries on a
fresh attested session, and :func:`recover`, which resolves every unfinished entry of
the source's journal after a crash.

The rules (docs/protocol.md, "Crashes"):

- a migration decided to commit is finished by COMMIT only; its source copy is killed
  (again) and never resumed;
- one that had not decided resumes its workload, but only once the destination cannot
  hold a copy that is ready: it never got the final iteration (state ``frozen`` or
  earlier), or it confirmed the abort (an OUTCOME of ``discarded`` or ``unknown``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time
from typing import Any

import anyio
import attrs

from ctlive.attest import SnpPolicy, SnpVerifier
from ctlive.backends import PodmanContainer, Process, RuncContainer, Workload
from ctlive.backends.workload import process_start_time
from ctlive.errors import (
    ConfigError,
    CtliveError,
    InDoubtError,
    MigrationError,
    Phase,
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.migration.journal import Journal, SourceState, arecord
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import Commit, CommitAck, Error, Outcome, Resolve
from ctlive.protocol.handshake import Cipher
from ctlive.transport.client import open_session
from ctlive.transport.session import Session

__all__ = [
    "DEFAULT_SOURCE_STATE",
    "Recovered",
    "commit_on_new_sessions",
    "commit_until_acked",
    "recover",
    "resolve",
    "workload_from_handle",
    "workload_handle",
]

DEFAULT_SOURCE_STATE = "/var/lib/ctlive"
"""Where the source keeps its journal unless told otherwise (``$CTLIVE_STATE_DIR``, else
``/var/lib/ctlive``)."""
GONE = ("discarded", "unknown")
"""OUTCOME states that prove the destination holds no copy that could be committed."""


# -- workloads that a new process can resume or kill -----------------------------------------


def workload_handle(w: Workload) -> dict[str, Any] | None:
    """What a new process needs to resume or kill ``w`` (None for a workload type ctlive
    does not know: ``recover`` then only reports it)."""
    if isinstance(w, Process):
        return {"kind": "process", "pid": w.pid, "start": process_start_time(w.pid)}
    if isinstance(w, RuncContainer):
        return {"kind": "runc", "id": w.id, "root": w.root}
    if isinstance(w, PodmanContainer):
        archive = w._final_archive  # the final checkpoint: resume restores from it
        return {"kind": "podman", "name": w.name,
                "archive": str(archive) if archive is not None else None}
    return None


def workload_from_handle(h: dict[str, Any]) -> Workload:
    """The workload a handle names; ConfigError if it is gone or the handle is foreign
    (a pid reused by another process is refused by its start time)."""
    kind = h.get("kind")
    if kind == "process":
        pid = int(h["pid"])
        if h.get("start") is not None and process_start_time(pid) != h["start"]:
            raise ConfigError(f"process {pid} is gone (or its pid was reused)")
        return Process(pid)
    if kind == "runc":
        return RuncContainer(str(h["id"]), root=h.get("root"))
    if kind == "podman":
        w = PodmanContainer(str(h["name"]))
        if h.get("archive"):
            w._final_archive = pathlib.Path(h["archive"])
        return w
    raise ConfigError(f"the journal names a workload ctlive cannot handle: {h!r}")


# -- talking to the destination ---------------------------------------------------------------


async def commit_until_acked(s: Session, mid: str, timeout: float) -> CommitAck:
    """Send COMMIT and wait for its ACK on ``s``, repeating COMMIT every 5 s."""
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


async def commit_on_new_sessions(destination: str | tuple[str, int], identity: Identity,
                                 verifier: EvidenceVerifier, cipher: Cipher, mid: str,
                                 timeout: float, connect_timeout: float,
                                 first: BaseException | None = None) -> CommitAck:
    """COMMIT on fresh sessions until acknowledged; InDoubtError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = first
    while time.monotonic() < deadline:
        try:
            async with open_session(destination, identity=identity, verifier=verifier,
                                    cipher=cipher, timeout=connect_timeout,
                                    hello={"migration_id": mid, "commit": True}) as s:
                return await commit_until_acked(s, mid, max(deadline - time.monotonic(), 1))
        except MigrationError:
            raise
        except (CtliveError, OSError, TimeoutError) as exc:
            last = exc
            await anyio.sleep(1)
    raise InDoubtError(
        f"the source workload was stopped and handed over, but COMMIT could not be "
        f"confirmed within {timeout}s ({last}); the destination keeps the workload stopped "
        f"until it receives COMMIT: run `ctlive recover`", migration_id=mid,
        phase=Phase.COMMIT, cause=last)


async def resolve(destination: str | tuple[str, int], identity: Identity,
                  verifier: EvidenceVerifier, cipher: Cipher, mid: str, action: str, *,
                  timeout: float = 30.0) -> str:
    """Ask the destination what became of ``mid`` (``action="abort"``: discard it
    unless committed); returns its state (``unknown``, ``receiving``, ``ready``,
    ``committed``, ``discarded``)."""
    async with open_session(destination, identity=identity, verifier=verifier, cipher=cipher,
                            timeout=timeout, hello={"migration_id": mid, "resolve": True}) as s:
        await s.send(Resolve(mid, action))
        with anyio.fail_after(timeout):
            reply = await s.receive()
    if isinstance(reply, Error):
        raise MigrationError(f"the destination could not resolve {mid}: {reply.code}: "
                             f"{reply.message}", phase=Phase.ABORT)
    if not isinstance(reply, Outcome) or reply.migration_id != mid:
        raise RemoteProtocolError(f"expected the OUTCOME of {mid}, got {reply!r}")
    return reply.state


async def confirm_abort(destination: str | tuple[str, int], identity: Identity,
                        verifier: EvidenceVerifier, cipher: Cipher, mid: str,
                        timeout: float) -> str | None:
    """Ask the destination to abort ``mid`` until it answers (retrying for ``timeout``
    seconds); returns its OUTCOME, or None if it could not be reached."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await resolve(destination, identity, verifier, cipher, mid, "abort",
                                 timeout=max(min(10.0, deadline - time.monotonic()), 1.0))
        except (CtliveError, OSError, TimeoutError):
            if time.monotonic() >= deadline:
                return None
            await anyio.sleep(1)


# -- recovery ----------------------------------------------------------------------------------


@attrs.frozen
class Recovered:
    """What :func:`recover` did with one journal entry."""

    migration_id: str
    before: str
    """The journal state it found."""
    after: str
    """The state it left (the same when still in doubt)."""
    action: str
    """What it did, in words."""

    @property
    def in_doubt(self) -> bool:
        """Still unresolved (the destination could not be reached)."""
        return self.after not in (SourceState.COMMITTED, SourceState.ABORTED)


async def _resume(entry_data: dict[str, Any]) -> str:
    handle = entry_data.get("workload")
    if not handle:
        return "no workload handle in the journal: resume it by hand"
    try:
        w = workload_from_handle(handle)
    except ConfigError as exc:
        return f"workload not resumed: {exc}"
    await w.resume()
    return f"resumed the {handle['kind']} workload"


async def _kill(entry_data: dict[str, Any]) -> None:
    handle = entry_data.get("workload")
    if handle:
        with contextlib.suppress(ConfigError, CtliveError):
            await workload_from_handle(handle).kill()


def cleanup_workdir(entry_data: dict[str, Any]) -> None:
    """Remove the migration's own work directory (dumps, the final checkpoint)."""
    if entry_data.get("own_workdir") and entry_data.get("workdir"):
        shutil.rmtree(entry_data["workdir"], ignore_errors=True)


async def recover(*, identity: Identity, attestation: SnpPolicy | EvidenceVerifier,
                  state_dir: str | os.PathLike[str] | None = None,
                  force_resume: bool = False, connect_timeout: float = 10.0,
                  commit_timeout: float = 60.0) -> list[Recovered]:
    """Resolve every unfinished migration in the source's journal (after a crash of the
    process that ran it) and say what was done.

    ``force_resume`` resumes workloads whose destination cannot be reached even though
    it may hold a ready copy: the operator's decision that the destination is gone for
    good (it then must never be sent COMMIT, and ctlive never does)."""
    verifier = SnpVerifier(attestation) if isinstance(attestation, SnpPolicy) else attestation
    journal = Journal(state_dir if state_dir is not None else
                      os.environ.get("CTLIVE_STATE_DIR", DEFAULT_SOURCE_STATE), "source")
    out = []
    try:
        for e in journal.unfinished():
            data = dict(e.data)
            dest = data.get("destination", "")
            cipher = data.get("cipher", "AESGCM")
            mid = e.migration_id
            if e.state == SourceState.DECIDED_COMMIT:
                await _kill(data)  # idempotent: there must be no source copy
                try:
                    with anyio.CancelScope(shield=True):
                        await commit_on_new_sessions(dest, identity, verifier, cipher, mid,
                                                     commit_timeout, connect_timeout)
                except InDoubtError as exc:
                    out.append(Recovered(mid, e.state, e.state, f"COMMIT not confirmed: {exc}"))
                    continue
                await arecord(journal, mid, SourceState.COMMITTED, recovered=True)
                cleanup_workdir(data)
                out.append(Recovered(mid, e.state, SourceState.COMMITTED,
                                     "committed: COMMIT acknowledged, source copy killed"))
                continue
            outcome = await confirm_abort(dest, identity, verifier, cipher, mid,
                                          connect_timeout)
            if e.state == SourceState.FINAL_SENT and outcome not in GONE and not force_resume:
                what = ("the destination could not be reached" if outcome is None
                        else f"the destination says {outcome!r}")
                out.append(Recovered(mid, e.state, e.state,
                                     f"in doubt: {what}; the workload stays stopped"))
                continue
            try:
                action = await _resume(data)
            except CtliveError as exc:
                if e.state in (SourceState.FROZEN, SourceState.FINAL_SENT):
                    raise
                action = f"the workload was running (resume: {exc})"  # pre-copy never stops it
            await arecord(journal, mid, SourceState.ABORTED, recovered=True,
                          destination_outcome=outcome)
            cleanup_workdir(data)
            out.append(Recovered(mid, e.state, SourceState.ABORTED,
                                 f"aborted (destination: {outcome or 'unreachable'}); {action}"))
    finally:
        journal.close()
    return out
