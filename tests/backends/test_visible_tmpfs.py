"""`migrate()` refuses a dump directory that the workload sees on a tmpfs: CRIU would
archive that tmpfs, the earlier dumps in it included, into every dump."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from ctlive.backends.workload import visible_tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    d = tmp_path / "t"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _sleeper(argv: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*argv, "sleep", "30"])
    time.sleep(0.3)  # unshare execs sleep
    return p


def test_a_tmpfs_in_the_workloads_own_mount_namespace_is_found(
        tmpfs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    p = _sleeper(["unshare", "--mount", "--propagation", "private"])
    try:
        (tmpfs / "dump-0").mkdir()
        assert visible_tmpfs(p.pid, tmpfs / "dump-0") == str(tmpfs)
        # A directory on another filesystem is not.
        assert visible_tmpfs(p.pid, tmp_path) is None
    finally:
        p.kill()
        p.wait()


def test_a_workload_in_our_mount_namespace_is_dumped_without_its_mounts(
        tmpfs: pathlib.Path) -> None:
    p = _sleeper([])
    try:
        assert visible_tmpfs(p.pid, tmpfs) is None
    finally:
        p.kill()
        p.wait()
