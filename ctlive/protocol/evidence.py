"""The seam between the secure channel and attestation.

The channel does not know what SEV-SNP is. The responder asks an
:class:`EvidenceProvider` for evidence whose report binds ``report_data``; the
initiator hands that evidence to an :class:`EvidenceVerifier`, which either
returns an :class:`AttestationResult` or raises an
:class:`~ctlive.errors.AttestationError`. ``ctlive.attest`` supplies the SNP
implementations; tests may use doubles with the same shape.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

__all__ = [
    "AttestationResult",
    "EvidenceProvider",
    "EvidenceVerifier",
]


@attrs.frozen
class AttestationResult:
    """What the verifier established about the destination."""

    platform: str
    """E.g. ``"sev-snp"`` or ``"simulated-sev-snp (INSECURE)"``."""
    measurement: bytes
    """The launch measurement of the guest."""
    insecure: bool = False
    """True when the evidence came from a simulated platform trusted only for tests/demo."""
    details: dict[str, str] = attrs.field(factory=dict)
    """Readable field values and per-check verdicts, for the migration report."""


@runtime_checkable
class EvidenceProvider(Protocol):
    """Produces attestation evidence (report plus certificates) inside the guest."""

    def get_evidence(self, report_data: bytes) -> bytes:
        """Return serialized evidence whose report carries these 64 bytes of report_data."""
        ...


@runtime_checkable
class EvidenceVerifier(Protocol):
    """Checks evidence against a policy on the source side."""

    def verify(self, evidence: bytes, report_data: bytes) -> AttestationResult:
        """Verify ``evidence`` and that it binds ``report_data``; raise AttestationError if not."""
        ...
