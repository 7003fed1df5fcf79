"""Every exception ctlive raises.

One flat module, so users can catch exactly what they mean. Everything descends
from :class:`CtliveError`, which carries the migration *phase* in which the
failure happened (when known) and the underlying *cause*. Backend errors (OS,
anyio, cffi, CRIU) are translated at the boundary where they occur, so they never
reach the user untranslated.

Sections are grouped by the subsystem that raises them; each subsystem adds its
own classes inside its section.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

__all__ = [
    "AttestationError",
    "AuthenticationError",
    "AuthorKeyDigestMismatchError",
    "BrokenChannelError",
    "CertificateBindingError",
    "CertificateChainError",
    "CertificateExpiredError",
    "CertificateSignatureError",
    "ChannelError",
    "CheckpointError",
    "ChipIdNotAllowedError",
    "ClosedChannelError",
    "ConfigError",
    "ConnectError",
    "ConnectTimeoutError",
    "CriuError",
    "CriuNotFoundError",
    "CtliveError",
    "DataAtRestError",
    "DebugPolicyError",
    "DeltaFormatError",
    "EvidenceFormatError",
    "FamilyIdMismatchError",
    "GuestSvnTooLowError",
    "HandshakeError",
    "HostDataMismatchError",
    "IdKeyDigestMismatchError",
    "ImageFormatError",
    "ImageIdMismatchError",
    "ImageTooLargeError",
    "InDoubtError",
    "LocalProtocolError",
    "MeasurementMismatchError",
    "MigrateMaPolicyError",
    "MigrationError",
    "PageBufferError",
    "PeerNotAllowedError",
    "Phase",
    "PolicyViolationError",
    "ProtocolError",
    "ProviderError",
    "ProvisionalFirmwareError",
    "ReceiverLimitError",
    "RecordError",
    "RemoteProtocolError",
    "ReorderedRecordError",
    "ReplayedRecordError",
    "ReportDataMismatchError",
    "ReportFormatError",
    "ReportSignatureError",
    "RestoreError",
    "RestoreSpecError",
    "SigningKeyPolicyError",
    "SingleSocketPolicyError",
    "SmtPolicyError",
    "StorageError",
    "TamperedRecordError",
    "TcbTooLowError",
    "TransportError",
    "TruncatedStreamError",
    "UntrustedRootError",
    "VerificationError",
    "VmplMismatchError",
]


class Phase(enum.StrEnum):
    """The phases of a migration, in order: progress events announce each, and an
    error raised inside a migration names the one it happened in. A ``StrEnum``:
    members compare equal to their values (``Phase.FINAL_DUMP == "final-dump"``)."""

    CONNECT = "connect"
    """Connecting and running the handshake."""
    ATTEST = "attest"
    """The destination's evidence was verified; the migration is announced."""
    PREFLIGHT = "preflight"
    """Both sides compare what a restore depends on (CPU, CRIU, mounts, cgroups)."""
    ITERATE = "iterate"
    """Pre-copy iterations while the workload runs."""
    FINAL_DUMP = "final-dump"
    """The final dump: the workload is stopped from here on."""
    SEND = "send"
    """The final iteration's changes go to the destination."""
    RESTORE = "restore"
    """The destination verifies and restores its copy, stopped, and says READY."""
    COMMIT = "commit"
    """The source copy is killed; COMMIT until the destination acknowledges."""
    DONE = "done"
    """The workload runs at the destination."""
    FAILED = "failed"
    """The migration failed; the source workload runs again."""
    ABORT = "abort"
    """Undoing a step on the way out of a failed migration (resuming the source,
    discarding the destination's copy)."""


class CtliveError(Exception):
    """Root of every ctlive exception.

    ``phase`` names the migration :class:`Phase` when the error happened inside a
    migration; ``cause`` is the original exception, if any (it is also chained as
    ``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        phase: Phase | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    def __str__(self) -> str:
        if self.phase:
            return f"[{self.phase}] {self.message}"
        return self.message


class ConfigError(CtliveError):
    """A configuration value, file or argument is invalid."""


# --- native page-diff core -------------------------------------------------



class PageBufferError(CtliveError):
    """A buffer handed to the page-diff core has the wrong size or is not writable."""


class DeltaFormatError(CtliveError):
    """A page-record stream is corrupt, truncated or hostile.

    ``offset`` is the byte offset in the stream where decoding stopped.
    """

    def __init__(self, message: str, *, offset: int | None = None,
                 phase: Phase | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message, phase=phase, cause=cause)
        self.offset = offset


# --- CRIU images and checkpoint backends -----------------------------------


class ImageFormatError(CtliveError):
    """A CRIU image file is malformed or truncated.

    ``path`` names the file and ``offset`` the byte offset of the problem.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 phase: Phase | None = None, cause: BaseException | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" at offset {offset}"
            where += ": "
        super().__init__(where + message, phase=phase, cause=cause)
        self.path = path
        self.offset = offset


