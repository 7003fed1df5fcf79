"""Hosts on one machine, for end-to-end tests, the demo and the benchmarks.

A :class:`Host` is its own network, mount, PID and UTS namespace set. Its ``/tmp``,
``/var/tmp`` and ``/run`` are tmpfs mounts of its own (so runc's root, podman's store,
named network namespaces and a receiver's state there are private: one host cannot see
another's files). Its ``eth0`` is a veth whose outer end is a port of the
:class:`Network`'s bridge, as a machine's NIC is a port of a rack switch. Inside, eth0 is
itself a port of the host's own bridge ``br0`` (:data:`HOST_BRIDGE`, the same name on
every host), which holds the host's address: a container's veth has its outer end on its
host's ``br0``, so containers are on the shared L2 network too. Clients run on this
machine outside every host, on the shared bridge's own address. Everything is torn down
by :meth:`Network.close` (also after a failure: use it as a context manager).

Needs root, ``unshare``, ``nsenter`` and iproute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ctlive.errors import ConfigError
from ctlive.testing.memory import HIDE_MEMORY

__all__ = ["FRESH_RUN_DIRS", "HOST_BRIDGE", "PODMAN_STORAGE_CONF", "Host", "Network"]

HOST_BRIDGE = "br0"
"""The bridge every host has for its containers (eth0 is one of its ports)."""

FRESH_RUN_DIRS = ("umount -l /var/tmp /run 2>/dev/null; mount -t tmpfs -o mode=1777 tmpfs "
                  "/var/tmp; mount -t tmpfs -o mode=0755 tmpfs /run; ")
"""A shell prefix for a workload with a mount namespace of its own inside a host: it
replaces the host's ``/var/tmp`` and ``/run`` (where ctlive keeps its dumps and journals)
with empty tmpfs mounts, since CRIU archives every tmpfs the workload's namespace holds
(``migrate()`` refuses a dump directory the workload sees on one)."""

_PRIVATE = ("/tmp", "/var/tmp", "/run")
PODMAN_STORAGE_CONF = "/run/ctlive-host/storage.conf"
"""Inside a host, its podman storage.conf (``CONTAINERS_STORAGE_CONF`` of every command run
through it, a receiver it starts too): graph and run roots on the host's own tmpfs, so one
host cannot see another's images, containers or volumes."""
_PODMAN_STORAGE = ('[storage]\ndriver = "overlay"\ngraphroot = "/var/tmp/containers/storage"\n'
                   'runroot = "/run/containers/storage"\n')
# Paths below the private directories that must stay visible (this checkout, the venv)
# are bind-mounted aside on a staging tmpfs first, then moved back over the new tmpfs.
_SETUP = ("set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /mnt; {keep}"
          "for d in /tmp /var/tmp /run; do mount -t tmpfs -o mode=0755,nodev,nosuid tmpfs $d;"
          " done; chmod 1777 /tmp /var/tmp; {restore}"
          "hostname {name}; ip link set lo up; touch /run/ready; exec sleep infinity")


def _shared_paths() -> list[str]:
    """What a host must still see of this machine's private directories: ctlive's own
    checkout and the Python environment (both often live under /tmp in CI)."""
    import ctlive

    want = {os.path.realpath(sys.prefix), os.path.realpath(pathlib.Path(ctlive.__file__)
                                                           .parents[1])}
    return sorted(p for p in want if any(p == d or p.startswith(d + "/") for d in _PRIVATE))


