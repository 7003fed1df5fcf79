"""The source's verifier: evidence in, an AttestationResult or a precise refusal out.

Order of checks: evidence format, report format, certificate chain to a trusted
root, certificate-to-report binding (TCB, hwID), the report signature, the
report_data binding to this channel, then the policy. Pure and synchronous;
"now" is injectable so tests can pin time.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from collections.abc import Callable, Iterable

from cryptography import x509

from ctlive.attest.certs import (
    Evidence,
    TrustedRoot,
    amd_roots,
    load_der_or_pem,
    product_name,
    vcek_binding,
    verify_chain,
    verify_report_signature,
)
from ctlive.attest.policy import SnpPolicy
from ctlive.attest.snp_report import AttestationReport, Product, SigningKey, parse_report
from ctlive.errors import (
    CertificateChainError,
    ConfigError,
    ReportDataMismatchError,
    ReportFormatError,
)
from ctlive.protocol.evidence import AttestationResult

__all__ = ["SnpVerifier", "VerifiedReport"]


class VerifiedReport:
    """A report that passed verification, with the per-check verdicts."""

    def __init__(self, report: AttestationReport, root: TrustedRoot,
                 verdicts: list[tuple[str, str]]) -> None:
        self.report = report
        self.root = root
        self.verdicts = verdicts


class SnpVerifier:
    """Verifies SEV-SNP evidence against a policy (an ``EvidenceVerifier``).

    ``trusted_roots`` defaults to AMD's bundled ARKs, pinned by SPKI hash. A
    simulated platform's root is trusted only when passed here explicitly, and
    its results are marked insecure. ``cert_cache_dir`` may hold VCEKs named
    ``<chip_id hex>-<reported_tcb hex>.der`` for evidence that carries none.
    """

    def __init__(
        self,
        policy: SnpPolicy,
        *,
        trusted_roots: Iterable[TrustedRoot] | None = None,
        cert_cache_dir: str | os.PathLike[str] | None = None,
        now: Callable[[], datetime.datetime] | datetime.datetime | None = None,
    ) -> None:
        self.policy = policy
        self.roots = tuple(trusted_roots) if trusted_roots is not None else amd_roots()
        if policy.simulated_chain is not None:
            self.roots += (simulated_root(policy.simulated_chain),)
        self.cache = pathlib.Path(cert_cache_dir) if cert_cache_dir else None
        self._now = now

    def now(self) -> datetime.datetime:
        """The time used for certificate validity."""
        if self._now is None:
            return datetime.datetime.now(datetime.UTC)
        if isinstance(self._now, datetime.datetime):
            return self._now
        return self._now()

    def _leaf(self, ev: Evidence, report: AttestationReport) -> tuple[x509.Certificate, str]:
        if report.signing_key is SigningKey.VLEK:
            if ev.vlek is None:
                raise CertificateChainError("the report is VLEK-signed but no VLEK was given")
            return load_der_or_pem(ev.vlek), "VLEK"
        if ev.vcek is not None:
            return load_der_or_pem(ev.vcek), "VCEK"
        if self.cache is not None:
            path = self.cache / f"{report.chip_id.hex()}-{report.reported_tcb.raw.hex()}.der"
            if path.is_file():
                return load_der_or_pem(path.read_bytes()), "VCEK"
        raise CertificateChainError(
            "no VCEK: the evidence carries none and none is cached for this chip and TCB")

    def check_evidence(self, ev: Evidence, *, report_data: bytes | None = None,
                       apply_policy: bool = True) -> VerifiedReport:
        """Verify evidence. ``report_data`` None skips the channel binding and
        ``apply_policy=False`` the policy (both for inspecting reports offline)."""
        report = parse_report(ev.report)
        leaf, leaf_name = self._leaf(ev, report)
        inter_raw = ev.asvk if leaf_name == "VLEK" else ev.ask
        inter = load_der_or_pem(inter_raw) if inter_raw is not None else None
        ark = load_der_or_pem(ev.ark) if ev.ark is not None else None
        root = verify_chain(leaf, inter, self.roots, self.now(), leaf_name=leaf_name,
                            presented_ark=ark)
        if report.product is None:
            report = report.with_product(root.product)
        elif report.product is not root.product:
            raise ReportFormatError(
                f"the report's CPUID says {report.product.value} but the chain is "
                f"{root.product.value}'s")
        vcek_binding(leaf, report, vlek=leaf_name == "VLEK")
        verify_report_signature(report, leaf)
        verdicts = [("chain", f"{leaf_name} <- {'ASVK' if leaf_name == 'VLEK' else 'ASK'} <- "
                     f"ARK-{root.product.value}" + (" (SIMULATED, INSECURE)" if root.insecure
                                                     else " (AMD, pinned)")),
                    ("certificate binding", "TCB and hwID match"),
                    ("signature", "ECDSA P-384 ok")]
        if report_data is not None:
            if report.report_data != report_data:
                raise ReportDataMismatchError(
                    "the report does not bind this channel (replayed or foreign evidence)",
                    field="report_data", expected=report_data.hex()[:32] + "…",
                    found=report.report_data.hex()[:32] + "…")
            verdicts.append(("report_data", "binds this channel"))
        if apply_policy:
            verdicts += self.policy.check(report)
        name = product_name(leaf)
        if name:
            verdicts.append(("product", name))
        return VerifiedReport(report, root, verdicts)

    def verify(self, evidence: bytes, report_data: bytes) -> AttestationResult:
        """EvidenceVerifier: check everything, including the channel binding."""
        ev = Evidence.from_bytes(evidence)
        try:
            checked = self.check_evidence(ev, report_data=report_data)
        except ValueError as exc:
            # cryptography parses certificate fields lazily; malformed DER surfaces here.
            raise CertificateChainError(f"malformed certificate: {exc}", cause=exc) from exc
        rep = checked.report
        details = {f"check {k}": v for k, v in checked.verdicts}
        details.update({
            "measurement": rep.measurement.hex(),
            "reported_tcb": str(rep.reported_tcb),
            "chip_id": rep.chip_id.hex()[:16] + "…",
            "vmpl": str(rep.vmpl),
            "guest_svn": str(rep.guest_svn),
            "firmware": "%d.%d.%d" % rep.current_version,
        })
        insecure = checked.root.insecure
        return AttestationResult(
            platform="simulated-sev-snp (INSECURE)" if insecure else "sev-snp",
            measurement=rep.measurement,
            insecure=insecure,
            details=details,
        )


def simulated_root(path: str | os.PathLike[str]) -> TrustedRoot:
    """The trusted root in a simulated platform's chain file (ARK then ASK, PEM), marked
    insecure; ConfigError if the file is not one."""
    try:
        certs = x509.load_pem_x509_certificates(pathlib.Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the simulated chain {path}: {exc}", cause=exc) from exc
    if len(certs) < 2:
        raise ConfigError(f"{path}: a simulated chain holds the ARK and the ASK (PEM)")
    return TrustedRoot(Product.MILAN, certs[0], certs[1], insecure=True)
