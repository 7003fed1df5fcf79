"""Data at rest at the destination (issue 14): the receiver's state is memory or the
encrypted spool, never a disk; what a migration leaves behind on either side is only the
running copy's own; a discarded copy leaves no bundle; a migration into a spool works and
the spool's file holds no plaintext of the workload's memory."""

from __future__ import annotations

import os
import pathlib
import secrets
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest
from criu_harness import Mutator, RuncBundle, _python_pid, read_counter, require_criu, workload_pids

from ctlive import errors
from ctlive.backends import Process, RestorePolicy
from ctlive.backends.runc import RuncContainer
from ctlive.migration.convergence import Convergence
from ctlive.migration.destination import serve
from ctlive.migration.journal import Journal
from ctlive.migration.source import migrate
from ctlive.migration.spool import memory_backed
from ctlive.testing.hooks import FaultHooks
from ctlive.testing.memory import HIDE_MEMORY
from tests.e2e.conftest import DST, SRC

pytestmark = [pytest.mark.anyio, pytest.mark.criu]
CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))

MARKED = r"""
import os, sys, time
os.setsid()  # its own session inside the PID namespace, as CRIU requires
marker, counter = sys.argv[1].encode(), sys.argv[2]
mem = bytearray(marker * ((4 << 20) // len(marker)))  # 4 MiB of the marker
i = 0
while True:
    i += 1
    mem[(i * 4096) % len(mem)] = mem[(i * 4096) % len(mem)]  # touched, still the marker
    with open(counter + ".tmp", "w") as f:
        f.write(str(i))
    os.replace(counter + ".tmp", counter)
    time.sleep(0.05)
"""


def files_under(d: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def source_left(state: pathlib.Path) -> list[str]:
    """The source's work directories (its dumps) that still exist."""
    journal = Journal(state, "source")
    try:
        return [e.data["workdir"] for e in journal.entries()
                if pathlib.Path(e.data.get("workdir", "/nonexistent")).exists()]
    finally:
        journal.close()


async def test_a_disk_state_directory_is_refused(tmp_path: pathlib.Path, platform: Any) -> None:
    """serve() and `ctlive serve` refuse a state directory on disk (here ext4) before
    anything is written there, saying why and what to configure."""
    assert not memory_backed(tmp_path)
    with pytest.raises(errors.ConfigError) as info:
        await serve(("127.0.0.1", 0), identity=DST, provider=platform,
                    allow={SRC.public_key}, state_dir=tmp_path / "state")
    message = str(info.value)
    for words in (str(tmp_path / "state"), "disk-backed", "plaintext", "tmpfs", "--spool"):
        assert words in message, message
    assert not (tmp_path / "state").exists()
    (tmp_path / "k").write_text("")
    cli = await anyio.run_process([CTLIVE, "serve", "--key", str(tmp_path / "k"), "--allow",
                                   str(tmp_path / "k"), "--state", str(tmp_path / "cli")],
                                  check=False)
    assert cli.returncode == 2
    assert b"disk-backed" in cli.stderr and b"plaintext" in cli.stderr
    assert not (tmp_path / "cli").exists()


async def test_state_is_memory_while_migrating_and_nothing_is_left(
        mutator: Mutator, receiver_factory: Any, verifier: Any, memory_path: pathlib.Path,
        source_state_dir: pathlib.Path) -> None:
    state = memory_path / "dest-state"
    seen: list[tuple[bool, list[str]]] = []

    def look() -> None:  # while the images are being received, then when complete
        seen.append((memory_backed(state), files_under(state)))

    rx = await receiver_factory(hooks=FaultHooks(mid_iteration=look, before_restore=look))
    report = await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                           convergence=Convergence(max_iterations=3, max_downtime=0.0))
    assert seen and all(on_memory for on_memory, _ in seen)
    # The check saw the images themselves there: pages, in the migration's directory.
    mid = report.migration_id
    assert any(f.startswith(f"{mid}/") and "pages-" in f for f in seen[-1][1])
    assert workload_pids(mutator.script) == [report.destination_summary["restored_pid"]]
    with anyio.fail_after(10):
        while [f for f in files_under(state) if not f.startswith("journal.sqlite")]:
            await anyio.sleep(0.05)  # the receiver's session may end just after the source
    assert source_left(source_state_dir) == []
    assert rx.errors == []


async def test_a_discarded_runc_copy_leaves_no_bundle(
        receiver_factory: Any, verifier: Any, tmp_path: pathlib.Path,
        memory_path: pathlib.Path, source_state_dir: pathlib.Path) -> None:
    """The receiver fails after restoring a runc container (before READY): the copy is
    discarded with its bundle, runc forgets it, no image is left, and the source's
    container runs on."""
    require_criu()
    name = f"ctlive-rest-{os.getpid()}-{time.monotonic_ns() % 100000}"
    box = RuncBundle(tmp_path, name)
    state = memory_path / "dest-state"
    bundles: list[bool] = []

    def fail() -> None:
        bundles.append((state / "bundles" / name).is_dir())
        raise errors.StorageError("injected: the receiver fails before READY")

    rx = await receiver_factory(hooks=FaultHooks(before_ready=fail),
                                restore_policy=RestorePolicy(store=tmp_path))
    try:
        with pytest.raises(errors.MigrationError):
            await migrate(RuncContainer(name), rx.addr, identity=SRC, attestation=verifier,
                          convergence=Convergence(max_iterations=2, max_downtime=0.0))
        assert bundles == [True]  # it was there: the restore had made it
        assert not (state / "bundles" / name).exists()
        gone = await anyio.run_process(["runc", "--root", str(state / "runc"), "state", name],
                                       check=False)
        assert gone.returncode != 0
        with anyio.fail_after(10):  # the images go in a thread of their own
            while [f for f in files_under(state) if not f.startswith("journal.sqlite")]:
                await anyio.sleep(0.05)
        assert source_left(source_state_dir) == []
        before = box.count()
        await anyio.sleep(0.3)
        assert box.count() > before
    finally:
        box.cleanup(str(state / "runc"))


