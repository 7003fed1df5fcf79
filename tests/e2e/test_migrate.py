"""End-to-end migrations on real CRIU, under asyncio and trio.

Each test asserts the workload's state afterwards: where it runs, that it runs
exactly once, and that its counter went on from where it was."""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
from criu_harness import Mutator, state, workload_pids
from mitm import Mitm, refused_through

from ctlive import errors
from ctlive.backends.criu import find_criu
from ctlive.backends.process import Process
from ctlive.errors import Phase
from ctlive.migration.convergence import Convergence
from ctlive.migration.report import Decision, ProgressEvent
from ctlive.migration.source import migrate
from ctlive.testing.hooks import FaultHooks
from tests.e2e.conftest import SRC

pytestmark = pytest.mark.anyio


def assert_read_live(report: Any, workload: str) -> None:
    """Three iterations of ``workload``: pre-copy read the running container's memory,
    only the final dump froze it, and pages were found in that read by address."""
    assert report.workload == workload and len(report.iterations) == 3
    # Pre-copy read the running container's memory; only the final dump froze it.
    assert [i.method for i in report.iterations] == ["live-read", "live-read", "final"]
    final = report.iterations[-1]
    # The read was its base: pages are found there by address (sent as deltas).
    assert final.pages_raw <= final.pages_total // 4


def alive(pid: int) -> bool:
    try:
        return state(pid) in ("S", "R", "D")
    except OSError:
        return False


async def test_mutating_process_three_iterations(mutator: Mutator, receiver_factory: Any,
                                                 verifier: Any) -> None:
    rx = await receiver_factory()
    before = mutator.count()
    events: list[ProgressEvent] = []
    report = await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                           convergence=Convergence(max_iterations=3, max_downtime=0.0),
                           on_progress=events.append)
    assert len(report.iterations) >= 3
    # Every phase of a migration that succeeds is announced, in order.
    phases = [e.phase for e in events]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == [
        Phase.CONNECT, Phase.ATTEST, Phase.PREFLIGHT, Phase.ITERATE, Phase.FINAL_DUMP, Phase.SEND,
        Phase.RESTORE, Phase.COMMIT, Phase.DONE]
    assert phases.count(Phase.ITERATE) == len(report.iterations) - 1
    assert report.iterations[-1].final
    assert report.iterations[1].wire_bytes < report.iterations[0].wire_bytes
    assert report.attestation["insecure"] is True
    assert not alive(mutator.pid)  # the source copy is gone
    new_pid = report.destination_summary["restored_pid"]
    assert alive(new_pid)
    assert len(workload_pids(mutator.script)) == 1  # exactly one copy runs
    at_handover = mutator.count()
    await anyio.sleep(0.5)
    assert mutator.count() > at_handover >= before  # it goes on from its state
    assert rx.errors == []
    assert '"migration_id"' in report.to_json()
    # Where the downtime went: the phases cover the final phase and fit inside it.
    ph = report.downtime_phases
    assert set(ph) == {"dump", "send", "destination", "kill", "commit"}
    assert all(v >= 0 for v in ph.values())
    assert sum(ph.values()) <= report.downtime
    assert ph["dump"] == pytest.approx(report.iterations[-1].dump_seconds, abs=0.05)
    timings = report.destination_summary["timings"]
    assert {"verify", "restore", "resume"} <= set(timings)
    assert timings["restore"] <= ph["destination"]
    # Pre-copy froze nothing: CRIU pre-dumps with soft-dirty, else live memory reads.
    assert {i.method for i in report.iterations[:-1]} == {
        "pre-dump" if find_criu().dirty_tracking else "live-read"}
    assert report.iterations[-1].method == "final"
    assert report.iterations[-1].wire_bytes < report.iterations[0].wire_bytes / 4


async def test_criu_precopy_when_asked(mutator: Mutator, receiver_factory: Any,
                                      verifier: Any) -> None:
    """live_read=False: pre-copy iterations are CRIU's (a full dump --leave-running on
    a kernel without soft-dirty tracking), and the migration works the same."""
    rx = await receiver_factory()
    report = await migrate(Process(mutator.pid, live_read=False), rx.addr, identity=SRC,
                           attestation=verifier,
                           convergence=Convergence(max_iterations=3, max_downtime=0.0))
    want = "pre-dump" if find_criu().dirty_tracking else "dump"
    assert [i.method for i in report.iterations] == [want, want, "final"]
    assert alive(report.destination_summary["restored_pid"])
    assert len(workload_pids(mutator.script)) == 1
    assert rx.errors == []


