"""Certificates: the AMD chain ARK -> ASK -> VCEK (or ARK -> ASVK -> VLEK), trust
anchors pinned by SPKI hash, the VCEK's SPL/hwID extensions, and the evidence
container that carries a report with its certificates over the channel.

All X.509 and signature work is done by ``cryptography``. AMD signs its
certificates with RSASSA-PSS (SHA-384, MGF1-SHA-384, 48-byte salt). VCEKs have
serial number 0 and no key identifiers, so each signature is verified directly
against the expected issuer instead of through a generic path builder.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import struct
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ctlive.attest.snp_report import AttestationReport, Product, TcbVersion
from ctlive.errors import (
    CertificateBindingError,
    CertificateChainError,
    CertificateExpiredError,
    CertificateSignatureError,
    EvidenceFormatError,
    ReportSignatureError,
    UntrustedRootError,
)

__all__ = [
    "AMD_ARK_SPKI_SHA256",
    "CERT_TABLE_GUIDS",
    "Evidence",
    "TrustedRoot",
    "amd_roots",
    "parse_cert_table",
    "spki_sha256",
    "vcek_binding",
    "verify_chain",
    "verify_report_signature",
]

# SHA-256 of the SubjectPublicKeyInfo of AMD's ARK per product.
AMD_ARK_SPKI_SHA256: Mapping[Product, str] = {
    Product.MILAN: "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    Product.GENOA: "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    Product.TURIN: "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}

# GUIDs of the extended-report certificate table (SNP_GET_EXT_REPORT, configfs auxblob).
CERT_TABLE_GUIDS: Mapping[str, str] = {
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
}

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_OID_SPL = {
    "bootloader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
    "fmc": "1.3.6.1.4.1.3704.1.3.9",
}
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_OID_PRODUCT = "1.3.6.1.4.1.3704.1.2"

_MAGIC = b"CTLEVID1"
_TAGS = {1: "report", 2: "vcek", 3: "vlek", 4: "ask", 5: "asvk", 6: "ark"}
_MAX_EVIDENCE = 64 * 1024


def load_der_or_pem(data: bytes) -> x509.Certificate:
    """Load one certificate from DER or PEM; errors become CertificateChainError."""
    try:
        with warnings.catch_warnings():
            # AMD's VCEKs have serial number 0, which cryptography warns about.
            warnings.simplefilter("ignore")
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CertificateChainError(f"not a certificate: {exc}", cause=exc) from exc


def public_key(cert: x509.Certificate) -> Any:
    """The certificate's key; an unknown or malformed key is a chain error."""
    try:
        return cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CertificateChainError(
            f"certificate {cert.subject.rfc4514_string()!r} has an unusable key: {exc}",
            cause=exc) from exc


def _extension(cert: x509.Certificate, oid: str) -> Any:
    """The raw value of an extension, or None; malformed extensions are chain errors."""
    try:
        return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise CertificateChainError(f"malformed certificate extensions: {exc}",
                                    cause=exc) from exc


def spki_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's SubjectPublicKeyInfo (the pin)."""
    spki = public_key(cert).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@attrs.frozen
class TrustedRoot:
    """A root (ARK) the verifier accepts, with the product it stands for."""

    product: Product
    ark: x509.Certificate
    ask: x509.Certificate | None = None
    """The product's ASK, used when the evidence does not carry one."""
    insecure: bool = False
    """True for a simulated platform's root: usable only when passed explicitly."""


def amd_roots() -> tuple[TrustedRoot, ...]:
    """AMD's bundled ARK/ASK per product, each checked against its SPKI pin."""
    roots = []
    files = importlib.resources.files("ctlive.attest") / "roots"
    for product in Product:
        name = product.value.lower()
        ark = load_der_or_pem((files / f"{name}_ark.pem").read_bytes())
        ask = load_der_or_pem((files / f"{name}_ask.pem").read_bytes())
        if spki_sha256(ark) != AMD_ARK_SPKI_SHA256[product]:
            raise UntrustedRootError(f"bundled {product.value} ARK does not match its pin")
        roots.append(TrustedRoot(product, ark, ask))
    return tuple(roots)


