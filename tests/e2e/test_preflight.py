"""The preflight on a real migration: the same machine passes it, and a destination
without a CPU feature the workload needs refuses it before any image byte, with an
error that names the feature, while the workload runs on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from criu_harness import Mutator, state
from mitm import refused_through

from ctlive import errors
from ctlive.backends.process import Process
from ctlive.migration import preflight as pf
from ctlive.migration.convergence import Convergence
from ctlive.migration.source import migrate
from tests.e2e.conftest import SRC

pytestmark = pytest.mark.anyio


async def test_same_machine_passes_and_reports(mutator: Mutator, receiver_factory: Any,
                                               verifier: Any) -> None:
    rx = await receiver_factory()
    report = await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                           convergence=Convergence(max_iterations=2))
    assert report.preflight["criu"] and report.preflight["cpu_needs"]
    assert report.preflight["notes"] == []
    assert all(i.freeze_seconds is not None for i in report.iterations)


async def test_missing_cpu_feature_refused_before_any_image_byte(
        mutator: Mutator, receiver_factory: Any, verifier: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    needs = sorted(pf.cpu_needs(pf.cpu_flags(), [mutator.pid]))
    assert needs, "the workload needs no glibc-selected CPU feature"
    gone = needs[-1]
    real = pf.destination_facts

    def without(*a: Any, **kw: Any) -> dict[str, Any]:
        facts = real(*a, **kw)
        facts["cpu"]["flags"] = [f for f in facts["cpu"]["flags"] if f != gone]
        return facts

    monkeypatch.setattr(pf, "destination_facts", without)
    rx = await receiver_factory()
    mitm, info = await refused_through(rx.addr, pf.PreflightError, Process(mutator.pid),
                                       identity=SRC, attestation=verifier)
    assert info.value.phase == errors.Phase.PREFLIGHT
    assert f"CPU features missing at the destination: {gone}" in str(info.value)
    assert [d.fact for d in info.value.differences if d.refuse] == ["cpu"]
    # Only HELLO, PREFLIGHT, ABORT and the channel's CLOSE record went out: no
    # MIGRATION_META, no CHANGE (the image is 16 MiB).
    assert mitm.records_seen <= 4 and mitm.bytes_after_msg1 < 32 << 10
    assert state(mutator.pid) in ("S", "R", "D")
    assert rx.errors == []


def test_cli_check_runs_the_preflight_alone(mutator: Mutator, tmp_path: Any,
                                            memory_path: Any) -> None:
    from tests.e2e.test_cli import Receiver

    rx = Receiver(tmp_path, memory_path)
    try:
        out = rx.migrate(f"pid:{mutator.pid}", "--check")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("compatible: the destination can restore process")
        js = rx.migrate(f"pid:{mutator.pid}", "--check", "--json")
        assert js.returncode == 0 and json.loads(js.stdout)["compatible"] is True
        # Nothing was dumped or sent: the workload ran on, the receiver holds nothing.
        assert state(mutator.pid) in ("S", "R", "D")
        assert not any(p.is_dir() for p in rx.state.iterdir())
    finally:
        rx.close()


async def test_check_returns_the_destinations_extensible_facts(
        mutator: Mutator, receiver_factory: Any, verifier: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ctlive.migration.check import check

    # A receiver's owner adds facts (the podman backend: the base images it holds).
    monkeypatch.setitem(pf.DESTINATION_FACTS, "podman_images", lambda: ["sha256:ab"])
    rx = await receiver_factory()
    result = await check(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier)
    assert result.destination["podman_images"] == ["sha256:ab"]
    assert result.destination["kernel"]["release"] == result.source["kernel"]["release"]
    assert pf.refusals(result.differences) == []
    assert state(mutator.pid) in ("S", "R", "D")
    assert rx.errors == []