async def test_attestation_refused_sends_no_image_bytes(mutator: Mutator, receiver_factory: Any,
                                                        platform: Any) -> None:
    from ctlive.attest import SnpPolicy, SnpVerifier

    rx = await receiver_factory()
    strict = SnpVerifier(SnpPolicy(measurements=[bytes(48)]),
                         trusted_roots=[platform.trusted_root()])
    mitm, info = await refused_through(rx.addr, errors.MigrationError, Process(mutator.pid),
                                       identity=SRC, attestation=strict)
    assert info.value.phase == "attest"
    assert isinstance(info.value.cause, errors.MeasurementMismatchError)
    assert mitm.bytes_after_msg1 == 0
    assert alive(mutator.pid)


async def test_receiver_dies_mid_iteration(mutator: Mutator, receiver_factory: Any,
                                           verifier: Any, source_state_dir: Any) -> None:
    """The receiver dies for good during pre-copy. Usually the source sees it before its
    final iteration and resumes at once; if its final iteration already went out, the
    destination may have been READY, so the workload stays stopped (InDoubtError) until
    `recover` settles it, here with force_resume since that destination is gone."""
    from ctlive.migration.recovery import recover

    rx = await receiver_factory(hooks=FaultHooks(mid_iteration=lambda: rx.scope.cancel()))
    events: list[ProgressEvent] = []
    with pytest.raises(errors.MigrationError) as info:
        await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                      convergence=Convergence(max_iterations=10, max_downtime=0.0),
                      on_progress=events.append, abort_timeout=2)
    assert info.value.phase in (Phase.ITERATE, Phase.FINAL_DUMP, Phase.SEND, Phase.RESTORE)
    assert events[-1].phase is Phase.FAILED
    if isinstance(info.value, errors.InDoubtError):
        assert state(mutator.pid) == "T"  # never resumed while the outcome is unknown
        done = await recover(identity=SRC, attestation=verifier, state_dir=source_state_dir,
                             force_resume=True, connect_timeout=1)
        assert [r.after for r in done] == ["aborted"]
    assert alive(mutator.pid)
    c = mutator.count()
    await anyio.sleep(0.4)
    assert mutator.count() > c


class NeverConverge:
    """A user-supplied policy (the Protocol): keep iterating."""

    def decide(self, history: Any, intervals: Any) -> Decision:
        return Decision(history[-1].index, False, "test: never converge", 1.0, {})


async def test_cancelled_migration_resumes_source(mutator: Mutator, receiver_factory: Any,
                                                  verifier: Any) -> None:
    rx = await receiver_factory()
    with anyio.move_on_after(1.5) as scope:
        await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                      convergence=NeverConverge())
    assert scope.cancelled_caught
    assert alive(mutator.pid)
    c = mutator.count()
    await anyio.sleep(0.4)
    assert mutator.count() > c


async def test_cut_before_commit_resumes_source_only(mutator: Mutator, receiver_factory: Any,
                                                     verifier: Any) -> None:
    def cut() -> None:
        raise errors.BrokenChannelError("cut by the test before READY")

    rx = await receiver_factory(hooks=FaultHooks(before_ready=cut))
    with pytest.raises(errors.MigrationError) as info:
        await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                      convergence=Convergence(max_iterations=2, max_downtime=0.0))
    assert info.value.phase == "restore"
    assert alive(mutator.pid)
    await anyio.sleep(0.3)
    # Exactly one copy runs: the source. The destination discarded its stopped copy.
    assert workload_pids(mutator.script) == [mutator.pid]


async def test_tampered_record_aborts_and_source_resumes(mutator: Mutator,
                                                          receiver_factory: Any,
                                                          verifier: Any) -> None:
    rx = await receiver_factory()
    async with anyio.create_task_group() as tg:
        mitm = Mitm(rx.addr, action="flip", at=6)
        paddr = await tg.start(mitm.serve)
        with pytest.raises(errors.MigrationError):
            await migrate(Process(mutator.pid), paddr, identity=SRC, attestation=verifier,
                          convergence=Convergence(max_iterations=3, max_downtime=0.0))
        tg.cancel_scope.cancel()
    assert alive(mutator.pid)
    assert any(isinstance(e, errors.TamperedRecordError) for e in rx.errors)



