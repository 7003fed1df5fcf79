"""A receiver whose podman store is on a disk refuses a podman migration: the restored
container's files and the checkpoint podman unpacks would rest there in plaintext. The
receiver is ``ctlive serve`` with ``CONTAINERS_STORAGE_CONF`` naming a store on this
machine's disk (/var/tmp, ext4 here); the source's container lives in the session's
store on memory (tests/conftest.py), runs on, and nothing lands in the disk store."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from ctlive import errors

pytestmark = [pytest.mark.criu, pytest.mark.anyio]
CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))


@pytest.fixture
def disk_store() -> Iterator[pathlib.Path]:
    """A podman storage.conf whose graph and run roots are on this machine's disk."""
    from ctlive.migration.spool import private_at_rest

    d = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-disk-store-", dir="/var/tmp"))
    try:
        if private_at_rest(d):
            pytest.skip("/var/tmp is memory on this machine: no disk to refuse")
        conf = d / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{d / "graph"}"\n'
                        f'runroot = "{d / "run"}"\n')
        yield conf
    finally:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if line.split()[4].startswith(f"{d}/")]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


async def test_a_podman_store_on_disk_is_refused_and_the_source_runs_on(
        tmp_path: pathlib.Path, memory_path: pathlib.Path, disk_store: pathlib.Path) -> None:
    from criu_harness import PodmanBox, require_criu

    from ctlive.attest import SnpPolicy
    from ctlive.backends.podman import PodmanContainer
    from ctlive.cli import exit_code
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    require_criu()
    name = f"ctlive-pmdisk-{os.getpid()}-{time.monotonic_ns() % 100000}"
    box = PodmanBox(tmp_path, name)  # in the session's store, on memory
    for key in ("src.key", "dst.key"):
        subprocess.run([CTLIVE, "keygen", "-o", str(tmp_path / key)], check=True,
                       capture_output=True)
    (tmp_path / "allow.txt").write_text((tmp_path / "src.key.pub").read_text())
    (tmp_path / "policy.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                          'simulated_chain = "chain.pem"\n')
    disk_env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(disk_store))
    rx = subprocess.Popen([CTLIVE, "serve", "--listen", "127.0.0.1:0", "--key",
                           str(tmp_path / "dst.key"), "--allow", str(tmp_path / "allow.txt"),
                           "--state", str(memory_path / "rx"), "--provider", "simulated",
                           "--simulated-chain", str(tmp_path / "chain.pem")],
                          env=disk_env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert rx.stderr is not None
        banner, deadline = "", time.monotonic() + 60
        while "listening on" not in banner:
            assert time.monotonic() < deadline and rx.poll() is None, banner
            banner += rx.stderr.readline()
        host, _, port = banner.rsplit("listening on ", 1)[1].split()[0].rpartition(":")
        before = box.count(name)
        with pytest.raises(errors.MigrationError) as info:
            await migrate(PodmanContainer(name), (host, int(port)),
                          identity=Identity.load(tmp_path / "src.key"),
                          attestation=SnpPolicy.from_toml(tmp_path / "policy.toml"),
                          convergence=Convergence(max_iterations=2, max_downtime=0.0))
        message = str(info.value)
        assert "data-at-rest-refused" in message, message
        for why in ("graphroot", "disk-backed", "plaintext", "CONTAINERS_STORAGE_CONF",
                    "tmpfs"):
            assert why in message, message
        assert exit_code(info.value) == 5  # like any refusal at the restore: the source resumed
        # The source's container runs on, and its counter goes on.
        assert box.pid_of(name) > 0
        at = box.count(name)
        deadline = time.monotonic() + 10
        while box.count(name) <= at:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert at >= before
        # Nothing was written to the disk store: no container, no image.
        for listing in (["ps", "--all", "--quiet"], ["images", "--all", "--quiet"],
                        ["volume", "ls", "--quiet"]):
            out = subprocess.run(["podman", *listing], env=disk_env, capture_output=True,
                                 text=True, check=True)
            assert out.stdout.strip() == "", (listing, out.stdout)
    finally:
        rx.kill()
        rx.wait()
        with contextlib.suppress(Exception):
            box.cleanup()
