"""What a source demands of a destination's SEV-SNP report.

:class:`SnpPolicy` is strict by default: debug off, no migration agent, VMPL 0,
no provisional firmware, and the measurement must be pinned (or explicitly left
open with ``allow_any_measurement``). Each refusal raises its own
:class:`~ctlive.errors.PolicyViolationError` subclass naming the field, what was
expected and what was found.

The policy itself fails closed too: every field is type-checked when a policy is
built, from Python or from a file. A wrong type, a hex value of the wrong length or an
unknown key raises :class:`~ctlive.errors.ConfigError` naming the field (and the
file), what was expected and what was found, e.g.
``policy.toml: [snp] debug_allowed: expected true or false, found "false" (a string)``.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import tomllib
from collections.abc import Callable, Iterable, Mapping
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

# --- checking configuration values ------------------------------------------------------
#
# A check takes a value and its label (where it came from and its name, e.g.
# "policy.toml: [snp] min_tcb.snp" or "SnpPolicy.debug_allowed"), and returns the value
# normalised (hex strings as bytes, arrays as frozensets) or raises ConfigError.

_Check = Callable[[Any, str], Any]

_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
    ((bytes, bytearray), "bytes"), ((list, tuple), "an array"), (Mapping, "a table"))


def _found(value: Any) -> str:
    """``"false" (a string)``: the value as TOML would show it, and its kind."""
    kind = next((k for t, k in _KINDS if isinstance(value, t)), f"a {type(value).__name__}")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = repr(value)
    if len(text) > 40:
        text = text[:36] + "…" + text[-1]
    return f"{text} ({kind})"


def _bad(label: str, expected: str, value: Any, note: str = "") -> ConfigError:
    found = _found(value)
    if note:
        found = f"{found[:-1]}, {note})"
    return ConfigError(f"{label}: expected {expected}, found {found}")


def _boolean(value: Any, label: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(label, "true or false", value)
    return value


def _integer(low: int, high: int) -> _Check:
    def check(value: Any, label: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(label, f"an integer from {low} to {high}", value)
        return value
    return check


def _path(value: Any, label: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(label, "a file name", value)
    return value


def _items(value: Any) -> Iterable[Any]:
    """A single string or bytes value stands for an array of one."""
    return [value] if isinstance(value, str | bytes | bytearray) else value


def _unhex(value: str | bytes | bytearray) -> bytes:
    return bytes.fromhex(value) if isinstance(value, str) else bytes(value)


def _hex(size: int) -> _Check:
    expected = f"{size} bytes as {2 * size} hex digits"

    def check(value: Any, label: str) -> bytes:
        if not isinstance(value, str | bytes | bytearray):
            raise _bad(label, expected, value)
        try:
            raw = _unhex(value)
        except ValueError:
            raise _bad(label, expected, value, "not hex") from None
        if len(raw) != size:
            raise _bad(label, expected, value, f"{len(raw)} byte" + "s" * (len(raw) != 1))
        return raw
    return check


def _array(item: _Check, what: str, *, single: bool = False) -> _Check:
    """An array (any iterable but a string or a table, from Python) of values passing
    ``item``. ``single``: a lone string or bytes value stands for an array of one."""
    def check(value: Any, label: str) -> frozenset[Any]:
        items = _items(value) if single else value
        if isinstance(items, str | bytes | bytearray | Mapping) or not isinstance(items, Iterable):
            raise _bad(label, f"an array of {what}", value)
        return frozenset(item(v, f"{label}[{i}]") for i, v in enumerate(items))
    return check


def _optional(check: _Check) -> _Check:
    def optional(value: Any, label: str) -> Any:
        return None if value is None else check(value, label)
    return optional


def _one_of(names: Iterable[str]) -> _Check:
    allowed = sorted(names)
    expected = " or ".join(json.dumps(n) for n in allowed)

    def check(value: Any, label: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _bad(label, expected, value)
        return value
    return check


def _table(checks: Mapping[str, _Check], data: Any, where: str) -> dict[str, Any]:
    """Check every key of ``data`` (``where`` prefixes its labels); unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise _bad(where.rstrip(". ") or "policy", "a table", data)
    out = {}
    for key, value in data.items():
        check = checks.get(key) if isinstance(key, str) else None
        if check is None:
            close = difflib.get_close_matches(str(key), checks, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(checks)
            raise ConfigError(f"{where}{key}: unknown key ({hint})")
        out[key] = check(value, f"{where}{key}")
    return out


def _check_args(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
                checks: Mapping[str, _Check], positional: int = 0) -> None:
    """Check the arguments of ``cls(...)`` before attrs' ``__init__`` sees them: what
    would be a TypeError there (an unknown or repeated keyword, too many positional
    values) is a ConfigError too, like a wrong type. The first ``positional`` names of
    ``checks`` may be given by position, in that order."""
    if len(args) > positional:
        raise ConfigError(f"{cls.__name__}: expected at most {positional} values by "
                          f"position (name the fields), found {len(args)}")
    given = dict(zip(checks, args, strict=False))
    twice = sorted(kwargs.keys() & given.keys())
    if twice:
        raise ConfigError(f"{cls.__name__}.{twice[0]}: given twice")
    _table(checks, {**given, **kwargs}, f"{cls.__name__}.")


# --- converters: values that passed their check, normalised -----------------------------


def _byteset(v: str | bytes | Iterable[str | bytes] | None) -> frozenset[bytes] | None:
    return None if v is None else frozenset(_unhex(x) for x in _items(v))


def _bytes(v: str | bytes | None) -> bytes | None:
    return None if v is None else _unhex(v)


def _min_tcb(v: MinTcb | Mapping[str, int]) -> MinTcb:
    return v if isinstance(v, MinTcb) else MinTcb(**v)


_SVN8 = _integer(0, 0xFF)
_TCB_CHECKS: dict[str, _Check] = dict.fromkeys(
    ("bootloader", "tee", "snp", "microcode", "fmc"), _SVN8)


@attrs.frozen
class MinTcb:
    """Minimum SVN per TCB component (applied to reported_tcb, and current_tcb).
    Each is an integer from 0 to 255; anything else raises ConfigError."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    fmc: int = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> MinTcb:
        _check_args(cls, args, kwargs, _TCB_CHECKS, positional=len(_TCB_CHECKS))
        return super().__new__(cls)

    def check(self, tcb: TcbVersion, which: str) -> None:
        """Raise TcbTooLowError for the first component below its minimum."""
        for name, found in tcb.components().items():
            want = getattr(self, name)
            if found < want:
                raise TcbTooLowError(
                    f"{which} {name} SVN is below the minimum",
                    field=f"{which}.{name}", expected=f">= {want}", found=found)


def _min_tcb_check(value: Any, label: str) -> MinTcb:
    if isinstance(value, MinTcb):
        return value
    if not isinstance(value, Mapping):
        raise _bad(label, "a table of " + ", ".join(_TCB_CHECKS), value)
    return MinTcb(**_table(_TCB_CHECKS, value, f"{label}."))


_SNP_CHECKS: dict[str, _Check] = {
    "measurements": _optional(_array(_hex(48), "48-byte hex strings", single=True)),
    "allow_any_measurement": _boolean,
    "debug_allowed": _boolean,
    "migrate_ma_allowed": _boolean,
    "smt_allowed": _boolean,
    "single_socket_required": _boolean,
    "min_tcb": _min_tcb_check,
    "min_guest_svn": _integer(0, 0xFFFF_FFFF),
    "vmpls": _array(_integer(0, 3), "VMPLs (integers from 0 to 3)"),
    "host_data": _optional(_hex(32)),
    "family_id": _optional(_hex(16)),
    "image_id": _optional(_hex(16)),
    "id_key_digest": _optional(_hex(48)),
    "author_key_digest": _optional(_hex(48)),
    "chip_ids": _optional(_array(_hex(64), "64-byte hex strings", single=True)),
    "allow_provisional_firmware": _boolean,
    "signing_keys": _array(_one_of(k.name for k in SigningKey if k is not SigningKey.NONE),
                           '"VCEK" or "VLEK"'),
    "simulated_chain": _optional(_path),
}


@attrs.frozen(kw_only=True)
class SnpPolicy:
    """The checks a report must pass besides signature and chain.

    Every field is checked when the policy is built (see the module's docstring): a
    bool must be ``True`` or ``False``, an int an ``int`` in range, bytes the right
    length (hex strings are accepted for them), arrays arrays."""

    measurements: frozenset[bytes] | None = attrs.field(default=None, converter=_byteset)
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
    host_data: bytes | None = attrs.field(default=None, converter=_bytes)
    family_id: bytes | None = attrs.field(default=None, converter=_bytes)
    image_id: bytes | None = attrs.field(default=None, converter=_bytes)
    id_key_digest: bytes | None = attrs.field(default=None, converter=_bytes)
    author_key_digest: bytes | None = attrs.field(default=None, converter=_bytes)
    chip_ids: frozenset[bytes] | None = attrs.field(default=None, converter=_byteset)
    """Allowed CHIP_IDs; None allows any chip."""
    allow_provisional_firmware: bool = False
    signing_keys: frozenset[str] = attrs.field(
        default=frozenset({"VCEK", "VLEK"}), converter=frozenset)
    simulated_chain: str | None = None
    """A PEM file with a *simulated* platform's ARK and ASK (``ctlive serve --provider
    simulated --simulated-chain FILE`` writes it): the only way a source trusts simulated
    evidence. Results are marked insecure. Relative to the policy file when loaded."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SnpPolicy:
        _check_args(cls, args, kwargs, _SNP_CHECKS)
        return super().__new__(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> SnpPolicy:
        """Build from a mapping (hex strings for byte fields, arrays for sets); unknown
        keys and wrong types are ConfigErrors. ``where`` prefixes the field names in
        error messages, e.g. ``"policy.toml: [snp] "``."""
        return cls(**_table(_SNP_CHECKS, data, where))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> SnpPolicy:
        """Load a policy file: its ``[snp]`` table, or policy keys at the top level.
        Errors name the file and the field."""
        p = pathlib.Path(path)
        try:
            with p.open("rb") as f:
                data = tomllib.load(f)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot load policy {p}: {exc}", cause=exc) from exc
        if "snp" not in data:
            return cls.from_dict(data, where=f"{p}: ")._relative_to(p.parent)
        others = sorted(set(data) - {"snp"})
        if others:
            raise ConfigError(f"{p}: {others[0]}: unknown key (the policy goes in the [snp] "
                              "table; nothing else belongs in the file)")
        if not isinstance(data["snp"], dict):
            raise _bad(f"{p}: snp", "a table [snp]", data["snp"])
        policy = cls.from_dict(data["snp"], where=f"{p}: [snp] ")
        return policy._relative_to(p.parent)

    def _relative_to(self, base: pathlib.Path) -> SnpPolicy:
        if self.simulated_chain is None or os.path.isabs(self.simulated_chain):
            return self
        return attrs.evolve(self, simulated_chain=str(base / self.simulated_chain))

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
