"""Real-CRIU test helpers: find CRIU, run a workload in its own PID and mount
namespace, dump it, restore it. Tests skip (with the reason) only when not root or
when CRIU is not installed (scripts/install-criu); CI has both."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ctlive.testing.memory import HIDE_MEMORY

CRIU = os.environ.get("CTLIVE_CRIU") or "/opt/ctlive/criu/usr/sbin/criu"

MUTATOR = r"""
import os, random, sys, time
os.setsid()  # its own session inside the PID namespace, as CRIU requires
size = int(sys.argv[1]) << 20; frac = float(sys.argv[2]); counter_path = sys.argv[3]
b = bytearray(size); r = random.Random(1)
for i in range(0, size, 4096):
    b[i:i + 64] = r.randbytes(64)
npages = size // 4096
n = 0
while True:
    for _ in range(int(npages * frac / 10) or 1):
        p = r.randrange(npages) * 4096 + r.randrange(4096 - 8)
        b[p:p + 8] = r.randbytes(8)
    n += 1
    with open(counter_path, "w") as f:
        f.write(str(n))
    time.sleep(0.1)
"""


def read_counter(path: pathlib.Path, timeout: float = 2.0) -> int:
    """The workload rewrites its counter file on every tick (truncate, then write), so a
    read can land in between and see it empty: retry until it holds a number."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.01)


def require_criu() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root for CRIU")
    if not (os.path.exists(CRIU) and os.access(CRIU, os.X_OK)):
        pytest.skip(f"CRIU not installed at {CRIU}: run scripts/install-criu")
    return CRIU