@attrs.frozen
class Evidence:
    """A report and the certificates that vouch for it (DER)."""

    report: bytes
    vcek: bytes | None = None
    vlek: bytes | None = None
    ask: bytes | None = None
    asvk: bytes | None = None
    ark: bytes | None = None

    def to_bytes(self) -> bytes:
        """Serialize: magic, then (u16 tag, u32 length, bytes) per present item."""
        out = bytearray(_MAGIC)
        for tag, name in _TAGS.items():
            value = getattr(self, name)
            if value is not None:
                out += struct.pack("<HI", tag, len(value)) + value
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        """Parse evidence from a peer; bounded and strict."""
        if len(data) > _MAX_EVIDENCE:
            raise EvidenceFormatError(f"evidence is {len(data)} bytes, limit {_MAX_EVIDENCE}")
        if not data.startswith(_MAGIC):
            raise EvidenceFormatError("evidence does not start with the ctlive magic")
        items: dict[str, bytes] = {}
        off = len(_MAGIC)
        while off < len(data):
            if len(data) - off < 6:
                raise EvidenceFormatError(f"truncated evidence item header at {off}")
            tag, length = struct.unpack_from("<HI", data, off)
            off += 6
            name = _TAGS.get(tag)
            if name is None:
                raise EvidenceFormatError(f"unknown evidence item {tag} at {off - 6}")
            if name in items:
                raise EvidenceFormatError(f"duplicate evidence item {name}")
            if length > len(data) - off:
                raise EvidenceFormatError(f"evidence item {name} runs past the end")
            items[name] = data[off : off + length]
            off += length
        if "report" not in items:
            raise EvidenceFormatError("evidence holds no report")
        return cls(**items)

    @classmethod
    def from_cert_table(cls, report: bytes, table: bytes) -> Evidence:
        """Evidence from a report and an extended-report certificate table."""
        certs = parse_cert_table(table)
        return cls(report=report, **{k: v for k, v in certs.items() if k in _TAGS.values()})


def parse_cert_table(table: bytes) -> dict[str, bytes]:
    """Parse the GUID table of SNP_GET_EXT_REPORT / configfs-tsm ``auxblob``.

    Entries are (GUID, u32 offset, u32 length), ended by an all-zero entry;
    offsets are relative to the start of the table.
    """
    out: dict[str, bytes] = {}
    off = 0
    while True:
        if len(table) - off < 24:
            raise EvidenceFormatError("certificate table has no terminating entry")
        guid_raw = table[off : off + 16]
        c_off, c_len = struct.unpack_from("<II", table, off + 16)
        off += 24
        if not any(guid_raw) and c_off == 0 and c_len == 0:
            return out
        if c_off > len(table) or c_len > len(table) - c_off:
            raise EvidenceFormatError("certificate table entry points outside the table")
        name = CERT_TABLE_GUIDS.get(str(uuid.UUID(bytes_le=guid_raw)))
        if name is not None:
            out[name] = table[c_off : c_off + c_len]


def _check_validity(cert: x509.Certificate, now: datetime.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"{what} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {now:%Y-%m-%d %H:%M}")


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    key = public_key(issuer)
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateSignatureError(f"issuer of the {what} does not have an RSA key")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except (InvalidSignature, ValueError) as exc:
        raise CertificateSignatureError(
            f"the {what} is not signed by {issuer.subject.rfc4514_string()}", cause=exc
        ) from exc