class CriuError(CtliveError):
    """CRIU (or runc/podman driving it) failed. ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, *, log_tail: str = "", phase: Phase | None = None,
                 cause: BaseException | None = None) -> None:
        if log_tail:
            message = f"{message}\n--- log tail ---\n{log_tail}"
        super().__init__(message, phase=phase, cause=cause)
        self.log_tail = log_tail


class CriuNotFoundError(CriuError):
    """No usable CRIU (>= 4.2) was found. The message says what to run."""


class StorageError(CtliveError):
    """Reading or writing image files or state on disk failed (no space left, no
    permission, a file that vanished). ``path`` names the file when known."""

    def __init__(self, message: str, *, path: str | None = None,
                 phase: Phase | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message, phase=phase, cause=cause)
        self.path = path


@contextlib.contextmanager
def map_os_errors(error: type[CtliveError], what: str, *,
                  phase: Phase | None = None) -> Iterator[None]:
    """At the edge of a package that touches files or runs tools: an ``OSError``
    raised inside becomes ``error`` (``what`` failed), so callers catch ctlive errors
    only. ctlive errors pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, ConnectionError):
            raise
        raise error(f"{what}: {exc}", phase=phase, cause=exc) from exc


class CheckpointError(CtliveError):
    """A checkpoint backend could not dump, resume or kill the workload."""


class RestoreError(CtliveError):
    """The destination could not restore the workload."""


class DataAtRestError(RestoreError):
    """The receiver refuses to restore where the workload's data would rest in plaintext
    on a disk (e.g. a podman store on a disk-backed filesystem); the message says what to
    configure."""


class RestoreSpecError(RestoreError):
    """The source's restore spec asks for something this receiver refuses (its
    ``RestorePolicy``), or is malformed. ``field`` names the spec field, e.g.
    ``config.hooks.prestart``."""

    def __init__(self, message: str, *, field: str, phase: Phase | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message, phase=phase, cause=cause)
        self.field = field


# --- channel: handshake, records, wire protocol, transport -----------------


class ChannelError(CtliveError):
    """Base for errors of the secure channel."""


class HandshakeError(ChannelError):
    """The Noise handshake failed (bad message, bad key, wrong protocol)."""


class AuthenticationError(HandshakeError):
    """The peer could not be authenticated."""


class PeerNotAllowedError(AuthenticationError):
    """The peer's static key is not on the allow-list."""


class RecordError(ChannelError):
    """A received record is not acceptable; the channel is unusable afterwards."""


class TamperedRecordError(RecordError):
    """A record failed authentication: modified or injected bytes."""


class ReplayedRecordError(RecordError):
    """A record arrived a second time."""


class ReorderedRecordError(RecordError):
    """A record arrived out of order, or one in between was dropped."""


class TruncatedStreamError(RecordError):
    """The stream ended without an authenticated close frame."""


class ProtocolError(ChannelError):
    """A frame broke the wire protocol's rules."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class TransportError(ChannelError):
    """The network failed underneath the channel."""


class ConnectError(TransportError):
    """Could not connect to the peer."""


class ConnectTimeoutError(ConnectError):
    """Connecting to the peer timed out."""


class ClosedChannelError(TransportError):
    """The channel was used after we closed it."""


class BrokenChannelError(TransportError):
    """The peer or the network broke the connection."""


# --- attestation -----------------------------------------------------------


class AttestationError(CtliveError):
    """The destination's attestation evidence was refused."""


class ReportFormatError(AttestationError):
    """An attestation report is malformed (size, signature algorithm, reserved bytes)."""


class VerificationError(AttestationError):
    """The evidence did not verify cryptographically."""


class CertificateChainError(VerificationError):
    """The ARK/ASK/VCEK (or ASVK/VLEK) chain is invalid or untrusted."""