def pid_of(marker: str, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
        pids = [int(x) for x in out.split()]
        # The command itself runs as PID 1 of its namespace: the newest match.
        if pids:
            return max(pids)
        time.sleep(0.05)
    raise RuntimeError(f"workload {marker} did not start")


class Mutator:
    """A process in its own PID+mount namespace that mutates a buffer and counts."""

    def __init__(self, tmp: pathlib.Path, mib: int = 16, frac: float = 0.2) -> None:
        self.script = tmp / f"mutator-{os.getpid()}-{time.monotonic_ns()}.py"
        self.script.write_text(MUTATOR)
        self.counter = tmp / "counter"
        # HIDE_MEMORY: the receivers' tmpfs must not travel inside this workload's dumps.
        cmd = f"{HIDE_MEMORY}exec {sys.executable} {self.script} {mib} {frac} {self.counter} " \
              "</dev/null >/dev/null 2>&1"
        # Inherited descriptors from the host mount namespace would make the dump fail.
        subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", cmd],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        self.pid = _python_pid(self.script)
        deadline = time.monotonic() + 10
        while not self.counter.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def count(self) -> int:
        return read_counter(self.counter)

    def dump(self, d: pathlib.Path, *, final: bool) -> None:
        d.mkdir(parents=True, exist_ok=True)
        mode = "--leave-stopped" if final else "--leave-running"
        subprocess.run([CRIU, "dump", "-t", str(self.pid), "-D", str(d), mode, "-o", "dump.log"],
                       check=True, capture_output=True)

    def kill(self) -> None:
        with_pid = subprocess.run(["pgrep", "-f", str(self.script)], capture_output=True,
                                  text=True).stdout.split()
        for p in with_pid:
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass


def restore_stopped(d: pathlib.Path) -> None:
    subprocess.run([CRIU, "restore", "-D", str(d), "-d", "--leave-stopped", "--root", "/",
                    "-o", "restore.log"], check=True, capture_output=True)


def state(pid: int) -> str:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"


def _python_pid(script: pathlib.Path, timeout: float = 10.0,
                states: tuple[str, ...] = ("S", "R", "D")) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workload_pids(script, states)
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise RuntimeError(f"workload {script} did not start")


def workload_pids(script: pathlib.Path,
                  states: tuple[str, ...] = ("S", "R", "D")) -> list[int]:
    """Python processes executing ``script`` in one of ``states`` (default: running)."""
    from ctlive.testing.workloads import script_pids

    return script_pids(script, states)


class RuncBundle:
    """A runc container on a busybox-static rootfs that counts into /tmp/c."""

    def __init__(self, tmp: pathlib.Path, name: str) -> None:
        busybox = shutil.which("busybox")
        if busybox is None or shutil.which("runc") is None:
            pytest.skip("runc or busybox-static missing: run scripts/install-criu")
        self.bundle = tmp / f"bundle-{name}"
        rootfs = self.bundle / "rootfs"
        for d in ("bin", "tmp", "proc", "dev", "sys"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        for tool in ("sh", "sleep"):
            (rootfs / "bin" / tool).symlink_to("busybox")
        subprocess.run(["runc", "spec"], cwd=self.bundle, check=True)
        import json

        cfg = json.loads((self.bundle / "config.json").read_text())
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = ["sh", "-c", "i=0; while true; do i=$((i+1)); "
                                  "echo $i > /tmp/c; sleep 0.05; done"]
        cfg["root"]["readonly"] = False
        (self.bundle / "config.json").write_text(json.dumps(cfg))
        self.id = name
        self.counter = rootfs / "tmp" / "c"
        # stdio on /dev/null: a host log file would be outside the container's mounts.
        subprocess.run(["runc", "run", "--detach", "--bundle", str(self.bundle), name],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        deadline = time.monotonic() + 5
        while not self.counter.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def count(self) -> int:
        return read_counter(self.counter)

    def cleanup(self, *roots: str) -> None:
        for root in (None, *roots):
            cmd = ["runc"] + (["--root", root] if root else [])
            subprocess.run([*cmd, "delete", "--force", self.id], capture_output=True)


class PodmanBox:
    """A podman container from a busybox rootfs imported with `podman import`, in the
    store ``CONTAINERS_STORAGE_CONF`` names: the session's, on memory (tests/conftest.py),
    since a receiver refuses a podman store on disk."""

    IMAGE = "localhost/ctlive-busybox:test"

    def __init__(self, tmp: pathlib.Path, name: str) -> None:
        busybox = shutil.which("busybox")
        if busybox is None or shutil.which("podman") is None:
            pytest.skip("podman or busybox-static missing: run scripts/install-criu")
        env = dict(os.environ, PATH=f"{pathlib.Path(CRIU).parent}:{os.environ['PATH']}")
        self.env = env
        have = subprocess.run(["podman", "image", "exists", self.IMAGE], env=env)
        if have.returncode != 0:
            rootfs = tmp / "podman-rootfs"
            (rootfs / "bin").mkdir(parents=True)
            (rootfs / "tmp").mkdir()
            shutil.copy(busybox, rootfs / "bin" / "busybox")
            for tool in ("sh", "sleep"):
                (rootfs / "bin" / tool).symlink_to("busybox")
            tar = tmp / "rootfs.tar"
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
            subprocess.run(["podman", "import", "-q", str(tar), self.IMAGE], env=env,
                           check=True, capture_output=True)
        self.name = name
        # This machine lacks CAP_SYS_RESOURCE: pin limits podman can set.
        subprocess.run(["podman", "run", "-d", "--name", name, "--ulimit", "nofile=1024:1024",
                        "--ulimit", "nproc=4096:4096", self.IMAGE, "sh", "-c",
                        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.05; done"],
                       env=env, check=True, capture_output=True)

    def pid_of(self, name: str) -> int:
        out = subprocess.run(["podman", "inspect", name, "--format", "{{.State.Pid}}"],
                             env=self.env, capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    def count(self, name: str) -> int:
        return read_counter(pathlib.Path(f"/proc/{self.pid_of(name)}/root/tmp/c"))

    def cleanup(self) -> None:
        out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=self.env,
                             capture_output=True, text=True).stdout.split()
        for n in out:
            if n.startswith(self.name):
                subprocess.run(["podman", "rm", "-f", "-t", "0", n], env=self.env,
                               capture_output=True)


def tcp_service(tmp: pathlib.Path, net: int) -> Any:
    """The demo's TCP service + client (ctlive.testing.workloads.SampleService), small."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 missing: run scripts/install-criu")
    from ctlive.testing.workloads import SampleService

    return SampleService(tmp, net=net, mib=8)