async def test_a_migration_into_the_encrypted_spool(
        receiver_factory: Any, verifier: Any, tmp_path: pathlib.Path) -> None:
    """serve(spool=FILE): the images are in the spool (plaintext there, through the
    kernel), its file on disk never holds the workload's memory, and the spool is gone
    when the receiver stops."""
    require_criu()
    marker = f"CTLIVE-AT-REST-{secrets.token_hex(8)}-"
    script, counter = tmp_path / "marked.py", tmp_path / "count"
    script.write_text(MARKED)
    cmd = f"{HIDE_MEMORY}exec {sys.executable} {script} {marker} {counter} " \
          "</dev/null >/dev/null 2>&1"
    subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", cmd],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    pid = _python_pid(script)
    image = tmp_path / "spool.img"
    found: list[tuple[bool, bool]] = []

    def inspect() -> None:  # the final image complete, in the spool, not restored yet
        os.sync()
        plain = b"".join(p.read_bytes() for p in image.with_name("spool.img.mnt").rglob(
            "pages-*.img"))
        found.append((marker.encode() * 4 in plain, marker.encode() in image.read_bytes()))

    try:
        deadline = time.monotonic() + 10
        while not counter.exists() and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        rx = await receiver_factory(hooks=FaultHooks(before_restore=inspect), spool=image,
                                    spool_size="128M")
        assert image.is_file()
        report = await migrate(Process(pid), rx.addr, identity=SRC, attestation=verifier,
                               convergence=Convergence(max_iterations=2, max_downtime=0.0))
        assert found == [(True, False)]  # in the images; not in the spool's file
        new = report.destination_summary["restored_pid"]
        assert workload_pids(script) == [new]
        c = read_counter(counter)
        await anyio.sleep(0.3)
        assert read_counter(counter) > c
        rx.scope.cancel()
        with anyio.fail_after(10):
            while image.exists() or image.with_name("spool.img.mnt").exists():
                await anyio.sleep(0.05)
    finally:
        for p in workload_pids(script):
            os.kill(p, 9)


def test_ctlive_serve_with_a_spool_removes_it_on_sigterm(tmp_path: pathlib.Path,
                                                         memory_path: pathlib.Path) -> None:
    """`ctlive serve --spool FILE --spool-size SIZE`: a migration lands in the spool, and
    the SIGTERM systemd stops the service with removes the key, the mount and FILE."""
    require_criu()

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CTLIVE, *args], capture_output=True, text=True, timeout=120)

    for name in ("dst", "src"):
        assert ctl("keygen", "-o", str(tmp_path / f"{name}.key")).returncode == 0
    (tmp_path / "allow.txt").write_text((tmp_path / "src.key.pub").read_text())
    image = tmp_path / "spool.img"
    # The workload first: its mount namespace must not hold a copy of the spool's mount.
    m = Mutator(tmp_path, mib=8)
    rx = subprocess.Popen([CTLIVE, "serve", "--listen", "127.0.0.1:0", "--key",
                           str(tmp_path / "dst.key"), "--allow", str(tmp_path / "allow.txt"),
                           "--spool", str(image), "--spool-size", "96M", "--state",
                           str(memory_path / "rx"), "--provider", "simulated",
                           "--simulated-chain", str(tmp_path / "chain.pem")],
                          stderr=subprocess.PIPE, text=True)
    assert rx.stderr is not None
    try:
        banner = ""
        while "listening on" not in banner:
            assert rx.poll() is None, banner
            banner += rx.stderr.readline()
        addr = banner.rsplit("listening on ", 1)[1].split()[0]
        (tmp_path / "policy.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                              'simulated_chain = "chain.pem"\n')
        out = ctl("migrate", f"pid:{m.pid}", addr, "--key", str(tmp_path / "src.key"),
                  "--policy", str(tmp_path / "policy.toml"), "--state",
                  str(tmp_path / "src-state"), "--max-iterations", "2")
        assert out.returncode == 0, out.stderr
        assert image.is_file() and str(image) + ".mnt" in pathlib.Path("/proc/mounts").read_text()
        rx.terminate()
        assert rx.wait(timeout=30) == 0
        assert "SIGTERM" in rx.stderr.read()
        assert not image.exists() and not image.with_name("spool.img.mnt").exists()
        assert str(image) + ".mnt" not in pathlib.Path("/proc/mounts").read_text()
        pids = workload_pids(m.script)
        assert len(pids) == 1 and pids[0] != m.pid  # the migrated copy runs on
    finally:
        if rx.poll() is None:
            rx.kill()
        m.kill()