async def test_runc_container(receiver_factory: Any, verifier: Any, tmp_path: Any,
                              memory_path: Any) -> None:
    from criu_harness import RuncBundle, read_counter, require_criu

    from ctlive.backends import RestorePolicy
    from ctlive.backends.runc import RuncContainer

    require_criu()
    name = f"ctlive-e2e-{os.getpid()}-{anyio.current_time():.0f}"
    box = RuncBundle(tmp_path, name)
    # The "destination host" is this one: its store is where the test made the rootfs.
    rx = await receiver_factory(restore_policy=RestorePolicy(store=tmp_path))
    try:
        before = box.count()
        report = await migrate(RuncContainer(name), rx.addr, identity=SRC,
                               attestation=verifier,
                               convergence=Convergence(max_iterations=3, max_downtime=0.0))
        assert_read_live(report, "runc")
        # The source container is gone; the restored one counts on from its state.
        gone = await anyio.run_process(["runc", "state", name], check=False)
        assert gone.returncode != 0
        # Its rootfs was carried: it counts on in the receiver's own bundle.
        copy = memory_path / "dest-state" / "bundles" / name / "rootfs" / "tmp" / "c"
        at_handover = read_counter(copy)
        await anyio.sleep(0.5)
        assert read_counter(copy) > at_handover >= before
        assert box.count() <= at_handover  # the source's rootfs is left alone
        assert alive(report.destination_summary["restored_pid"])
    finally:
        box.cleanup(str(memory_path / "dest-state" / "runc"))


async def test_podman_container(receiver_factory: Any, verifier: Any, tmp_path: Any) -> None:
    from criu_harness import PodmanBox, require_criu

    from ctlive.backends.podman import PodmanContainer

    require_criu()
    name = f"ctlive-pm-{os.getpid()}-{anyio.current_time():.0f}"
    box = PodmanBox(tmp_path, name)
    rx = await receiver_factory()
    try:
        await anyio.sleep(0.3)
        before = box.count(name)
        report = await migrate(PodmanContainer(name), rx.addr, identity=SRC,
                               attestation=verifier,
                               convergence=Convergence(max_iterations=3, max_downtime=0.0))
        assert_read_live(report, "podman")
        restored = f"{name}-{report.migration_id[:8]}"
        assert box.pid_of(name) == 0  # the source container is gone
        at_handover = box.count(restored)
        await anyio.sleep(0.5)
        assert box.count(restored) > at_handover >= before
    finally:
        box.cleanup()


async def test_tcp_service_client_survives(receiver_factory: Any, verifier: Any,
                                           tmp_path: Any) -> None:
    from criu_harness import require_criu, tcp_service

    require_criu()
    svc = tcp_service(tmp_path, net=150 + os.getpid() % 50)
    # A destination on this same machine: the veth's outer end gets another name there
    # and its host-side address before the workload resumes.
    rx = await receiver_factory(**svc.receiver_options())
    try:
        assert svc.replies and not svc.errors
        report = await migrate(svc.workload(), rx.addr, identity=SRC, attestation=verifier,
                               convergence=Convergence(max_iterations=2, max_downtime=0.0))
        handed_over = len(svc.replies)
        with anyio.fail_after(60):  # TCP retransmission back-off decides when it resumes
            while len(svc.replies) < handed_over + 10 and not svc.errors:
                await anyio.sleep(0.2)
        assert svc.errors == []  # no reset, no lost reply
        assert len(svc.replies) >= handed_over + 10
        assert not alive(svc.pid)
        assert alive(report.destination_summary["restored_pid"])
        print(f"TCP client: longest gap between replies {svc.max_gap():.2f} s")
    finally:
        svc.cleanup()


async def test_two_migrations_at_once(tmp_path: Any, receiver_factory: Any,
                                      verifier: Any) -> None:
    from criu_harness import Mutator, require_criu

    require_criu()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    workloads = [Mutator(d, mib=8) for d in dirs]
    rx = await receiver_factory()
    reports: list[Any] = []

    async def one(m: Mutator) -> None:
        reports.append(await migrate(
            Process(m.pid), rx.addr, identity=SRC, attestation=verifier,
            convergence=Convergence(max_iterations=2, max_downtime=0.0)))

    try:
        async with anyio.create_task_group() as tg:
            for m in workloads:
                tg.start_soon(one, m)
        assert rx.errors == []
        assert len({r.migration_id for r in reports}) == 2
        for m in workloads:
            assert not alive(m.pid)
            assert len(workload_pids(m.script)) == 1  # exactly one copy of each runs
            c = m.count()
            await anyio.sleep(0.4)
            assert m.count() > c  # and it keeps counting
    finally:
        for m in workloads:
            m.kill()
