"""SEV-SNP attestation: parse reports, verify AMD's chain, apply a policy, and get
reports inside a guest (configfs-tsm, /dev/sev-guest, or a simulated platform)."""

from __future__ import annotations

from ctlive.attest.certs import Evidence, TrustedRoot, amd_roots
from ctlive.attest.policy import MinTcb, SnpPolicy
from ctlive.attest.providers import ConfigfsTsmProvider, SevGuestProvider, auto_provider
from ctlive.attest.simulated import INSECURE_BANNER, SimulatedSnpPlatform
from ctlive.attest.snp_report import (
    AttestationReport,
    GuestPolicy,
    PlatformInfo,
    Product,
    SigningKey,
    TcbVersion,
    parse_report,
)
from ctlive.attest.verifier import SnpVerifier

__all__ = [
    "INSECURE_BANNER",
    "AttestationReport",
    "ConfigfsTsmProvider",
    "Evidence",
    "GuestPolicy",
    "MinTcb",
    "PlatformInfo",
    "Product",
    "SevGuestProvider",
    "SigningKey",
    "SimulatedSnpPlatform",
    "SnpPolicy",
    "SnpVerifier",
    "TcbVersion",
    "TrustedRoot",
    "amd_roots",
    "auto_provider",
    "parse_report",
]
