"""SnpPolicy and MinTcb fail closed on wrong configuration: every field is type-checked
when a policy is built (from Python, a dict or a TOML file), and every error is a
ConfigError naming the field, the file, what was expected and what was found."""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from ctlive import errors
from ctlive.attest import MinTcb, SnpPolicy
from ctlive.attest import policy as policy_module
from ctlive.errors import ConfigError

M48 = "ab" * 48


def load(tmp_path: pathlib.Path, text: str) -> SnpPolicy:
    f = tmp_path / "policy.toml"
    f.write_text(text)
    return SnpPolicy.from_toml(f)


def toml_error(tmp_path: pathlib.Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "policy.toml") + ": "), message
    return message


@contextlib.contextmanager
def fails(fragment: str) -> Iterator[None]:
    """Expect a ConfigError whose message contains ``fragment``."""
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        yield


# --- the four examples of the issue ------------------------------------------------------


@pytest.mark.parametrize("field", ["allow_any_measurement", "debug_allowed", "smt_allowed"])
def test_a_string_false_is_not_a_bool(tmp_path: pathlib.Path, field: str) -> None:
    message = toml_error(tmp_path, f'[snp]\n{field} = "false"\n')
    assert message.endswith(
        f'policy.toml: [snp] {field}: expected true or false, found "false" (a string)')
    with fails(f'SnpPolicy.{field}: expected true or false, found "false" (a string)'):
        SnpPolicy(**{field: "false"})


def test_min_guest_svn_as_a_string(tmp_path: pathlib.Path) -> None:
    message = toml_error(tmp_path, '[snp]\nmin_guest_svn = "5"\n')
    assert '[snp] min_guest_svn: expected an integer from 0 to 4294967295, found "5" ' \
           "(a string)" in message
    with fails("SnpPolicy.min_guest_svn: expected an integer"):
        SnpPolicy(min_guest_svn="5")  # type: ignore[arg-type]


# --- every field, wrong types -------------------------------------------------------------

WRONG: list[tuple[str, Any, str]] = [
    ("measurements", 5, "an array of 48-byte hex strings"),
    ("measurements", [M48, 5], "measurements[1]: expected 48 bytes"),
    ("measurements", ["ab" * 47], "measurements[0]: expected 48 bytes as 96 hex digits, "
                                  'found "abab'),
    ("measurements", ["zz" * 48], "not hex"),
    ("measurements", {"a": M48}, "an array of"),
    ("allow_any_measurement", 1, "expected true or false, found 1 (an integer)"),
    ("debug_allowed", "no", "expected true or false"),
    ("debug_allowed", None, "expected true or false, found None"),
    ("migrate_ma_allowed", "true", "expected true or false"),
    ("smt_allowed", 0, "expected true or false"),
    ("single_socket_required", [True], "expected true or false"),
    ("allow_provisional_firmware", "yes", "expected true or false"),
    ("min_guest_svn", True, "found true (a boolean)"),
    ("min_guest_svn", 1.0, "found 1.0 (a float)"),
    ("min_guest_svn", -1, "expected an integer from 0 to 4294967295"),
    ("min_guest_svn", 1 << 32, "expected an integer from 0 to 4294967295"),
    ("min_tcb", 3, "min_tcb: expected a table of bootloader, tee, snp, microcode, fmc"),
    ("min_tcb", {"snp": "8"}, "min_tcb.snp: expected an integer from 0 to 255"),
    ("min_tcb", {"snp": True}, "min_tcb.snp: expected an integer"),
    ("min_tcb", {"microcode": 256}, "min_tcb.microcode: expected an integer from 0 to 255"),
    ("min_tcb", {"snpp": 8}, "min_tcb.snpp: unknown key (did you mean snp?)"),
    ("vmpls", 0, "vmpls: expected an array of VMPLs"),
    ("vmpls", [4], "vmpls[0]: expected an integer from 0 to 3"),
    ("vmpls", ["0"], "vmpls[0]: expected an integer"),
    ("host_data", "11" * 31, "host_data: expected 32 bytes as 64 hex digits"),
    ("host_data", 17, "host_data: expected 32 bytes"),
    ("host_data", ["11" * 32], "host_data: expected 32 bytes"),
    ("family_id", "22" * 17, "family_id: expected 16 bytes as 32 hex digits"),
    ("image_id", "xyz", "image_id: expected 16 bytes"),
    ("id_key_digest", "44" * 32, "id_key_digest: expected 48 bytes"),
    ("author_key_digest", True, "author_key_digest: expected 48 bytes"),
    ("chip_ids", ["66" * 63], "chip_ids[0]: expected 64 bytes as 128 hex digits"),
    ("chip_ids", 66, "chip_ids: expected an array of 64-byte hex strings"),
    ("signing_keys", "VCEK", 'signing_keys: expected an array of "VCEK" or "VLEK"'),
    ("signing_keys", ["vcek"], 'signing_keys[0]: expected "VCEK" or "VLEK", found "vcek"'),
    ("signing_keys", ["NONE"], "signing_keys[0]"),
    ("simulated_chain", 5, "simulated_chain: expected a file name"),
    ("simulated_chain", "", "simulated_chain: expected a file name"),
]