def verify_chain(
    leaf: x509.Certificate,
    intermediate: x509.Certificate | None,
    roots: Iterable[TrustedRoot],
    now: datetime.datetime,
    *,
    leaf_name: str = "VCEK",
    presented_ark: x509.Certificate | None = None,
) -> TrustedRoot:
    """Verify leaf <- intermediate <- a trusted ARK; return the root that anchors it.

    A presented ARK is only used to give a precise error: trust comes solely from
    ``roots`` (pinned AMD ARKs, or an explicitly passed test root).
    """
    roots = tuple(roots)
    if presented_ark is not None and not any(
        spki_sha256(presented_ark) == spki_sha256(r.ark) for r in roots
    ):
        raise UntrustedRootError(
            f"the evidence's ARK ({presented_ark.subject.rfc4514_string()}, SPKI "
            f"{spki_sha256(presented_ark)[:16]}…) is not a trusted root")
    last: Exception | None = None
    for root in roots:
        inter = intermediate or root.ask
        if inter is None:
            continue
        try:
            _check_signed_by(root.ark, root.ark, "ARK")
            _check_signed_by(inter, root.ark, "ASK" if leaf_name == "VCEK" else "ASVK")
            _check_signed_by(leaf, inter, leaf_name)
        except CertificateSignatureError as exc:
            last = exc
            continue
        for cert, what in ((root.ark, "ARK"), (inter, "ASK"), (leaf, leaf_name)):
            _check_validity(cert, now, what)
        return root
    if last is not None:
        if isinstance(last, CertificateSignatureError) and intermediate is not None:
            # Distinguish "the ASK is wrong" from "the VCEK is not under any ASK".
            for root in roots:
                try:
                    _check_signed_by(intermediate, root.ark, "ASK")
                except CertificateSignatureError:
                    continue
                raise CertificateSignatureError(
                    f"the {leaf_name} is not signed by the presented ASK") from last
            raise CertificateSignatureError(
                "the presented ASK is not signed by any trusted ARK") from last
        raise UntrustedRootError(f"no trusted root vouches for this {leaf_name}") from last
    raise UntrustedRootError("no trusted root and no ASK to verify against")


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    ext = _extension(cert, oid)
    if ext is None:
        return None
    raw = ext.value
    # A DER INTEGER: tag 0x02, short length, big-endian value.
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:
        raise CertificateBindingError(f"extension {oid} is not a DER INTEGER")
    return int.from_bytes(raw[2:], "big", signed=True)


def vcek_binding(cert: x509.Certificate, report: AttestationReport, *, vlek: bool) -> None:
    """The VCEK's SPL extensions must equal reported_tcb, its hwID the chip_id."""
    tcb: TcbVersion = report.reported_tcb
    for name, value in tcb.components().items():
        ext = _ext_int(cert, _OID_SPL[name])
        if ext is None:
            raise CertificateBindingError(f"the certificate has no {name} SPL extension")
        if ext != value:
            raise CertificateBindingError(
                f"certificate {name} SPL is {ext} but the report's reported_tcb has {value}: "
                "the certificate was issued for another TCB")
    if vlek:
        return
    hwid = _extension(cert, _OID_HWID)
    if hwid is None:
        raise CertificateBindingError("the VCEK has no hwID extension")
    value = hwid.value
    if report.mask_chip_key:
        return  # chip_id is zeroed by the guest's choice; nothing to compare
    if value != report.chip_id:
        raise CertificateBindingError(
            f"the VCEK belongs to chip {value[:8].hex()}…, the report to "
            f"{report.chip_id[:8].hex()}…: a VCEK from another chip")


def verify_report_signature(report: AttestationReport, cert: x509.Certificate) -> None:
    """ECDSA P-384 / SHA-384 over bytes 0x000..0x29F, r and s little-endian."""
    key = public_key(cert)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ReportSignatureError("the signing certificate does not hold a P-384 key")
    sig = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(sig, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise ReportSignatureError(
            "the report's signature does not verify with this certificate", cause=exc
        ) from exc


def product_name(cert: x509.Certificate) -> str | None:
    """The productName extension of a VCEK (e.g. "Milan-B0"), if present."""
    ext = _extension(cert, _OID_PRODUCT)
    if ext is None:
        return None
    raw = ext.value
    return bytes(raw[2:]).decode("ascii", "replace") if len(raw) > 2 else None
