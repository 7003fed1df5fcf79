"""The preflight's facts and comparison (ctlive.migration.preflight), without a session:
what refuses a migration, what only gets noted, and peer facts that are malformed."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from ctlive.errors import RemoteProtocolError
from ctlive.migration import preflight as pf
from ctlive.migration.facts import declared_mounts

AVX512 = ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
TUNABLES = "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-XSAVEC"


def facts(**over: Any) -> dict[str, Any]:
    base = {
        "kind": "process",
        "cpu": {"flags": ["sse2", "avx", "avx2", *AVX512, "xsavec"],
                "needs": ["avx", "avx2", "sse2"]},
        "kernel": {"release": "6.18.44", "boot_id": "a"},
        "criu": {"version": "4.3", "features": ["ns_pid"]},
        "mounts": {"devtmpfs": [], "cgroup_v1": [], "external": []},
        "cgroup": {"version": "2", "v1": []},
    }
    for key, value in over.items():
        table, _, field = key.partition("__")
        base[table] = {**base[table], field: value} if field else value
    return base


def test_masked_hwcaps_reads_glibc_tunables() -> None:
    env = {"GLIBC_TUNABLES": f"glibc.malloc.check=3:{TUNABLES}"}
    assert pf.masked_hwcaps(env) == {*AVX512, "xsavec"}
    assert pf.masked_hwcaps({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=AVX2,-NOPE"}) == set()
    assert pf.masked_hwcaps({}) == set()


def test_cpu_needs_of_a_process_less_what_its_tunables_mask() -> None:
    flags = {"sse2", "avx2", *AVX512, "xsavec", "sha_ni", "fsrm"}
    # This test process has no tunables: it needs every glibc-selected flag it has.
    assert pf.cpu_needs(flags, [os.getpid()]) == {"sse2", "avx2", *AVX512, "xsavec"}
    assert pf.cpu_needs(flags, []) == {"sse2", "avx2", *AVX512, "xsavec"}


def test_missing_cpu_features_refuse_and_name_the_features_and_the_fix() -> None:
    src = facts(cpu__needs=["avx2", *AVX512, "xsavec"])
    dst = facts(cpu__flags=["sse2", "avx", "avx2"])
    (d,) = pf.compare(src, dst)
    assert d.fact == "cpu" and d.refuse
    assert "avx512bw, avx512cd, avx512dq, avx512f, avx512vl, xsavec" in d.message
    assert "GLIBC_TUNABLES=glibc.cpu.hwcaps=" in d.message and "-XSAVEC" in d.message


def test_same_machine_facts_pass() -> None:
    src = pf.source_facts("process", {}, os.getpid())
    dst = pf.destination_facts(src["criu"]["features"])
    assert pf.refusals(pf.compare(src, dst)) == []
    assert src["cpu"]["needs"] and set(src["cpu"]["needs"]) <= set(dst["cpu"]["flags"])


def test_destination_criu_older_than_the_source_refuses() -> None:
    (d,) = pf.compare(facts(), facts(criu__version="4.2"))
    assert d.fact == "criu" and d.refuse and "4.2" in d.message and "4.3" in d.message


def test_criu_feature_missing_at_the_destination_refuses() -> None:
    (d,) = pf.compare(facts(criu__features=["link_nsid", "ns_pid"]), facts())
    assert d.fact == "criu" and d.refuse and "link_nsid" in d.message


def test_mounts_matter_only_across_kernels() -> None:
    src = facts(mounts__devtmpfs=["/dev"], mounts__cgroup_v1=["/sys/fs/cgroup/memory"],
                cgroup__version="hybrid", cgroup__v1=["memory"])
    # One kernel (same boot id): CRIU can reuse its devtmpfs and cgroup hierarchies.
    same = pf.compare(src, facts(cgroup__version="hybrid", cgroup__v1=["memory"]))
    assert pf.refusals(same) == []
    other = pf.compare(src, facts(kernel__boot_id="b", kernel__release="6.1.0-57-amd64"))
    assert any("devtmpfs at /dev" in d.message and d.refuse for d in other)
    assert any("/sys/fs/cgroup/memory" in d.message and d.refuse for d in other)
    kernel = [d for d in other if d.fact == "kernel"]
    assert kernel and not kernel[0].refuse  # noted, never refused: CRIU handles it


def test_declared_external_dev_passes_across_kernels() -> None:
    spec = {"external": ["mnt[/dev]:dev"]}
    assert declared_mounts(spec) == ["/dev"]
    src = facts(mounts__devtmpfs=[])
    assert pf.refusals(pf.compare(src, facts(kernel__boot_id="b"))) == []


def test_cgroup_version_refuses_containers_only() -> None:
    (d,) = pf.compare(facts(cgroup__version="1"), facts())
    assert d.fact == "cgroup" and not d.refuse
    (d,) = pf.compare(facts(kind="runc", cgroup__version="1"), facts())
    assert d.refuse and "cgroup 1 at the source, 2 at the destination" in d.message


@pytest.mark.parametrize("bad", [None, "avx", [1, 2], {"a": 1}])
def test_malformed_peer_facts_are_protocol_errors(bad: Any) -> None:
    dst = facts()
    dst["cpu"] = {"flags": bad}
    with pytest.raises(RemoteProtocolError, match=r"destination's cpu\.flags"):
        pf.compare(facts(), dst)
    src = copy.deepcopy(facts())
    src["cpu"] = "x"
    with pytest.raises(RemoteProtocolError, match=r"source's cpu\.needs"):
        pf.compare(src, facts())


def test_differences_from_the_peer_are_checked() -> None:
    good = [{"fact": "cpu", "message": "m", "refuse": True}]
    assert pf.parse_differences(good) == (pf.Difference("cpu", "m", True),)
    for bad in ({"fact": "cpu"}, [{"fact": 1, "message": "m", "refuse": True}],
                [{"fact": "cpu", "message": "m", "refuse": "yes"}]):
        with pytest.raises(RemoteProtocolError):
            pf.parse_differences(bad)