def test_every_field_has_wrong_type_cases() -> None:
    fields = {f.name for f in attrs.fields(SnpPolicy)}
    assert {name for name, _, _ in WRONG} == fields
    assert set(policy_module._SNP_CHECKS) == fields
    assert tuple(policy_module._TCB_CHECKS) == tuple(f.name for f in attrs.fields(MinTcb))


@pytest.mark.parametrize(("field", "value", "expected"), WRONG)
def test_wrong_values_from_python(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        SnpPolicy(**{field: value})
    assert str(info.value).startswith(f"SnpPolicy.{field}")
    assert expected in str(info.value)


@pytest.mark.parametrize(("field", "value", "expected"), WRONG)
def test_wrong_values_from_a_dict(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        SnpPolicy.from_dict({field: value}, where="conf.json: ")
    assert str(info.value).startswith(f"conf.json: {field}")
    assert expected in str(info.value)


TOML_WRONG = [
    ('measurements = ["abcd"]', "[snp] measurements[0]: expected 48 bytes as 96 hex digits, "
                                'found "abcd" (a string, 2 bytes)'),
    ("measurements = 5", "[snp] measurements: expected an array"),
    ("debug_allowed = 1", "[snp] debug_allowed: expected true or false, found 1 (an integer)"),
    ("min_guest_svn = 5.0", "[snp] min_guest_svn: expected an integer"),
    ("min_guest_svn = true", "[snp] min_guest_svn: expected an integer from 0 to 4294967295, "
                             "found true (a boolean)"),
    ("vmpls = 0", "[snp] vmpls: expected an array"),
    ('signing_keys = "VCEK"', "[snp] signing_keys: expected an array"),
    ('host_data = "11"', "[snp] host_data: expected 32 bytes as 64 hex digits"),
    ("min_tcb = 8", "[snp] min_tcb: expected a table"),
    ('[snp.min_tcb]\nsnp = "8"', '[snp] min_tcb.snp: expected an integer from 0 to 255, '
                                 'found "8" (a string)'),
    ("[snp.min_tcb]\nbogus = 1", "[snp] min_tcb.bogus: unknown key"),
    ("measurment = []", "[snp] measurment: unknown key (did you mean measurements?)"),
    ("zzz = 1", "[snp] zzz: unknown key (known: measurements, allow_any_measurement"),
]


@pytest.mark.parametrize(("line", "expected"), TOML_WRONG)
def test_wrong_values_in_a_file(tmp_path: pathlib.Path, line: str, expected: str) -> None:
    assert expected in toml_error(tmp_path, f"[snp]\n{line}\n")


def test_top_level_keys_are_checked_the_same(tmp_path: pathlib.Path) -> None:
    message = toml_error(tmp_path, 'smt_allowed = "false"\n')
    assert message.endswith('policy.toml: smt_allowed: expected true or false, '
                            'found "false" (a string)')
    assert "unknown key" in toml_error(tmp_path, "debug = false\n")


def test_only_the_snp_table_belongs_in_the_file(tmp_path: pathlib.Path) -> None:
    assert "other: unknown key" in toml_error(tmp_path, "[snp]\n[other]\nx = 1\n")
    assert "debug_allowed: unknown key" in toml_error(tmp_path,
                                                      "debug_allowed = true\n[snp]\n")
    assert "snp: expected a table [snp], found 3" in toml_error(tmp_path, "snp = 3\n")


def test_unreadable_files_are_config_errors(tmp_path: pathlib.Path) -> None:
    with fails("cannot load policy"):
        SnpPolicy.from_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_bytes(b"debug_allowed = \xff\n")
    with fails("cannot load policy"):
        SnpPolicy.from_toml(tmp_path / "bad.toml")
    (tmp_path / "syntax.toml").write_text("[snp\n")
    with fails("cannot load policy"):
        SnpPolicy.from_toml(tmp_path / "syntax.toml")


def test_unknown_and_positional_arguments_are_config_errors() -> None:
    with fails("SnpPolicy.debug: unknown key (did you mean debug_allowed?)"):
        SnpPolicy(debug=False)  # type: ignore[call-arg]
    with fails("SnpPolicy: expected at most 0 values by position"):
        SnpPolicy(True)  # type: ignore[misc]
    with fails("MinTcb.snpp: unknown key"):
        MinTcb(snpp=1)  # type: ignore[call-arg]
    with fails("MinTcb: expected at most 5 values by position"):
        MinTcb(1, 2, 3, 4, 5, 6)  # type: ignore[call-arg]
    with fails("MinTcb.bootloader: given twice"):
        MinTcb(1, bootloader=2)  # type: ignore[misc]
    with fails("policy: expected a table, found ['debug_allowed'] (an array)"):
        SnpPolicy.from_dict(["debug_allowed"])  # type: ignore[arg-type]


def test_min_tcb_is_checked_on_its_own() -> None:
    with fails('MinTcb.tee: expected an integer from 0 to 255, found "2" (a string)'):
        MinTcb(1, "2")  # type: ignore[arg-type]
    with fails("MinTcb.snp: expected an integer"):
        MinTcb(snp=True)
    with fails("SnpPolicy.debug_allowed: expected true or false"):
        attrs.evolve(SnpPolicy(), debug_allowed="false")


# --- what was valid stays valid -----------------------------------------------------------


def test_valid_python_forms() -> None:
    p = SnpPolicy(measurements=[bytes(48), M48], chip_ids="66" * 64, vmpls=[0, 1],
                  min_tcb={"snp": 8, "microcode": 115}, host_data="11" * 32,
                  family_id=bytes(16), image_id=bytearray(16), id_key_digest="44" * 48,
                  author_key_digest=None, signing_keys=["VCEK"], min_guest_svn=3,
                  smt_allowed=False, debug_allowed=False, allow_provisional_firmware=True)
    assert p.measurements == {bytes(48), bytes.fromhex(M48)}
    assert p.chip_ids == {bytes.fromhex("66" * 64)}
    assert p.vmpls == {0, 1} and p.signing_keys == {"VCEK"}
    assert p.min_tcb == MinTcb(snp=8, microcode=115)
    assert p.host_data == bytes.fromhex("11" * 32) and p.image_id == bytes(16)
    assert SnpPolicy(measurements=M48).measurements == {bytes.fromhex(M48)}
    assert SnpPolicy(measurements=[]).measurements == frozenset()  # refuses every report
    assert SnpPolicy(min_tcb=MinTcb(3, 0, 8, 115)).min_tcb.microcode == 115
    assert SnpPolicy.inspection().allow_any_measurement is True
    assert SnpPolicy() == SnpPolicy.from_dict({})
    assert attrs.evolve(p, debug_allowed=True).debug_allowed


def test_the_documented_example_loads(tmp_path: pathlib.Path) -> None:
    p = load(tmp_path, f'[snp]\nmeasurements = ["{M48}"]\ndebug_allowed = false\n'
                       "min_guest_svn = 1\n[snp.min_tcb]\nbootloader = 3\nsnp = 8\n"
                       "microcode = 115\n")
    assert p.min_tcb == MinTcb(bootloader=3, snp=8, microcode=115)
    assert p.min_guest_svn == 1 and p.debug_allowed is False
    every = load(tmp_path, f'measurements = "{M48}"\nallow_any_measurement = false\n'
                           "debug_allowed = true\nmigrate_ma_allowed = true\nsmt_allowed = false\n"
                           "single_socket_required = true\nmin_guest_svn = 0\nvmpls = [0, 2]\n"
                           f'host_data = "{"11" * 32}"\nfamily_id = "{"22" * 16}"\n'
                           f'image_id = "{"33" * 16}"\nid_key_digest = "{"44" * 48}"\n'
                           f'author_key_digest = "{"55" * 48}"\nchip_ids = ["{"66" * 64}"]\n'
                           'allow_provisional_firmware = true\nsigning_keys = ["VLEK"]\n'
                           "min_tcb = { snp = 1, fmc = 2 }\n")
    assert every.vmpls == {0, 2} and every.signing_keys == {"VLEK"}
    assert every.min_tcb == MinTcb(snp=1, fmc=2) and every.smt_allowed is False


def test_simulated_chain_is_the_only_way_to_trust_a_simulated_platform(
        tmp_path: pathlib.Path) -> None:
    """Without ``simulated_chain`` a simulated report fails the chain check; with it (a
    path relative to the policy file) it verifies, marked insecure."""
    from ctlive.attest import SimulatedSnpPlatform, SnpVerifier

    platform = SimulatedSnpPlatform()
    platform.write_chain(tmp_path / "chain.pem")
    evidence = platform.get_evidence(bytes(64))
    (tmp_path / "strict.toml").write_text(
        f'[snp]\nmeasurements = ["{platform.measurement.hex()}"]\n')
    (tmp_path / "sim.toml").write_text(
        f'[snp]\nmeasurements = ["{platform.measurement.hex()}"]\n'
        'simulated_chain = "chain.pem"\n')
    with pytest.raises(errors.CertificateChainError):
        SnpVerifier(SnpPolicy.from_toml(tmp_path / "strict.toml")).verify(evidence, bytes(64))
    result = SnpVerifier(SnpPolicy.from_toml(tmp_path / "sim.toml")).verify(evidence, bytes(64))
    assert result.insecure
    (tmp_path / "bad.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                       'simulated_chain = "missing.pem"\n')
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        SnpVerifier(SnpPolicy.from_toml(tmp_path / "bad.toml"))
