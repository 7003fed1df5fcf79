"""The sample TCP service on a host of :mod:`ctlive.testing.hosts` (``ctlive demo``).

:class:`HostService` runs ``scripts/sample_workload.py`` inside a :class:`Host`, in a
PID, mount and network namespace of its own. Its ``ceth0`` has an address on the
hosts' shared network; the veth's outer end (``vdemo``) is a port of the host's own
bridge (``br0``), as a container's is. Its client runs on this machine, outside every
host, and reaches the service across the shared bridge, so after a migration it finds
the service at its new host by the same address.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import signal
import subprocess
import time
from typing import Any

from ctlive.errors import ConfigError
from ctlive.testing.hosts import FRESH_RUN_DIRS, Host
from ctlive.testing.memory import HIDE_MEMORY
from ctlive.testing.workloads import SampleService, script_pids, script_text

__all__ = ["HostService"]

OUTER = "vdemo"
"""The outer end's name, at the source and (through the receiver's external map) at
the destination."""


def _ns_pid(pid: int) -> int:
    """``pid`` (this machine's) as the host one level down sees it."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return int(ids[1]) if len(ids) > 1 else int(ids[0])
    raise ConfigError(f"no NSpid for {pid}")


class HostService(SampleService):
    """The sample service inside ``host``, at address ``ip`` of the hosts' network.

    ``pid`` is this machine's pid of the workload; ``host_pid`` the one a command run
    inside the host (``ctlive migrate pid:N``) must name."""

    def __init__(self, host: Host, ip: str, mib: int = 32, *, dirty: float = 0.3,
                 touch: int = 16) -> None:
        self.host = host
        self.workdir, self.mib, self.dirty, self.touch = pathlib.Path("/tmp"), mib, dirty, touch
        self.outer = self.outer2 = OUTER
        self.host_ip, self.ip = host.network.gateway, ip
        # In the host's own /tmp: the script is a file of the source host only.
        self.script = pathlib.Path(f"/tmp/ctlive-service-{os.getpid()}.py")
        host.path(str(self.script)).write_text(script_text())
        self._start()

    def launch(self, argv: list[str]) -> int:
        """Start ``argv`` inside the host in its own PID, mount and net namespace."""
        # CRIU archives every tmpfs in the workload's mount namespace, overmounted ones too:
        # the host's /var/tmp and /run (ctlive's own dumps and journal) are replaced.
        shell = (f"{HIDE_MEMORY}{FRESH_RUN_DIRS}exec setsid {shlex.join(argv)} </dev/null"
                 " >/dev/null 2>&1")
        self._launcher = self.host.popen(
            ["unshare", "--pid", "--net", "--fork", "--mount-proc", "sh", "-c", shell],
            stdout=os.open(os.devnull, os.O_WRONLY), stderr=os.open(os.devnull, os.O_WRONLY),
            close_fds=True, start_new_session=True, cwd="/")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = script_pids(self.script)
            if pids:
                self.host_pid = _ns_pid(pids[0])
                return pids[0]
            time.sleep(0.05)
        self._launcher.kill()
        raise ConfigError(f"the sample service did not start in host {self.host.name}")

    def plumb_network(self) -> None:
        """``ceth0`` in the workload's namespace, its peer ``vdemo`` on the host's br0."""
        h, pid = self.host, self.pid
        h.run(["ip", "link", "add", OUTER, "type", "veth", "peer", "name", "ceth0", "netns",
               str(self.host_pid)], check=True)
        h.run(["ip", "link", "set", OUTER, "master", h.bridge, "up"], check=True)
        inside = ["nsenter", "-t", str(pid), "-n", "ip"]
        for args in (["addr", "add", f"{self.ip}/24", "dev", "ceth0"],
                     ["link", "set", "ceth0", "up"], ["link", "set", "lo", "up"]):
            out = self._run([*inside, *args])
            if out:
                raise ConfigError(f"cannot set up the service's network: {out}")

    @staticmethod
    def _run(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        return r.stderr.strip() if r.returncode else ""

    def migrate_args(self) -> list[str]:
        """``ctlive migrate`` arguments for this service, run inside its host."""
        return [f"pid:{self.host_pid}", "--tcp-established", "--external",
                f"veth[ceth0]:{OUTER}"]

    @staticmethod
    def serve_args(bridge: str = "br0") -> list[str]:
        """``ctlive serve`` arguments a destination host needs for it: the veth's outer
        end comes back under the same name, as a port of that host's ``bridge``."""
        return ["--external-map", f"veth[ceth0]:{OUTER}=veth[ceth0]:{OUTER}@{bridge}"]

    def receiver_options(self) -> dict[str, Any]:
        """``serve()`` options for a receiver inside a destination host."""
        return {"external_map": {f"veth[ceth0]:{OUTER}": f"veth[ceth0]:{OUTER}@br0"}}

    def cleanup(self) -> None:
        """Stop the client and kill every copy of the service (the hosts go later)."""
        self._stop.set()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

