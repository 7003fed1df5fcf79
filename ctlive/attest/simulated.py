"""A simulated SEV-SNP platform, for tests and the demo. INSECURE by design.

It makes its own ARK (RSA-4096) -> ASK (RSA-4096) -> VCEK (ECDSA P-384) at run
time, with AMD's certificate profile (RSASSA-PSS SHA-384 salt 48, SPL and hwID
extensions), and signs reports with the real layout exactly as the firmware
does. Nothing trusts its root unless it is passed explicitly to a verifier; its
results then say "SIMULATED — INSECURE".
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import pathlib
import struct

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ctlive.attest.certs import Evidence, TrustedRoot
from ctlive.attest.snp_report import REPORT_SIZE, SIGNED_SIZE, Product

__all__ = ["INSECURE_BANNER", "SimulatedSnpPlatform"]

INSECURE_BANNER = "SIMULATED SEV-SNP PLATFORM — INSECURE, FOR TESTS AND DEMOS ONLY"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ctlive SIMULATED (INSECURE)"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


@functools.cache
def _rsa_key(tag: str) -> rsa.RSAPrivateKey:
    # RSA-4096 generation takes seconds; reuse keys per tag within a process.
    del tag
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


@attrs.define
class SimulatedSnpPlatform:
    """A fake SNP guest: an ``EvidenceProvider`` whose root must be trusted explicitly."""

    measurement: bytes = attrs.field(
        factory=lambda: hashlib.sha384(b"ctlive simulated guest").digest())
    policy: int = 0x30000
    """Guest policy: SMT allowed, reserved bit 17 set, debug off."""
    tcb: tuple[int, int, int, int] = (3, 0, 8, 0x73)
    """bootloader, TEE, SNP, microcode (Milan layout)."""
    chip_id: bytes = attrs.field(factory=lambda: os.urandom(64))
    vmpl: int = 0
    guest_svn: int = 1
    host_data: bytes = bytes(32)
    version: tuple[int, int, int] = (1, 55, 21)
    key_tag: str = "default"
    """Platforms with the same tag share the (slow to make) RSA keys."""
    not_before: datetime.datetime = attrs.field(
        factory=lambda: datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
    key_file: pathlib.Path | None = attrs.field(default=None, converter=attrs.converters.optional(
        pathlib.Path))
    """Keep the platform's keys, certificates and chip id in this file (0600): a receiver
    that restarts then presents the same chain, so sources that trusted it still do."""
    _keys: dict[str, object] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.key_file is not None and self.key_file.is_file():
            self._load(self.key_file)
            return
        self._generate()
        if self.key_file is not None:
            self._save(self.key_file)

    def _save(self, path: pathlib.Path) -> None:
        pem, raw = serialization.Encoding.PEM, serialization.NoEncryption()
        parts = [self._cert(n).public_bytes(pem) for n in ("ark", "ask", "vcek")]
        key = self._keys["vcek_key"]
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        parts.append(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, raw))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(parts) + b"chip-id " + self.chip_id.hex().encode() + b"\n")

    def _load(self, path: pathlib.Path) -> None:
        data = path.read_bytes()
        certs = x509.load_pem_x509_certificates(data)
        key = serialization.load_pem_private_key(
            data[data.index(b"-----BEGIN PRIVATE KEY-----"):], password=None)
        if len(certs) != 3 or not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not a simulated platform's key file")
        self.chip_id = bytes.fromhex(data.rsplit(b"chip-id ", 1)[1].decode().strip())
        self._keys.update(ark=certs[0], ask=certs[1], vcek=certs[2], vcek_key=key)

    def _generate(self) -> None:
        ark_key = _rsa_key("ark-" + self.key_tag)
        ask_key = _rsa_key("ask-" + self.key_tag)
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        start = self.not_before
        ark = (x509.CertificateBuilder().subject_name(_name("ARK-Milan"))
               .issuer_name(_name("ARK-Milan")).public_key(ark_key.public_key())
               .serial_number(1).not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=25 * 365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS))
        ask = (x509.CertificateBuilder().subject_name(_name("SEV-Milan"))
               .issuer_name(ark.subject).public_key(ask_key.public_key())
               .serial_number(2).not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=25 * 365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS))
        bl, tee, snp, ucode = self.tcb
        b = (x509.CertificateBuilder().subject_name(_name("SEV-VCEK"))
             .issuer_name(ask.subject).public_key(vcek_key.public_key())
             .serial_number(1).not_valid_before(start)
             .not_valid_after(start + datetime.timedelta(days=7 * 365)))

        def ext(oid: str, value: bytes) -> None:
            nonlocal b
            b = b.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)

        ext("1.3.6.1.4.1.3704.1.1", _der_int(0))
        ext("1.3.6.1.4.1.3704.1.2", b"\x16\x08Milan-B0")
        for oid, v in (("1", bl), ("2", tee), ("3", snp), ("8", ucode)):
            ext(f"1.3.6.1.4.1.3704.1.3.{oid}", _der_int(v))
        ext("1.3.6.1.4.1.3704.1.4", self.chip_id)
        vcek = b.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS)
        self._keys.update(ark=ark, ask=ask, vcek=vcek, vcek_key=vcek_key)

    def _cert(self, name: str) -> x509.Certificate:
        c = self._keys[name]
        assert isinstance(c, x509.Certificate)
        return c

    def trusted_root(self) -> TrustedRoot:
        """The root to pass to ``SnpVerifier(trusted_roots=[...])``, marked insecure."""
        return TrustedRoot(Product.MILAN, self._cert("ark"), self._cert("ask"), insecure=True)

    def write_chain(self, path: str | os.PathLike[str]) -> None:
        """Write the ARK and ASK (PEM) for a source's policy ``simulated_chain``."""
        pem = serialization.Encoding.PEM
        pathlib.Path(path).write_bytes(self._cert("ark").public_bytes(pem)
                                       + self._cert("ask").public_bytes(pem))

    def certificates(self) -> dict[str, bytes]:
        """DER of vcek, ask and ark."""
        return {k: self._cert(k).public_bytes(serialization.Encoding.DER)
                for k in ("vcek", "ask", "ark")}

    def report(self, report_data: bytes) -> bytes:
        """A signed 1184-byte report (version 3, Milan CPUID) carrying report_data."""
        if len(report_data) != 64:
            raise ValueError("report_data is 64 bytes")
        r = bytearray(REPORT_SIZE)
        bl, tee, snp, ucode = self.tcb
        tcb = bytes([bl, tee, 0, 0, 0, 0, snp, ucode])
        struct.pack_into("<IIQ", r, 0, 3, self.guest_svn, self.policy)
        struct.pack_into("<II", r, 0x30, self.vmpl, 1)
        r[0x38:0x40] = tcb
        struct.pack_into("<Q", r, 0x40, 1)  # platform_info: SMT enabled
        r[0x50:0x90] = report_data
        r[0x90:0xC0] = self.measurement
        r[0xC0:0xE0] = self.host_data
        r[0x140:0x160] = hashlib.sha256(report_data).digest()  # report_id: any 32 bytes
        r[0x180:0x188] = tcb
        r[0x188:0x18B] = bytes([0x19, 0x01, 0x01])  # Milan family/model/stepping
        r[0x1A0:0x1E0] = self.chip_id
        r[0x1E0:0x1E8] = tcb
        major, minor, build = self.version
        r[0x1E8:0x1EB] = bytes([build, minor, major])
        r[0x1EC:0x1EF] = bytes([build, minor, major])
        r[0x1F0:0x1F8] = tcb
        key = self._keys["vcek_key"]
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        sig = key.sign(bytes(r[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        rr, ss = decode_dss_signature(sig)
        r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
        r[0x2E8:0x330] = ss.to_bytes(72, "little")
        return bytes(r)

    def get_evidence(self, report_data: bytes) -> bytes:
        """EvidenceProvider: report plus VCEK, ASK and ARK."""
        return Evidence(report=self.report(report_data), **self.certificates()).to_bytes()
