"""The benchmark's workloads, each with a client on this host that measures downtime
as the longest gap between two replies.

- ``MutatingService``: the demo's TCP counter service with a parametric mutator
  (image size, dirty fraction per second, bytes changed per dirtied page);
- ``RedisService``: Debian's redis-server filled with ``DEBUG POPULATE``, the client
  being a writer doing random SETs (and reading one back every so often, so a lost
  write is caught).

Both run in their own PID, mount and network namespace (the rows that use CRIU
directly: ctlive, the floor, CRIU page-server), or, through ``in_podman()``, in a
podman container that joins a network namespace held open outside it (the podman
row: podman restores the container into the same namespace).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from typing import Any

from ctlive.testing.workloads import SampleService

IMAGE = "localhost/ctlive-bench-base:1"
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


class MutatingService(SampleService):
    """The mutating TCP service (``ctlive.testing.workloads``), with its parameters in its label."""

    def label(self) -> str:
        return f"mutating {self.mib} MiB, {self.dirty:.0%}/s x {self.touch} B"


class RedisService(SampleService):
    """redis-server holding about ``mib`` MiB of keys, and a writer doing random SETs."""

    value_size = 1024
    request_interval = 0.002
    udp_probe = False  # redis has no UDP echo: downtime is the writer's gap

    def __init__(self, workdir: pathlib.Path, net: int, mib: int = 64) -> None:
        self.keys = max(1000, (mib << 20) // (self.value_size + 200))
        self._rnd = random.Random(11)
        self._last: tuple[bytes, bytes] | None = None
        super().__init__(workdir, net, mib)

    def label(self) -> str:
        return f"redis {self.mib} MiB ({self.keys} keys), random SETs"

    def command(self) -> list[str]:
        return ["/usr/bin/redis-server", "--port", "7000", "--bind", "0.0.0.0",
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--enable-debug-command", "yes", "--maxclients", "64"]

    @staticmethod
    def _resp(*args: bytes) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def prepare(self) -> None:
        c = self._connect()
        f = c.makefile("rwb", buffering=0)
        f.write(self._resp(b"DEBUG", b"POPULATE", b"%d" % self.keys, b"key",
                           b"%d" % self.value_size))
        if f.readline() != b"+OK\r\n":
            raise OSError("redis DEBUG POPULATE failed")
        c.close()

    def exchange(self, f: Any, i: int) -> int:
        if i % 50 == 49 and self._last is not None:
            key, want = self._last  # read back the previous write: a lost write shows
            f.write(self._resp(b"GET", key))
            head = f.readline()
            got = f.read(int(head[1:]) + 2)[:-2] if head.startswith(b"$") else b""
            if got != want:
                raise ValueError(f"GET {key!r} after SET returned {head!r}: lost write")
        key = b"key:%d" % self._rnd.randrange(self.keys)
        value = self._rnd.randbytes(self.value_size // 2).hex().encode()
        f.write(self._resp(b"SET", key, value))
        reply = f.readline()
        if reply != b"+OK\r\n":
            raise ValueError(f"SET answered {reply!r}")
        self._last = (key, value)
        return i

    def pids(self) -> list[int]:
        own = os.readlink("/proc/self/ns/pid")
        out = []
        for d in pathlib.Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if ((d / "comm").read_text().strip() == "redis-server"
                        and os.readlink(d / "ns/pid") != own):
                    out.append(int(d.name))
        return out


def _ensure_image() -> None:
    """A base image that is only mount points: /usr comes from the host, read-only."""
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp, "rootfs")
        for d in ("usr", "tmp", "proc", "sys", "dev", "etc", "run", "var"):
            (root / d).mkdir(parents=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            (root / link).symlink_to(f"usr/{link}")
        tar = pathlib.Path(tmp, "rootfs.tar")
        with tarfile.open(tar, "w") as t:
            t.add(root, arcname=".")
        subprocess.run(["podman", "import", "-q", str(tar), IMAGE], check=True,
                       capture_output=True)


def in_podman(cls: type[SampleService]) -> type[SampleService]:
    """The same workload in a podman container joined to a network namespace that a
    holder process keeps open, so that podman restores it into the same network. Podman's
    store is the one ``CONTAINERS_STORAGE_CONF`` names (``python -m benchmarks`` puts it on
    memory, ``ctlive.testing.memory.podman_memory_store``); the image is imported into it."""

    class Podman(cls):  # type: ignore[valid-type,misc]
        python = "/usr/bin/python3"

        def command(self) -> list[str]:
            argv: list[str] = super().command()
            if argv[0].endswith(("python", "python3")) or "python3." in argv[0]:
                argv[0] = self.python  # the container sees the host's /usr only
            return argv

        def launch(self, argv: list[str]) -> int:
            _ensure_image()
            self.name = f"ctlive-bench-{self.outer}"
            self._holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"],
                                            start_new_session=True)
            time.sleep(0.1)
            subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True)
            subprocess.run(["podman", "run", "-d", "--name", self.name, "--network",
                            f"ns:/proc/{self._holder.pid}/ns/net", *PODMAN_LIMITS,
                            "-v", "/usr:/usr:ro", "-v", f"{self.workdir}:{self.workdir}",
                            IMAGE, *argv], check=True, capture_output=True)
            return self.container_pid()

        @property
        def net_pid(self) -> int:
            return int(self._holder.pid)

        def container_pid(self) -> int:
            out = subprocess.run(["podman", "inspect", self.name, "--format",
                                  "{{.State.Pid}}"], capture_output=True, text=True)
            return int(out.stdout.strip() or 0)

        def pids(self) -> list[int]:
            pid = self.container_pid() if hasattr(self, "name") else 0
            return [pid] if pid else []

        def cleanup(self) -> None:
            super().cleanup()
            subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._holder.pid, signal.SIGKILL)
            self._holder.wait()

    Podman.__name__ = f"Podman{cls.__name__}"
    return Podman


def have_redis() -> bool:
    """redis-server is installed (scripts/install-criu installs it)."""
    return shutil.which("redis-server") is not None or os.path.exists("/usr/bin/redis-server")
