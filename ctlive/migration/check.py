"""``ctlive migrate --check``: attestation and the preflight alone, source side (the
receiver's side never imports this: it opens sessions)."""

from __future__ import annotations

import contextlib

import anyio

from ctlive.attest import SnpPolicy, SnpVerifier
from ctlive.backends.workload import Workload
from ctlive.errors import CtliveError
from ctlive.identity import Identity
from ctlive.migration.preflight import PreflightError, PreflightResult, exchange
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import Abort
from ctlive.transport.client import open_session

__all__ = ["PreflightError", "check"]


async def check(workload: Workload, destination: str | tuple[str, int], *,
                identity: Identity, attestation: SnpPolicy | EvidenceVerifier,
                connect_timeout: float = 30.0) -> PreflightResult:
    """Attestation and the preflight alone (``ctlive migrate --check``): connect, verify
    the destination, exchange facts, then ABORT; nothing is dumped. Returns the result
    when the migration could go ahead; raises :class:`PreflightError` naming the
    differences when it could not (and the errors of ``migrate()`` for the rest)."""
    verifier = SnpVerifier(attestation) if isinstance(attestation, SnpPolicy) else attestation
    async with open_session(destination, identity=identity, verifier=verifier,
                            timeout=connect_timeout) as s:
        try:
            result = await exchange(s, workload)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2), \
                    contextlib.suppress(CtliveError, OSError):
                await s.send(Abort("preflight check only"))
    return result