class ReportSignatureError(VerificationError):
    """The report's ECDSA P-384 signature does not verify."""


class CertificateSignatureError(CertificateChainError):
    """A certificate in the chain is not signed by its issuer (e.g. a wrong ASK)."""


class UntrustedRootError(CertificateChainError):
    """The chain ends in an ARK that is not a pinned AMD root (or the explicit test root)."""


class CertificateExpiredError(CertificateChainError):
    """A certificate in the chain is outside its validity period at "now"."""


class CertificateBindingError(VerificationError):
    """The VCEK does not belong to this report: hwID != chip_id, or its TCB != reported_tcb."""


class EvidenceFormatError(AttestationError):
    """Serialized evidence (report plus certificates) is malformed."""


class ProviderError(AttestationError):
    """The guest could not produce a report (no configfs-tsm, no /dev/sev-guest, firmware error)."""


class PolicyViolationError(AttestationError):
    """The report verified but a policy check refused it.

    ``field`` names the checked field, ``expected`` and ``found`` what the policy
    wanted and what the report held.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        expected: object = None,
        found: object = None,
        phase: Phase | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(
            f"{message} (field {field}: expected {expected!r}, found {found!r})",
            phase=phase, cause=cause)
        self.field = field
        self.expected = expected
        self.found = found


class MeasurementMismatchError(PolicyViolationError):
    """The launch measurement is not in the allowed set."""


class DebugPolicyError(PolicyViolationError):
    """The guest policy allows debugging (its memory is readable by the host)."""


class MigrateMaPolicyError(PolicyViolationError):
    """The guest policy allows a migration agent, which the policy refuses."""


class SmtPolicyError(PolicyViolationError):
    """SMT is allowed or enabled where the policy forbids it."""


class SingleSocketPolicyError(PolicyViolationError):
    """The guest policy does not require a single socket."""


class TcbTooLowError(PolicyViolationError):
    """A TCB component (bootloader, TEE, SNP, microcode, FMC) is below the minimum."""


class GuestSvnTooLowError(PolicyViolationError):
    """The guest SVN is below the minimum."""


class VmplMismatchError(PolicyViolationError):
    """The report was requested from a VMPL the policy does not allow."""


class HostDataMismatchError(PolicyViolationError):
    """HOST_DATA differs from the expected value."""


class FamilyIdMismatchError(PolicyViolationError):
    """FAMILY_ID differs from the expected value."""


class ImageIdMismatchError(PolicyViolationError):
    """IMAGE_ID differs from the expected value."""


class IdKeyDigestMismatchError(PolicyViolationError):
    """ID_KEY_DIGEST differs from the expected value."""


class AuthorKeyDigestMismatchError(PolicyViolationError):
    """AUTHOR_KEY_DIGEST differs from the expected value."""


class ChipIdNotAllowedError(PolicyViolationError):
    """CHIP_ID is not on the allow-list."""


class ProvisionalFirmwareError(PolicyViolationError):
    """The firmware is provisional (committed TCB or version differs from current)."""


class ReportDataMismatchError(PolicyViolationError):
    """REPORT_DATA does not bind this channel: replayed or foreign evidence."""


class SigningKeyPolicyError(PolicyViolationError):
    """The report is signed by a key type (VCEK/VLEK) the policy does not accept."""



# --- migration -------------------------------------------------------------


class MigrationError(CtliveError):
    """A migration failed. ``phase`` says where; the source workload was kept."""


class InDoubtError(MigrationError):
    """The migration's outcome could not be settled: the destination may hold a copy
    that is ready, so the source workload stays stopped (it is never both resumed and
    possibly committed). Run ``ctlive recover`` once the destination is reachable;
    ``migration_id`` names the journal entry."""

    def __init__(self, message: str, *, migration_id: str, phase: Phase | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message, phase=phase, cause=cause)
        self.migration_id = migration_id


class ReceiverLimitError(CtliveError):
    """The receiver refused a migration because one of its limits was reached; ``limit``
    names the setting (``max_migrations``, ``max_image_bytes``, ``max_state_bytes``)."""

    def __init__(self, message: str, *, limit: str, phase: Phase | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message, phase=phase, cause=cause)
        self.limit = limit


class ImageTooLargeError(ReceiverLimitError):
    """The migration's image outgrew what the receiver accepts for one migration, or
    what is left in its state directory."""