def _setup(name: str) -> str:
    keep = restore = ""
    for i, path in enumerate(_shared_paths()):
        q = shlex.quote(path)
        keep += f"mkdir -p /mnt/k{i}; mount --bind {q} /mnt/k{i}; "
        restore += f"mkdir -p {q}; mount --move /mnt/k{i} {q}; "
    # HIDE_MEMORY: the receivers' tmpfs of ctlive.testing.memory is not part of a host.
    return HIDE_MEMORY + _SETUP.format(keep=keep, restore=restore, name=shlex.quote(name))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Host:
    """One host: ``run()`` / ``popen()`` execute commands inside it."""

    def __init__(self, network: Network, index: int, name: str, *,
                 bridge: str = HOST_BRIDGE) -> None:
        self.network, self.index, self.name = network, index, name
        self.ip = f"{network.prefix}.{10 + index}"
        self.outer = f"{network.bridge}h{index}"
        self.bridge = bridge
        """This host's bridge for its containers (eth0 is a port of it)."""
        cmd = ["unshare", "--net", "--mount", "--pid", "--uts", "--fork", "--mount-proc",
               "sh", "-c", _setup(name)]
        self._holder = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        try:  # whatever fails, nothing of the host is left behind
            self.pid = self._pid_1()
            conf = self.path(PODMAN_STORAGE_CONF)
            conf.parent.mkdir(mode=0o755, exist_ok=True)
            conf.write_text(_PODMAN_STORAGE)
            _ip("link", "add", self.outer, "type", "veth", "peer", "name", "eth0", "netns",
                str(self.pid))
            _ip("link", "set", self.outer, "master", network.bridge, "up")
            # eth0 is a port of the host's br0, which holds the host's address.
            for argv in (["link", "add", bridge, "type", "bridge"],
                         ["link", "set", "eth0", "master", bridge, "up"],
                         ["addr", "add", f"{self.ip}/24", "dev", bridge],
                         ["link", "set", bridge, "up"],
                         ["route", "add", "default", "via", network.gateway]):
                self.run(["ip", *argv], check=True)
        except BaseException as exc:
            self.close()
            if isinstance(exc, subprocess.CalledProcessError | OSError):
                raise ConfigError(f"cannot set up host {name}: {exc}") from exc
            raise

    def _pid_1(self) -> int:
        """The host's init (the ``sleep`` that holds its namespaces), once it is ready."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._holder.poll() is not None:
                err = self._holder.stderr.read().decode() if self._holder.stderr else ""
                raise ConfigError(f"host {self.name} did not start: {err.strip()}")
            kids = pathlib.Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children")
            with contextlib.suppress(OSError):
                pids = kids.read_text().split()
                if pids and pathlib.Path(f"/proc/{pids[0]}/root/run/ready").exists():
                    return int(pids[0])
            time.sleep(0.02)
        raise ConfigError(f"host {self.name} did not start in time")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-p", "-u", "--", "env",
                f"CONTAINERS_STORAGE_CONF={PODMAN_STORAGE_CONF}", *argv]

    def run(self, argv: Sequence[str], *, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host and wait for it."""
        return subprocess.run(self.command(argv), capture_output=True, text=True, check=check,
                              **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the host (e.g. a receiver as a process of its own)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(argv), **kw)

    def path(self, inside: str) -> pathlib.Path:
        """Where a path inside the host is, seen from this machine (through its root)."""
        return pathlib.Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def container_netns(self, name: str, address: str, *, outer: str | None = None) -> str:
        """Make named network namespace ``name`` in this host (``/run/netns/NAME``, for a
        container to join by path) with an ``eth0`` at ``address`` (a /24 of the
        network) whose outer end (``outer``, default ``v`` + NAME) is a port of the host's
        bridge, and a default route through this machine; returns eth0's MAC."""
        veth = outer or f"v{name}"
        for argv in (["netns", "add", name],
                     ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
                     ["link", "set", veth, "master", self.bridge, "up"],
                     ["-n", name, "link", "set", "lo", "up"],
                     ["-n", name, "addr", "add", f"{address}/24", "dev", "eth0"],
                     ["-n", name, "link", "set", "eth0", "up"],
                     ["-n", name, "route", "add", "default", "via", self.network.gateway]):
            self.run(["ip", *argv], check=True)
        out = self.run(["ip", "-n", name, "-j", "link", "show", "eth0"], check=True).stdout
        return str(json.loads(out)[0]["address"])

    def close(self) -> None:
        """Kill everything in the host and remove its veth."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._holder.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.kill(self.pid, signal.SIGKILL)  # init of the PID namespace: all go with it
        self._holder.wait()
        _ip("link", "del", self.outer, check=False)


class Network:
    """A bridge that hosts plug into, with this machine on it at ``gateway``."""

    def __init__(self, index: int | None = None) -> None:
        n = index if index is not None else 100 + os.getpid() % 100
        self.bridge = f"ctbr{n}"
        self.prefix = f"10.89.{n}"
        self.gateway = f"{self.prefix}.1"
        self.hosts: list[Host] = []
        _ip("link", "del", self.bridge, check=False)  # a leftover of a crashed run
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except subprocess.CalledProcessError as exc:
            _ip("link", "del", self.bridge, check=False)
            raise ConfigError(f"cannot make bridge {self.bridge}: {exc.stderr}") from exc

    def host(self, name: str, *, bridge: str = HOST_BRIDGE) -> Host:
        """A new host on this network; ``bridge`` is its containers' bridge (another name
        than every other host's tests a receiver's bridge mapping)."""
        h = Host(self, len(self.hosts) + 1, name, bridge=bridge)
        self.hosts.append(h)
        return h

    def close(self) -> None:
        """Tear down every host and the bridge."""
        try:
            while self.hosts:
                self.hosts.pop().close()
        finally:
            _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
