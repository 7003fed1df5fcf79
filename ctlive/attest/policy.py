"""What a source demands of a destination's SEV-SNP report.

:class:`SnpPolicy` is strict by default: debug off, no migration agent, VMPL 0,
no provisional firmware, and the measurement must be pinned (or explicitly left
open with ``allow_any_measurement``). Each refusal raises its own
:class:`~ctlive.errors.PolicyViolationError` subclass naming the field, what was
expected and what was found.
"""

from __future__ import annotations

import os
import pathlib
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ctlive.attest.snp_report import AttestationReport, SigningKey, TcbVersion
from ctlive.errors import (
    AuthorKeyDigestMismatchError,
    ChipIdNotAllowedError,
    ConfigError,
    DebugPolicyError,
    FamilyIdMismatchError,
    GuestSvnTooLowError,
    HostDataMismatchError,
    IdKeyDigestMismatchError,
    ImageIdMismatchError,
    MeasurementMismatchError,
    MigrateMaPolicyError,
    PolicyViolationError,
    ProvisionalFirmwareError,
    SigningKeyPolicyError,
    SingleSocketPolicyError,
    SmtPolicyError,
    TcbTooLowError,
    VmplMismatchError,
)

__all__ = ["MinTcb", "SnpPolicy"]


def _to_bytes(v: Any) -> bytes:
    return bytes.fromhex(v) if isinstance(v, str) else bytes(v)


def _hexset(value: Any, size: int) -> frozenset[bytes] | None:
    if value is None:
        return None
    if isinstance(value, bytes | str):
        value = [value]
    out = set()
    for v in value:
        b = _to_bytes(v)
        if len(b) != size:
            raise ConfigError(f"expected {size} bytes, got {len(b)}: {b.hex()}")
        out.add(b)
    return frozenset(out)


def _hexbytes(value: Any, size: int) -> bytes | None:
    if value is None:
        return None
    b = _to_bytes(value)
    if len(b) != size:
        raise ConfigError(f"expected {size} bytes, got {len(b)}")
    return b


def _measurements(v: Any) -> frozenset[bytes] | None:
    return _hexset(v, 48)


def _chip_ids(v: Any) -> frozenset[bytes] | None:
    return _hexset(v, 64)


def _b16(v: Any) -> bytes | None:
    return _hexbytes(v, 16)


def _b32(v: Any) -> bytes | None:
    return _hexbytes(v, 32)


def _b48(v: Any) -> bytes | None:
    return _hexbytes(v, 48)


