"""Memory-backed directories for receivers run by tests, the demo and the benchmarks.

A receiver refuses a state directory on disk (its images are plaintext memory). This
module mounts a tmpfs of its own at :data:`MEMORY_ROOT` (even where ``/run`` is a tmpfs:
that one every workload sees) and hands out private directories inside it.

CRIU archives every tmpfs a dumped workload can see (its contents go into the image and
come back at the restore), so a receiver's state on a tmpfs that the workload sees would
travel inside the workload's next dump. Workloads started by ``ctlive.testing`` and the
test harness unmount :data:`MEMORY_ROOT` in their own mount namespace first
(:data:`HIDE_MEMORY`); a launcher of your own should do the same.

A receiver also refuses a podman store on disk (the restored container's files and the
checkpoint podman unpacks would rest there in plaintext): :func:`podman_memory_store`
gives the tests and benchmarks that restore podman containers on this machine a store on
memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from ctlive.errors import StorageError
from ctlive.migration.spool import memory_backed

__all__ = ["HIDE_MEMORY", "MEMORY_ROOT", "memory_dir", "memory_root", "podman_memory_store",
           "temporary_memory_dir"]

MEMORY_ROOT = pathlib.Path("/run/ctlive-testing")
"""Where the shared tmpfs is mounted."""

HIDE_MEMORY = (f"umount -l {shlex.quote(str(MEMORY_ROOT))} 2>/dev/null; "
               "umount -l /run/netns 2>/dev/null; ")
"""A shell prefix for a workload's ``sh -c``, run inside its own mount namespace: the
workload no longer sees the receivers' state (and its dumps do not carry it), nor the
named network namespaces other tests keep in ``/run/netns`` (CRIU cannot dump a task
whose mount namespace holds their nsfs mounts: "doesn't have a proper root mount")."""


def memory_root() -> pathlib.Path:
    """:data:`MEMORY_ROOT`, mounted as a tmpfs (once per machine; needs root)."""
    MEMORY_ROOT.parent.mkdir(parents=True, exist_ok=True)
    # Several test runs may start at once: only one of them mounts.
    with open(f"{MEMORY_ROOT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MEMORY_ROOT.mkdir(mode=0o700, exist_ok=True)
        if not _mounted(MEMORY_ROOT):
            out = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,nodev,nosuid",
                                  "tmpfs", str(MEMORY_ROOT)], capture_output=True, text=True)
            if out.returncode != 0 or not memory_backed(MEMORY_ROOT):
                raise StorageError(f"cannot mount a tmpfs at {MEMORY_ROOT}: "
                                   f"{out.stderr.strip()}", path=str(MEMORY_ROOT))
    return MEMORY_ROOT


def _mounted(path: pathlib.Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def memory_dir(prefix: str = "ctlive-") -> pathlib.Path:
    """A new private (0700) directory on memory; the caller removes it."""
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=memory_root()))


@contextlib.contextmanager
def temporary_memory_dir(prefix: str = "ctlive-") -> Iterator[pathlib.Path]:
    """:func:`memory_dir`, removed on exit."""
    d = memory_dir(prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def podman_memory_store(prefix: str = "podman-") -> Iterator[pathlib.Path]:
    """A podman store on memory for this process and its children: a storage.conf whose
    graph and run roots are in a :func:`memory_dir`, named by ``CONTAINERS_STORAGE_CONF``
    until exit (images must be imported into it). On exit its containers are removed, its
    mounts dropped and the directory deleted; the previous ``CONTAINERS_STORAGE_CONF``
    comes back."""
    d = memory_dir(prefix)
    conf = d / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{d / "graph"}"\n'
                    f'runroot = "{d / "run"}"\n')
    before = os.environ.get("CONTAINERS_STORAGE_CONF")
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    try:
        yield d
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["podman", "rm", "--all", "--force", "--time", "0"],
                           capture_output=True, timeout=120)
            subprocess.run(["podman", "volume", "prune", "--force"], capture_output=True,
                           timeout=60)
        if before is None:
            os.environ.pop("CONTAINERS_STORAGE_CONF", None)
        else:
            os.environ["CONTAINERS_STORAGE_CONF"] = before
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for m in sorted((m for m in mounts if m.startswith(f"{d}/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
