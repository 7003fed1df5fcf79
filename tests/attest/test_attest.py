"""SEV-SNP attestation: real AMD vectors, negatives, the simulated platform, providers, CLI."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import pathlib
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive import errors
from ctlive.attest import (
    ConfigfsTsmProvider,
    Evidence,
    MinTcb,
    Product,
    SevGuestProvider,
    SimulatedSnpPlatform,
    SnpPolicy,
    SnpVerifier,
    amd_roots,
    parse_report,
)
from ctlive.attest.providers import SNP_GET_EXT_REPORT, SNP_GET_REPORT
from ctlive.cli import main as cli_main

DATA = pathlib.Path(__file__).parents[1] / "data" / "snp"
NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)
VIRTEE_MEASUREMENT_HEX = None  # read from the report itself below


def vector(name: str) -> Evidence:
    d = DATA / name
    ask, ark = x509.load_pem_x509_certificates((d / "ask_ark.pem").read_bytes())
    der = serialization.Encoding.DER
    return Evidence(report=(d / "report.bin").read_bytes(), vcek=(d / "vcek.der").read_bytes(),
                    ask=ask.public_bytes(der), ark=ark.public_bytes(der))


def report_data_of(ev: Evidence) -> bytes:
    return parse_report(ev.report).report_data


def verify(ev: Evidence, policy: SnpPolicy, **kw: object) -> object:
    v = SnpVerifier(policy, now=NOW, **kw)  # type: ignore[arg-type]
    return v.verify(ev.to_bytes(), report_data_of(ev))


def pinned(ev: Evidence, **kw: object) -> SnpPolicy:
    return SnpPolicy(measurements=[parse_report(ev.report).measurement], **kw)  # type: ignore[arg-type]


# --- genuine reports ---------------------------------------------------------------


def test_parse_virtee_fields() -> None:
    rep = parse_report(vector("milan-virtee").report)
    assert rep.version == 2
    assert rep.policy.raw == 0x30000 and not rep.policy.debug and rep.policy.smt_allowed
    assert rep.product is None  # v2 has no CPUID; the chain decides
    assert rep.reported_tcb.raw.hex() == "0300000000000873"
    assert (rep.reported_tcb.bootloader, rep.reported_tcb.tee, rep.reported_tcb.snp,
            rep.reported_tcb.microcode) == (3, 0, 8, 0x73)
    assert rep.signing_key.name == "VCEK"


def test_virtee_passes_pinned_policy() -> None:
    ev = vector("milan-virtee")
    result = verify(ev, pinned(ev))
    assert result.platform == "sev-snp" and not result.insecure  # type: ignore[attr-defined]
    assert result.measurement == parse_report(ev.report).measurement  # type: ignore[attr-defined]


def test_debug_report_refused_by_default_and_accepted_when_allowed() -> None:
    ev = vector("milan-debug")
    with pytest.raises(errors.DebugPolicyError) as info:
        verify(ev, pinned(ev))
    assert info.value.field == "policy.debug"
    assert verify(ev, pinned(ev, debug_allowed=True)).measurement  # type: ignore[attr-defined]


def test_unpinned_measurement_refused_unless_inspection() -> None:
    ev = vector("milan-virtee")
    with pytest.raises(errors.MeasurementMismatchError):
        verify(ev, SnpPolicy())
    verify(ev, SnpPolicy.inspection())


def test_bundled_roots_match_pins() -> None:
    assert {r.product for r in amd_roots()} == set(Product)


# --- negatives, each with its own error ------------------------------------------------


def _flip(ev: Evidence, offset: int) -> Evidence:
    raw = bytearray(ev.report)
    raw[offset] ^= 0x01
    return Evidence(report=bytes(raw), vcek=ev.vcek, ask=ev.ask, ark=ev.ark)


def test_flip_inside_signed_area() -> None:
    ev = vector("milan-virtee")
    with pytest.raises(errors.ReportSignatureError):
        verify(_flip(ev, 0x90), pinned(ev))  # a measurement byte


def test_flip_outside_signed_area() -> None:
    ev = vector("milan-virtee")
    with pytest.raises(errors.ReportSignatureError):
        verify(_flip(ev, 0x2A0 + 5), pinned(ev))  # a byte of r
    with pytest.raises(errors.ReportFormatError):
        verify(_flip(ev, 0x400), pinned(ev))  # reserved signature padding


def test_vcek_of_another_chip() -> None:
    ev = vector("milan-virtee")
    other = vector("milan-debug")
    wrong = Evidence(report=ev.report, vcek=other.vcek, ask=ev.ask, ark=ev.ark)
    with pytest.raises(errors.CertificateBindingError):
        verify(wrong, pinned(ev))


def test_wrong_ask() -> None:
    ev = vector("milan-virtee")
    genoa_ask = (pathlib.Path(__file__).parents[2] / "ctlive/attest/roots/genoa_ask.pem")
    ask = x509.load_pem_x509_certificate(genoa_ask.read_bytes())
    wrong = Evidence(report=ev.report, vcek=ev.vcek,
                     ask=ask.public_bytes(serialization.Encoding.DER), ark=ev.ark)
    with pytest.raises(errors.CertificateSignatureError):
        verify(wrong, pinned(ev))


def test_expired_certificate() -> None:
    ev = vector("milan-virtee")  # VCEK valid until 2030-04-03
    late = SnpVerifier(pinned(ev), now=datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(errors.CertificateExpiredError):
        late.verify(ev.to_bytes(), report_data_of(ev))


def test_tcb_below_minimum() -> None:
    ev = vector("milan-virtee")
    with pytest.raises(errors.TcbTooLowError) as info:
        verify(ev, pinned(ev, min_tcb=MinTcb(snp=9)))
    assert info.value.field == "reported_tcb.snp"
    assert info.value.found == 8


def test_measurement_mismatch() -> None:
    ev = vector("milan-virtee")
    with pytest.raises(errors.MeasurementMismatchError):
        verify(ev, SnpPolicy(measurements=[bytes(48)]))


def test_report_data_mismatch() -> None:
    ev = vector("milan-virtee")
    v = SnpVerifier(pinned(ev), now=NOW)
    with pytest.raises(errors.ReportDataMismatchError):
        v.verify(ev.to_bytes(), bytes(64))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("host_data", "11" * 32, errors.HostDataMismatchError),
        ("family_id", "22" * 16, errors.FamilyIdMismatchError),
        ("image_id", "33" * 16, errors.ImageIdMismatchError),
        ("id_key_digest", "44" * 48, errors.IdKeyDigestMismatchError),
        ("author_key_digest", "55" * 48, errors.AuthorKeyDigestMismatchError),
        ("chip_ids", ["66" * 64], errors.ChipIdNotAllowedError),
        ("smt_allowed", False, errors.SmtPolicyError),
        ("single_socket_required", True, errors.SingleSocketPolicyError),
        ("min_guest_svn", 1, errors.GuestSvnTooLowError),
    ],
)
def test_exact_fields(field: str, value: object, error: type[Exception]) -> None:
    ev = vector("milan-virtee")
    with pytest.raises(error):
        verify(ev, pinned(ev, **{field: value}))


def test_report_format_errors() -> None:
    raw = vector("milan-virtee").report
    with pytest.raises(errors.ReportFormatError, match="1184"):
        parse_report(raw[:-1])
    bad_algo = bytearray(raw)
    struct.pack_into("<I", bad_algo, 0x34, 2)
    with pytest.raises(errors.ReportFormatError, match="signature algorithm"):
        parse_report(bytes(bad_algo))
    reserved = bytearray(raw)
    reserved[0x4C] = 1
    with pytest.raises(errors.ReportFormatError, match="reserved"):
        parse_report(bytes(reserved))


@settings(max_examples=200)
@given(st.integers(0, 20000), st.integers(0, 255), st.integers(0, 40))
def test_evidence_parser_fuzz(pos: int, val: int, cut: int) -> None:
    blob = bytearray(vector("milan-virtee").to_bytes())
    blob[pos % len(blob)] = val
    if cut:
        del blob[len(blob) - cut :]
    try:
        SnpVerifier(SnpPolicy.inspection(), now=NOW).verify(bytes(blob), bytes(64))
    except errors.AttestationError:
        pass  # any refusal must be an AttestationError, never a crash


# --- simulated platform ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> SimulatedSnpPlatform:
    return SimulatedSnpPlatform()


def test_simulated_roundtrip_is_marked_insecure(sim: SimulatedSnpPlatform) -> None:
    v = SnpVerifier(SnpPolicy(measurements=[sim.measurement]), trusted_roots=[sim.trusted_root()])
    rd = hashlib.blake2b(b"channel").digest()
    result = v.verify(sim.get_evidence(rd), rd)
    assert result.insecure and "INSECURE" in result.platform
    assert result.measurement == sim.measurement


def test_self_made_ark_is_untrusted(sim: SimulatedSnpPlatform) -> None:
    # A complete, valid-looking chain that ends in an ARK that is not AMD's.
    rd = bytes(64)
    with pytest.raises(errors.UntrustedRootError):
        SnpVerifier(SnpPolicy.inspection()).verify(sim.get_evidence(rd), rd)


def test_wrong_vcek_same_chip(sim: SimulatedSnpPlatform) -> None:
    twin = SimulatedSnpPlatform(chip_id=sim.chip_id)  # same chip and TCB, other key
    ev = Evidence.from_bytes(sim.get_evidence(bytes(64)))
    wrong = Evidence(report=ev.report, vcek=twin.certificates()["vcek"], ask=ev.ask, ark=ev.ark)
    v = SnpVerifier(SnpPolicy.inspection(), trusted_roots=[sim.trusted_root()])
    with pytest.raises(errors.ReportSignatureError):
        v.verify(wrong.to_bytes(), bytes(64))


def test_simulated_wrong_vmpl(sim: SimulatedSnpPlatform) -> None:
    vm1 = SimulatedSnpPlatform(vmpl=1)
    v = SnpVerifier(SnpPolicy.inspection(), trusted_roots=[vm1.trusted_root()])
    with pytest.raises(errors.VmplMismatchError):
        v.verify(vm1.get_evidence(bytes(64)), bytes(64))


def test_policy_from_toml(tmp_path: pathlib.Path) -> None:
    ev = vector("milan-virtee")
    m = parse_report(ev.report).measurement.hex()
    f = tmp_path / "policy.toml"
    f.write_text(f'[snp]\nmeasurements = ["{m}"]\nmin_guest_svn = 0\n'
                 '[snp.min_tcb]\nsnp = 8\nmicrocode = 115\n')
    policy = SnpPolicy.from_toml(f)
    assert policy.min_tcb.snp == 8
    verify(ev, policy)
    f.write_text("[snp]\nmeasurment = []\n")
    with pytest.raises(errors.ConfigError, match="measurment"):
        SnpPolicy.from_toml(f)


# --- providers ------------------------------------------------------------------------


def test_configfs_provider_on_fake_tree(tmp_path: pathlib.Path, sim: SimulatedSnpPlatform) -> None:
    rd = bytes(range(64))
    entry = tmp_path / "e1"
    entry.mkdir()
    (entry / "provider").write_text("sev_guest\n")
    (entry / "generation").write_text("1\n")
    (entry / "outblob").write_bytes(sim.report(rd))
    certs = sim.certificates()
    # Build an auxblob certificate table: 3 entries + terminator, then the blobs.
    guids = {"vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
             "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
             "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae"}
    import uuid

    off = 24 * 4
    table, blobs = b"", b""
    for name, g in guids.items():
        table += uuid.UUID(g).bytes_le + struct.pack("<II", off + len(blobs), len(certs[name]))
        blobs += certs[name]
    (entry / "auxblob").write_bytes(table + bytes(24) + blobs)
    provider = ConfigfsTsmProvider(tmp_path, entry="e1")
    ev = provider.get_evidence(rd)
    assert (entry / "inblob").read_bytes() == rd
    v = SnpVerifier(SnpPolicy.inspection(), trusted_roots=[sim.trusted_root()])
    assert v.verify(ev, rd).insecure


def test_configfs_provider_detects_generation_race(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = tmp_path / "e1"
    entry.mkdir()
    (entry / "provider").write_text("sev_guest")
    (entry / "outblob").write_bytes(bytes(1184))
    counter = iter(["1", "2"])
    real = pathlib.Path.read_text

    def fake_read_text(self: pathlib.Path, *a: object, **k: object) -> str:
        if self.name == "generation":
            return next(counter)
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_text", fake_read_text)
    with pytest.raises(errors.ProviderError, match="concurrently"):
        ConfigfsTsmProvider(tmp_path, entry="e1").get_evidence(bytes(64))


def test_configfs_provider_refuses_other_tsm(tmp_path: pathlib.Path) -> None:
    entry = tmp_path / "e1"
    entry.mkdir()
    (entry / "provider").write_text("tdx_guest")
    with pytest.raises(errors.ProviderError, match="tdx_guest"):
        ConfigfsTsmProvider(tmp_path, entry="e1").get_evidence(bytes(64))


def test_sev_guest_ioctl_with_fake_kernel(sim: SimulatedSnpPlatform) -> None:
    rd = bytes(range(1, 65))
    calls = []

    def fake_ioctl(fd: int, request: int, arg: bytearray) -> int:
        calls.append(request)
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", bytes(arg))
        assert version == 1
        user_data = ctypes.string_at(req_addr, 64)
        vmpl = struct.unpack("<I", ctypes.string_at(req_addr + 64, 4))[0]
        assert vmpl == 0
        if request == SNP_GET_EXT_REPORT:
            struct.pack_into("<Q", arg, 24, 1 << 32)  # VMM error: certificates unsupported
            return -1
        resp = struct.pack("<II24x", 0, 1184) + sim.report(user_data)
        ctypes.memmove(resp_addr, resp, len(resp))
        return 0

    provider = SevGuestProvider(ioctl=fake_ioctl, opener=lambda p: -1)
    ev = Evidence.from_bytes(provider.get_evidence(rd))
    assert parse_report(ev.report).report_data == rd
    assert SNP_GET_REPORT in calls
    assert calls[0] == SNP_GET_EXT_REPORT
    assert SNP_GET_REPORT == 0xC0205300


# --- CLI ------------------------------------------------------------------------------


def _cli(name: str, *extra: str) -> int:
    d = DATA / name
    return cli_main(["attest", "verify", str(d / "report.bin"), "--vcek", str(d / "vcek.der"),
                     "--chain", str(d / "ask_ark.pem"), "--now", "2025-06-01", *extra])


def test_cli_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("milan-virtee") == 0
    assert "ACCEPTED" in capsys.readouterr().out
    assert _cli("milan-debug") == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "DebugPolicyError" in out
    assert _cli("milan-debug", "--no-policy") == 0


def test_auto_provider_selection(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctlive.attest import auto_provider, providers

    tsm, dev = tmp_path / "tsm", tmp_path / "sev-guest"
    monkeypatch.setattr(providers, "CONFIGFS_TSM_REPORT", tsm)
    monkeypatch.setattr(providers, "SEV_GUEST_DEVICE", dev)
    with pytest.raises(errors.ProviderError, match="not an SEV-SNP guest"):
        auto_provider()
    dev.touch()
    assert isinstance(auto_provider(), SevGuestProvider)
    tsm.mkdir()
    assert isinstance(auto_provider(), ConfigfsTsmProvider)  # configfs-tsm preferred
    assert isinstance(auto_provider("sev-guest"), SevGuestProvider)
    with pytest.raises(errors.ProviderError, match="unknown provider"):
        auto_provider("bogus")