@attrs.frozen
class MinTcb:
    """Minimum SVN per TCB component (applied to reported_tcb, and current_tcb)."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    fmc: int = 0

    def check(self, tcb: TcbVersion, which: str) -> None:
        """Raise TcbTooLowError for the first component below its minimum."""
        for name, found in tcb.components().items():
            want = getattr(self, name)
            if found < want:
                raise TcbTooLowError(
                    f"{which} {name} SVN is below the minimum",
                    field=f"{which}.{name}", expected=f">= {want}", found=found)


def _min_tcb(value: Any) -> MinTcb:
    if isinstance(value, MinTcb):
        return value
    if isinstance(value, Mapping):
        try:
            return MinTcb(**value)
        except TypeError as exc:
            raise ConfigError(f"bad min_tcb: {exc}") from exc
    raise ConfigError("min_tcb must be a table of bootloader/tee/snp/microcode/fmc")


@attrs.frozen(kw_only=True)
class SnpPolicy:
    """The checks a report must pass besides signature and chain."""

    measurements: frozenset[bytes] | None = attrs.field(default=None, converter=_measurements)
    """Allowed launch measurements (48 bytes each). None refuses every report unless
    ``allow_any_measurement`` is set."""
    allow_any_measurement: bool = False
    """Accept any measurement (inspection only; the measurement is still reported)."""
    debug_allowed: bool = False
    migrate_ma_allowed: bool = False
    smt_allowed: bool = True
    """If False, refuse guests whose policy allows SMT or whose platform runs SMT."""
    single_socket_required: bool = False
    min_tcb: MinTcb = attrs.field(factory=MinTcb, converter=_min_tcb)
    min_guest_svn: int = 0
    vmpls: frozenset[int] = attrs.field(default=frozenset({0}), converter=frozenset)
    """VMPLs the report may come from (0 = the most privileged guest layer)."""
    host_data: bytes | None = attrs.field(default=None, converter=_b32)
    family_id: bytes | None = attrs.field(default=None, converter=_b16)
    image_id: bytes | None = attrs.field(default=None, converter=_b16)
    id_key_digest: bytes | None = attrs.field(default=None, converter=_b48)
    author_key_digest: bytes | None = attrs.field(default=None, converter=_b48)
    chip_ids: frozenset[bytes] | None = attrs.field(default=None, converter=_chip_ids)
    """Allowed CHIP_IDs; None allows any chip."""
    allow_provisional_firmware: bool = False
    signing_keys: frozenset[str] = attrs.field(
        default=frozenset({"VCEK", "VLEK"}), converter=frozenset)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SnpPolicy:
        """Build from a mapping (hex strings for byte fields); unknown keys are errors."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid policy: {exc}", cause=exc) from exc

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> SnpPolicy:
        """Load a policy file; its ``[snp]`` table, or the top level."""
        p = pathlib.Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot load policy {p}: {exc}", cause=exc) from exc
        return cls.from_dict(data.get("snp", data))

    @classmethod
    def inspection(cls) -> SnpPolicy:
        """The CLI's default: every strict rule, but the measurement not pinned."""
        return cls(allow_any_measurement=True)

    def check(self, report: AttestationReport) -> list[tuple[str, str]]:
        """Run every check; raise the first violation. Returns (check, verdict) pairs."""
        verdicts: list[tuple[str, str]] = []

        def ok(name: str, detail: str = "ok") -> None:
            verdicts.append((name, detail))

        if self.measurements is not None:
            if report.measurement not in self.measurements:
                raise MeasurementMismatchError(
                    "launch measurement not allowed", field="measurement",
                    expected=sorted(m.hex() for m in self.measurements),
                    found=report.measurement.hex())
            ok("measurement", "pinned")
        elif not self.allow_any_measurement:
            raise MeasurementMismatchError(
                "the policy pins no measurement (set measurements, or allow_any_measurement "
                "for inspection only)", field="measurement", expected="a pinned set",
                found=report.measurement.hex())
        else:
            ok("measurement", "not pinned (allow_any_measurement)")
        pol = report.policy
        if pol.debug and not self.debug_allowed:
            raise DebugPolicyError("the guest policy allows debugging", field="policy.debug",
                                   expected=False, found=True)
        ok("policy.debug", "allowed" if pol.debug else "off")
        if pol.migrate_ma and not self.migrate_ma_allowed:
            raise MigrateMaPolicyError("the guest policy allows a migration agent",
                                       field="policy.migrate_ma", expected=False, found=True)
        ok("policy.migrate_ma")
        if not self.smt_allowed and (pol.smt_allowed or report.platform_info.smt_enabled):
            raise SmtPolicyError("SMT is allowed or enabled", field="policy.smt_allowed",
                                 expected=False, found=True)
        ok("smt")
        if self.single_socket_required and not pol.single_socket:
            raise SingleSocketPolicyError("single socket not required by the guest policy",
                                          field="policy.single_socket", expected=True,
                                          found=False)
        ok("single_socket")
        if report.vmpl not in self.vmpls:
            raise VmplMismatchError("report from a VMPL the policy does not allow",
                                    field="vmpl", expected=sorted(self.vmpls), found=report.vmpl)
        ok("vmpl", str(report.vmpl))
        if report.signing_key.name not in self.signing_keys:
            raise SigningKeyPolicyError("signing key type not accepted", field="signing_key",
                                        expected=sorted(self.signing_keys),
                                        found=report.signing_key.name)
        if report.signing_key is SigningKey.NONE:
            raise SigningKeyPolicyError("the report is unsigned", field="signing_key",
                                        expected="VCEK or VLEK", found="NONE")
        ok("signing_key", report.signing_key.name)
        self.min_tcb.check(report.reported_tcb, "reported_tcb")
        self.min_tcb.check(report.current_tcb, "current_tcb")
        ok("tcb", str(report.reported_tcb))
        if report.guest_svn < self.min_guest_svn:
            raise GuestSvnTooLowError("guest SVN below the minimum", field="guest_svn",
                                      expected=f">= {self.min_guest_svn}", found=report.guest_svn)
        ok("guest_svn", str(report.guest_svn))
        exact: Iterable[tuple[str, bytes | None, bytes, type[PolicyViolationError]]] = (
            ("host_data", self.host_data, report.host_data, HostDataMismatchError),
            ("family_id", self.family_id, report.family_id, FamilyIdMismatchError),
            ("image_id", self.image_id, report.image_id, ImageIdMismatchError),
            ("id_key_digest", self.id_key_digest, report.id_key_digest,
             IdKeyDigestMismatchError),
            ("author_key_digest", self.author_key_digest, report.author_key_digest,
             AuthorKeyDigestMismatchError),
        )
        for name, want, found, err in exact:
            if want is not None and want != found:
                raise err(f"{name} differs", field=name, expected=want.hex(), found=found.hex())
            ok(name, "matches" if want is not None else "not checked")
        if self.chip_ids is not None and report.chip_id not in self.chip_ids:
            raise ChipIdNotAllowedError("chip not on the allow-list", field="chip_id",
                                        expected=sorted(c.hex()[:16] + "…" for c in self.chip_ids),
                                        found=report.chip_id.hex()[:16] + "…")
        ok("chip_id", "allowed" if self.chip_ids is not None else "not checked")
        provisional = (report.committed_tcb.raw != report.current_tcb.raw
                       or report.committed_version != report.current_version)
        if provisional and not self.allow_provisional_firmware:
            raise ProvisionalFirmwareError(
                "firmware is provisional (not committed)", field="committed_tcb",
                expected=f"{report.current_tcb} v{report.current_version}",
                found=f"{report.committed_tcb} v{report.committed_version}")
        ok("firmware", "provisional (allowed)" if provisional else "committed")
        return verdicts
