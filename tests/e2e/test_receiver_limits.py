"""The receiver's limits on what a source may send, with real CRIU: each refusal has its
own error at the receiver and its own code at the source, and the source workload runs
on."""

from __future__ import annotations

import pathlib
from typing import Any

import anyio
import pytest
from criu_harness import Mutator, workload_pids

from ctlive import errors
from ctlive.backends.process import Process
from ctlive.migration.convergence import Convergence
from ctlive.migration.destination import ReceiverLimits
from ctlive.migration.journal import Journal, SourceState
from ctlive.migration.source import migrate
from tests.e2e.conftest import SRC

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("limit", ["max_image_bytes", "max_state_bytes"])
async def test_oversized_image_is_refused(limit: str, mutator: Mutator, receiver_factory: Any,
                                          verifier: Any) -> None:
    """One migration's image above max_image_bytes, or all images above max_state_bytes
    (the workload holds 16 MiB): each refused with its own limit named."""
    rx = await receiver_factory(limits=ReceiverLimits(**{limit: 1 << 20}))
    with pytest.raises(errors.MigrationError) as info:
        await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                      convergence=Convergence(max_iterations=2, max_downtime=0.0))
    assert "image-too-large" in str(info.value)
    assert any(isinstance(e, errors.ImageTooLargeError) and e.limit == limit
               for e in rx.errors)
    assert workload_pids(mutator.script) == [mutator.pid]
    c = mutator.count()
    await anyio.sleep(0.3)
    assert mutator.count() > c


async def test_stale_work_directories_are_cleaned_once_settled(
        mutator: Mutator, receiver_factory: Any, verifier: Any,
        source_state_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A crashed run's work directory goes at the next start once its journal entry is
    settled; one whose migration is still in doubt keeps its final checkpoint."""
    settled, in_doubt = tmp_path / "ctlive-src-settled", tmp_path / "ctlive-src-doubt"
    for d in (settled, in_doubt):
        d.mkdir()
        (d / "pages-1.img").write_bytes(bytes(4096))
    journal = Journal(source_state_dir, "source")
    journal.record("old1", SourceState.ABORTED, workdir=str(settled), own_workdir=True)
    journal.record("old2", SourceState.FINAL_SENT, workdir=str(in_doubt), own_workdir=True)
    journal.close()
    rx = await receiver_factory()
    await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                  convergence=Convergence(max_iterations=2, max_downtime=0.0))
    assert not settled.exists()
    assert (in_doubt / "pages-1.img").exists()


async def test_a_consumer_that_never_reads_does_not_stall_the_migration(
        tmp_path: pathlib.Path, receiver_factory: Any, verifier: Any) -> None:
    """A progress channel nobody reads (no buffer) used to block migrate() at its first
    event; now events are dropped and the downtime is that of a migration without it."""
    rx = await receiver_factory()
    downtimes = {}
    for name in ("none", "blocked"):
        (tmp_path / name).mkdir()
        m = Mutator(tmp_path / name, mib=8)
        send, recv = anyio.create_memory_object_stream[Any](0)
        try:
            with anyio.fail_after(60):
                report = await migrate(
                    Process(m.pid), rx.addr, identity=SRC, attestation=verifier,
                    convergence=Convergence(max_iterations=2, max_downtime=0.0),
                    progress_channel=send if name == "blocked" else None)
            downtimes[name] = report.downtime
        finally:
            send.close()
            recv.close()
            m.kill()
    assert downtimes["blocked"] < 3 * downtimes["none"] + 0.5, downtimes


class _Asking(Process):
    """A source whose restore spec asks for more than the receiver allows."""

    kind = "runc"

    def __init__(self, pid: int, config: dict[str, Any], rootfs: pathlib.Path) -> None:
        super().__init__(pid)
        self._config, self._rootfs = config, rootfs

    def restore_spec(self) -> dict[str, Any]:
        return {"id": "ctlive-asking", "config": self._config, "rootfs": str(self._rootfs)}


@pytest.mark.parametrize(("ask", "field"), [
    ({"hooks": {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "id"]}]}}, "hooks"),
    ({"mounts": [{"destination": "/host", "type": "bind", "source": "/etc",
                  "options": ["rbind"]}]}, "mounts"),
])
async def test_a_spec_with_a_hook_or_a_host_mount_is_refused(
        ask: dict[str, Any], field: str, mutator: Mutator, receiver_factory: Any,
        verifier: Any, tmp_path: pathlib.Path) -> None:
    """Through a whole migration: the receiver refuses the spec with RestoreSpecError
    naming the field, the source hears restore-spec-refused, and its workload runs on."""
    from ctlive.backends import RestorePolicy

    (tmp_path / "rootfs").mkdir()  # inside the store: only the asked-for field is wrong
    rx = await receiver_factory(restore_policy=RestorePolicy(store=tmp_path))
    config = {"ociVersion": "1.0.2", "process": {"args": ["/bin/sh"], "cwd": "/"},
              "root": {"path": "rootfs"},
              "linux": {"namespaces": [{"type": n} for n in
                                       ("pid", "network", "mount", "ipc", "uts")]}, **ask}
    with pytest.raises(errors.MigrationError) as info:
        await migrate(_Asking(mutator.pid, config, tmp_path / "rootfs"), rx.addr, identity=SRC,
                      attestation=verifier,
                      convergence=Convergence(max_iterations=2, max_downtime=0.0))
    assert "restore-spec-refused" in str(info.value)
    refusals = [e for e in rx.errors if isinstance(e, errors.RestoreSpecError)]
    assert refusals and field in str(refusals[0])
    assert workload_pids(mutator.script) == [mutator.pid]
    c = mutator.count()
    await anyio.sleep(0.3)
    assert mutator.count() > c
