"""ctlive.testing.memory: receivers' state directories on memory, hidden from workloads."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from ctlive.migration.spool import check_state_dir, memory_backed
from ctlive.testing.memory import HIDE_MEMORY, MEMORY_ROOT, memory_dir


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs)")


def test_a_memory_dir_is_private_memory_a_receiver_accepts() -> None:
    d = memory_dir("t-")
    try:
        assert memory_backed(d) and d.parent == MEMORY_ROOT
        assert oct(d.stat().st_mode & 0o777) == "0o700"
        check_state_dir(d / "state")  # no ConfigError
    finally:
        d.rmdir()


def test_hide_memory_keeps_the_tmpfs_out_of_a_workloads_mount_namespace() -> None:
    """CRIU archives every tmpfs a dumped workload sees: a launcher's shell that starts
    with HIDE_MEMORY no longer has MEMORY_ROOT mounted; one without it has."""
    d = memory_dir("t-")
    try:
        def mounts(prefix: str) -> str:
            return subprocess.run(["unshare", "--mount", "--fork", "sh", "-c",
                                   f"{prefix}cat /proc/self/mountinfo"],
                                  capture_output=True, text=True, check=True).stdout

        def mounted(info: str) -> bool:
            return any(line.split()[4] == str(MEMORY_ROOT) for line in info.splitlines())

        assert mounted(mounts(""))
        assert not mounted(mounts(HIDE_MEMORY))
        subprocess.run(["ip", "netns", "add", f"ctlive-hide-{os.getpid()}"], check=True)
        try:
            netns = [ln for ln in mounts(HIDE_MEMORY).splitlines() if "/run/netns" in ln]
            assert netns == []
            assert any("/run/netns" in ln for ln in mounts("").splitlines())
        finally:
            subprocess.run(["ip", "netns", "delete", f"ctlive-hide-{os.getpid()}"])
        assert memory_backed(d) and mounted(pathlib.Path("/proc/self/mountinfo").read_text())
        # (unmounted only in that namespace)
    finally:
        d.rmdir()
