"""The SEV-SNP ATTESTATION_REPORT structure (SNP firmware ABI, versions 2, 3 and 5).

Pure parsing: bytes in, a frozen value out. Offsets follow the ABI
specification's table of the report; reserved ranges must be zero and are
checked, so a report of an unknown future layout is refused rather than
misread.
"""

from __future__ import annotations

import enum
import struct

import attrs

from ctlive.errors import ReportFormatError

__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "AttestationReport",
    "GuestPolicy",
    "PlatformInfo",
    "Product",
    "SigningKey",
    "TcbVersion",
    "parse_report",
]

REPORT_SIZE = 0x4A0
"""Size of a report in bytes (1184)."""
SIGNED_SIZE = 0x2A0
"""The signature covers bytes 0x000..0x29F."""
SIG_ALGO_ECDSA_P384_SHA384 = 1


class Product(enum.Enum):
    """AMD EPYC generations, which differ in TCB layout and root keys."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"


class SigningKey(enum.IntEnum):
    """Which key signed the report (SIGNING_KEY field)."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@attrs.frozen
class TcbVersion:
    """A decoded TCB_VERSION. ``fmc`` exists on Turin only."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None
    raw: bytes = attrs.field(default=b"", repr=False, eq=False)

    @classmethod
    def decode(cls, raw: bytes, product: Product) -> TcbVersion:
        """Decode 8 bytes per the product's layout."""
        if product is Product.TURIN:
            # FMC, bootloader, TEE, SNP, 3 reserved, microcode.
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7],
                       fmc=raw[0], raw=raw)
        # Milan and Genoa: bootloader, TEE, 4 reserved, SNP, microcode.
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7], raw=raw)

    def components(self) -> dict[str, int]:
        """The components that exist for this product, by name."""
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp,
               "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.components().items())


@attrs.frozen
class GuestPolicy:
    """The guest policy the hypervisor launched the guest with (decoded flags)."""

    raw: int
    abi_minor: int
    abi_major: int
    smt_allowed: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allowed: bool
    mem_aes_256_xts: bool
    rapl_disabled: bool
    ciphertext_hiding: bool
    page_swap_disabled: bool

    @classmethod
    def decode(cls, v: int) -> GuestPolicy:
        """Decode the 64-bit POLICY field."""
        def bit(n: int) -> bool:
            return bool(v >> n & 1)

        return cls(raw=v, abi_minor=v & 0xFF, abi_major=v >> 8 & 0xFF, smt_allowed=bit(16),
                   migrate_ma=bit(18), debug=bit(19), single_socket=bit(20),
                   cxl_allowed=bit(21), mem_aes_256_xts=bit(22), rapl_disabled=bit(23),
                   ciphertext_hiding=bit(24), page_swap_disabled=bit(25))


@attrs.frozen
class PlatformInfo:
    """PLATFORM_INFO: the state of the platform when the report was made."""

    raw: int
    smt_enabled: bool
    tsme_enabled: bool
    ecc_enabled: bool
    rapl_disabled: bool
    ciphertext_hiding_enabled: bool
    alias_check_complete: bool

    @classmethod
    def decode(cls, v: int) -> PlatformInfo:
        """Decode the 64-bit PLATFORM_INFO field."""
        def bit(n: int) -> bool:
            return bool(v >> n & 1)

        return cls(raw=v, smt_enabled=bit(0), tsme_enabled=bit(1), ecc_enabled=bit(2),
                   rapl_disabled=bit(3), ciphertext_hiding_enabled=bit(4),
                   alias_check_complete=bit(5))


@attrs.frozen
class AttestationReport:
    """Every field of an SNP attestation report."""

    raw: bytes = attrs.field(repr=False)
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    product: Product | None
    """From CPUID (version >= 3); None for version 2, where the certificate chain decides."""

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers."""
        return self.raw[:SIGNED_SIZE]

    def with_product(self, product: Product) -> AttestationReport:
        """Re-decode the TCB fields for a product learned from the certificate chain."""
        return parse_report(self.raw, product=product)


def _product_from_cpuid(family: int, model: int) -> Product | None:
    if family == 0x19:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return Product.GENOA
    if family == 0x1A and model <= 0x1F:
        return Product.TURIN
    return None


def _zero(raw: bytes, start: int, end: int, what: str) -> None:
    if any(raw[start:end]):
        raise ReportFormatError(
            f"reserved bytes 0x{start:03X}..0x{end - 1:03X} ({what}) are not zero")


def parse_report(raw: bytes, *, product: Product | None = None) -> AttestationReport:
    """Parse a 1184-byte report. ``product`` overrides CPUID-based detection.

    Raises :class:`~ctlive.errors.ReportFormatError` for a wrong size, an
    unsupported version or signature algorithm, or non-zero reserved fields.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ReportFormatError("a report must be bytes")
    raw = bytes(raw)
    if len(raw) != REPORT_SIZE:
        raise ReportFormatError(f"a report is {REPORT_SIZE} bytes, got {len(raw)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
    if version not in (2, 3, 4, 5):
        raise ReportFormatError(f"unsupported report version {version} (2, 3 and 5 are known)")
    vmpl, algo = struct.unpack_from("<II", raw, 0x30)
    if algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise ReportFormatError(
            f"signature algorithm {algo} is not ECDSA P-384 with SHA-384 (1)")
    (key_info,) = struct.unpack_from("<I", raw, 0x48)
    if key_info >> 5:
        raise ReportFormatError(f"reserved bits of the signer info 0x{key_info:08X} are set")
    try:
        signing_key = SigningKey(key_info >> 2 & 7)
    except ValueError as exc:
        raise ReportFormatError(f"unknown signing key {key_info >> 2 & 7}") from exc
    _zero(raw, 0x4C, 0x50, "after signer info")
    fam: int | None
    mod: int | None
    step: int | None
    if version >= 3:
        fam, mod, step = raw[0x188], raw[0x189], raw[0x18A]
        _zero(raw, 0x18B, 0x1A0, "after CPUID")
        if product is None:
            product = _product_from_cpuid(raw[0x188], raw[0x189])
    else:
        fam = mod = step = None
        _zero(raw, 0x188, 0x1A0, "v2 reserved")
    _zero(raw, 0x1EB, 0x1EC, "after current version")
    _zero(raw, 0x1EF, 0x1F0, "after committed version")
    launch_mit = current_mit = None
    if version >= 5:
        launch_mit, current_mit = struct.unpack_from("<QQ", raw, 0x1F8)
        _zero(raw, 0x208, SIGNED_SIZE, "v5 reserved")
    else:
        _zero(raw, 0x1F8, SIGNED_SIZE, "reserved")
    _zero(raw, 0x2A0 + 144, REPORT_SIZE, "signature padding")
    tcb_product = product or Product.MILAN

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.decode(raw[off : off + 8], tcb_product)

    return AttestationReport(
        raw=raw,
        version=version,
        guest_svn=guest_svn,
        policy=GuestPolicy.decode(policy),
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=algo,
        current_tcb=tcb(0x38),
        platform_info=PlatformInfo.decode(struct.unpack_from("<Q", raw, 0x40)[0]),
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool(key_info & 2),
        signing_key=signing_key,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=int.from_bytes(raw[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(raw[0x2E8:0x330], "little"),
        product=product,
    )
