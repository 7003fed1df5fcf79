"""Test doubles for the channel: attestation with no platform, and a destination
with no images.

``FakeProvider`` satisfies ``ctlive.protocol.evidence.EvidenceProvider`` and
``FakeVerifier`` satisfies ``EvidenceVerifier``. The "evidence" is a prefix
followed by the 64 bytes of report_data it binds, so the pair still checks the
binding the real ones check (evidence from another handshake is refused), and
can be told to refuse everything. They prove nothing: for tests and benchmarks of
the channel and the migration, never for a real destination.

>>> provider, verifier = FakeProvider(), FakeVerifier()
>>> rd = bytes(64)
>>> verifier.verify(provider.get_evidence(rd), rd).platform
'fake'

``FakeDestination`` is a ``serve_sessions`` handler that plays the destination's
side of a one-iteration migration and keeps the CHANGE payloads it received.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import anyio

from ctlive.errors import AttestationError, RemoteProtocolError, ReportDataMismatchError
from ctlive.protocol import frames
from ctlive.protocol.evidence import AttestationResult

if TYPE_CHECKING:
    from ctlive.transport.session import Session

__all__ = [
    "FakeDestination",
    "FakeProvider",
    "FakeVerifier",
]

DEFAULT_PREFIX = b"EV"

_Frame = TypeVar("_Frame")


class FakeProvider:
    """Evidence = ``prefix + report_data``; records each report_data it was asked to
    bind in ``asked``."""

    def __init__(self, *, prefix: bytes = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.asked: list[bytes] = []
        """The report_data of every ``get_evidence`` call, in order."""

    def get_evidence(self, report_data: bytes) -> bytes:
        """``prefix + report_data``."""
        self.asked.append(report_data)
        return self.prefix + report_data


class FakeVerifier:
    """Accepts exactly the evidence a ``FakeProvider`` with the same ``prefix`` made for
    this report_data, and returns ``AttestationResult(platform, measurement)``.

    With ``accept=False`` it refuses all evidence (``AttestationError``, "refused by
    test policy"), as a verifier whose policy the destination fails. Evidence that
    does not bind the report_data (replayed, foreign) raises
    ``ReportDataMismatchError``. Every call is recorded in ``seen``."""

    def __init__(self, *, accept: bool = True, prefix: bytes = DEFAULT_PREFIX,
                 platform: str = "fake", measurement: bytes = b"m" * 48) -> None:
        self.accept = accept
        self.prefix = prefix
        self.platform = platform
        self.measurement = measurement
        self.seen: list[tuple[bytes, bytes]] = []
        """``(evidence, report_data)`` of every ``verify`` call, in order."""

    def verify(self, evidence: bytes, report_data: bytes) -> AttestationResult:
        """The result, or ``AttestationError`` / ``ReportDataMismatchError`` (above)."""
        self.seen.append((evidence, report_data))
        if not self.accept:
            raise AttestationError("refused by test policy")
        if evidence != self.prefix + report_data:
            raise ReportDataMismatchError("evidence does not bind this handshake",
                                          field="report_data")
        return AttestationResult(platform=self.platform, measurement=self.measurement)


class FakeDestination:
    """A ``serve_sessions`` handler (one session) for a migration of one iteration,
    without images: it expects MIGRATION_META, ITERATION_BEGIN, CHANGE records (each
    granted back as it arrives) up to ITERATION_END, then answers READY, and
    COMMIT_ACK to the COMMIT that follows.

    The CHANGE payloads go to ``received`` (in arrival order; none kept with
    ``keep=False``, for benchmarks), whatever the handler raises (a tampered record,
    an unexpected frame: ``RemoteProtocolError``) to ``errors`` before it propagates,
    and ``done`` is set when the handler returns or fails. Create it inside the
    event loop (``done`` is an ``anyio.Event``)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self.done = anyio.Event()

    async def __call__(self, session: Session) -> None:
        """Play the destination's side on ``session`` (as above)."""
        try:
            await self._expect(session, frames.MigrationMeta)
            await self._expect(session, frames.IterationBegin)
            while True:
                event = await session.receive()
                if isinstance(event, frames.IterationEnd):
                    break
                if not isinstance(event, frames.Change):
                    raise RemoteProtocolError(f"expected CHANGE, got {event!r}")
                if self.keep:
                    self.received.append(event.data)
                await session.grant(len(event.data))
            await session.send(frames.Ready({}))
            commit = await self._expect(session, frames.Commit)
            await session.send(frames.CommitAck(commit.migration_id))
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            self.done.set()

    @staticmethod
    async def _expect(session: Session, kind: type[_Frame]) -> _Frame:
        event = await session.receive()
        if not isinstance(event, kind):
            raise RemoteProtocolError(f"expected {kind.__name__}, got {event!r}")
        return event
