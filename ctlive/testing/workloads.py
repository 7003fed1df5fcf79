"""Sample workloads for real migrations on this machine (``ctlive demo``, the tests'
and the benchmarks' CRIU runs).

Both run ``scripts/sample_workload.py`` (package data; each workload its own copy,
``install_script``), which keeps mutating a buffer of mixed content:
``start_sample_workload`` writes a counter file, in its own PID and mount namespace;
``SampleService`` is a TCP counter service in its own PID, mount and network
namespace behind a veth, with a live TCP client (and UDP prober) on this host that
checks every reply. ``script_pids`` finds a workload's processes, restored copies
included.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import itertools
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import anyio

from ctlive.backends.process import Process
from ctlive.errors import ConfigError
from ctlive.testing.memory import HIDE_MEMORY

__all__ = [
    "SampleService",
    "install_script",
    "script_pids",
    "script_text",
    "start_sample_workload",
]

_SCRIPT = "sample_workload.py"
"""The sample workloads' program, in ``ctlive/testing/scripts/`` (package data)."""


def script_text() -> str:
    """The source of the sample workloads' program (``scripts/sample_workload.py``:
    ``MIB COUNTER|- [DIRTY [TOUCH]]``; a counter file, or with ``-`` the TCP service)."""
    return (importlib.resources.files("ctlive.testing") / "scripts" / _SCRIPT).read_text()


def install_script(path: pathlib.Path) -> pathlib.Path:
    """Copy the sample workloads' program to ``path`` and return ``path``. Each workload
    runs its own copy: its path (argv[1]) tells its processes apart (``script_pids``),
    and the copy is reachable where the installed package is not (a container that
    mounts only the work directory)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(script_text())
    os.replace(tmp, path)
    return path


def script_pids(script: pathlib.Path, states: tuple[str, ...] = ("S", "R", "D")) -> list[int]:
    """Python processes running ``script`` whose state is in ``states`` (default: running;
    add "T" for stopped ones, e.g. a copy restored stopped)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            status = (d / "status").read_text()
        except OSError:
            continue
        state = next((ln.split()[1] for ln in status.splitlines()
                      if ln.startswith("State:")), "?")
        if (len(argv) > 1 and b"python" in argv[0] and argv[1] == str(script).encode()
                and state in states):
            out.append(int(d.name))
    return out


class SampleService:
    """The demo's workload: a TCP counter service that also keeps mutating ``mib`` MiB
    (``dirty`` of its pages per second, ``touch`` bytes each), in its own PID, mount
    and network namespace, reached from this host over a veth pair (outer end
    ``vh<net>a``, inner ``ceth0``), plus a client on this host that keeps one
    connection open and checks every reply.

    Subclasses (the benchmarks' redis and podman variants) override ``command``,
    ``launch``, ``exchange`` and ``pids``."""

    request_interval = 0.02
    """Seconds between two requests of the client: the resolution of ``max_gap``."""
    udp_probe = True
    """Also probe the service's UDP echo port every 10 ms (``probe_gap``)."""

    def __init__(self, workdir: pathlib.Path, net: int, mib: int = 32, *,
                 dirty: float = 0.3, touch: int = 16) -> None:
        self.workdir, self.mib, self.dirty, self.touch = workdir, mib, dirty, touch
        self.outer, self.outer2 = f"vh{net}a", f"vh{net}b"
        self.host_ip, self.ip = f"10.77.{net}.1", f"10.77.{net}.2"
        self.script = install_script(workdir / f"service-{os.getpid()}-{net}.py")
        self._start()

    def _start(self) -> None:
        self.pid = self.launch(self.command())
        self.plumb_network()
        self.replies: list[tuple[float, int]] = []
        self.probes: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.prepare()
        threading.Thread(target=self._client, daemon=True).start()
        if self.udp_probe:
            threading.Thread(target=self._prober, daemon=True).start()
        deadline = time.monotonic() + 60
        while not self.replies and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.replies:
            self.cleanup()
            raise ConfigError(f"the sample service's client got no reply: {self.errors}")

    def plumb_network(self) -> None:
        """The namespace's network: a veth whose inner end lives with the workload."""
        for cmd in (f"ip link add {self.outer} type veth peer name ceth0 netns {self.net_pid}",
                    f"nsenter -t {self.net_pid} -n ip addr add {self.ip}/24 dev ceth0",
                    f"nsenter -t {self.net_pid} -n ip link set ceth0 up",
                    f"nsenter -t {self.net_pid} -n ip link set lo up",
                    f"ip addr add {self.host_ip}/24 dev {self.outer}",
                    f"ip link set {self.outer} up"):
            subprocess.run(cmd.split(), check=True, capture_output=True)

    @property
    def net_pid(self) -> int:
        """A process in the workload's network namespace."""
        return self.pid

    def command(self) -> list[str]:
        """The workload's command line."""
        return [sys.executable, str(self.script), str(self.mib), "-", str(self.dirty),
                str(self.touch)]

    def launch(self, argv: list[str]) -> int:
        """Start ``argv`` in its own PID, mount and net namespace; returns its pid."""
        cmd = shlex.join(argv)
        # No descriptors from the host's mount namespace; pid 1 of its namespace and
        # the leader of its own session (CRIU needs the session inside the namespace).
        shell = f"{HIDE_MEMORY}exec setsid {cmd} </dev/null >/dev/null 2>&1"
        proc = subprocess.Popen(["unshare", "--pid", "--net", "--fork", "--mount-proc", "sh",
                                 "-c", shell],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True,
                                start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                kids = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            except OSError:
                kids = ""
            if kids.split():
                pid = int(kids.split()[0])
                # Wait for the exec from sh into the workload.
                if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() != "sh":
                    return pid
            time.sleep(0.02)
        proc.kill()
        raise ConfigError(f"the sample service did not start: {argv[0]}")

    def prepare(self) -> None:
        """Runs once the network is up, before the client starts (e.g. fill a database)."""

    def _connect(self) -> Any:
        import socket

        deadline = time.monotonic() + 60  # the service may still be starting
        while True:
            try:
                return socket.create_connection((self.ip, 7000), timeout=60)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def exchange(self, f: Any, i: int) -> int:
        """One request and its reply on the client's connection; returns the reply's
        sequence value, raises ``ValueError`` on a wrong or missing reply."""
        f.write(b"x\n")
        line = f.readline()
        if not line:
            raise ValueError("connection closed by the peer")
        value = int(line)
        if self.replies and value != self.replies[-1][1] + 1:
            raise ValueError(f"reply {value} after {self.replies[-1][1]}: lost reply")
        return value

    def _client(self) -> None:
        try:
            c = self._connect()
            f = c.makefile("rwb", buffering=0)
            i = 0
            while not self._stop.is_set():
                value = self.exchange(f, i)
                self.replies.append((time.monotonic(), value))
                i += 1
                time.sleep(self.request_interval)
        except (OSError, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _prober(self) -> None:
        import socket

        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(0.01)
        seq = 0
        while not self._stop.is_set():
            t = time.monotonic()
            u.sendto(seq.to_bytes(8, "little"), (self.ip, 7001))
            seq += 1
            try:
                while True:  # drain: late replies to earlier probes count when they arrive
                    u.recv(64)
                    self.probes.append(time.monotonic())
            except (TimeoutError, OSError):
                pass
            time.sleep(max(0.0, 0.01 - (time.monotonic() - t)))

    def probe_gap(self) -> float:
        """Longest time between two UDP echo replies (10 ms probes); 0 without probes."""
        return max((b - a for a, b in itertools.pairwise(self.probes)), default=0.0)

    def pids(self) -> list[int]:
        """Every copy of the workload on this machine, stopped ones included."""
        return script_pids(self.script, ("S", "R", "D", "T"))

    def workload(self) -> Process:
        """The source backend for this service (its TCP connection moves with it)."""
        return Process(self.pid, tcp_established=True, external=(f"veth[ceth0]:{self.outer}",))

    def receiver_options(self) -> dict[str, Any]:
        """``serve()`` options for a destination on this same machine: the veth's outer
        end is named ``vh<net>b`` there and gets the host-side address before resume."""

        async def plumb(kind: str, spec: dict[str, Any], restored: Any) -> None:
            for cmd in self.plumb_commands():
                await anyio.run_process(cmd)

        async def switch(kind: str, spec: dict[str, Any], restored: Any) -> None:
            for cmd in self.switch_commands():
                await anyio.run_process(cmd)

        return {"external_map": {f"veth[ceth0]:{self.outer}": f"veth[ceth0]:{self.outer2}"},
                "post_restore": plumb, "post_resume": switch}

    def plumb_commands(self) -> list[list[str]]:
        """Host-side setup of the restored copy's veth end (``vh<net>b``), without a
        route: traffic stays with the source's copy until the switch."""
        return [f"ip addr add {self.host_ip}/24 dev {self.outer2} noprefixroute".split(),
                f"ip link set {self.outer2} up".split()]

    def switch_commands(self) -> list[list[str]]:
        """Send the service's traffic to the restored copy (after it resumed)."""
        net = self.host_ip.rsplit(".", 1)[0] + ".0/24"
        return [f"ip route replace {net} dev {self.outer2} src {self.host_ip}".split()]

    def max_gap(self) -> float:
        """Longest time between two replies the client saw."""
        times = [t for t, _ in self.replies]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def wait_replies(self, more: int, timeout: float = 60.0) -> None:
        """Block until the client has ``more`` further replies (or an error)."""
        start = len(self.replies)
        deadline = time.monotonic() + timeout
        while (len(self.replies) < start + more and not self.errors
               and time.monotonic() < deadline):
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the client, kill every copy, remove the veth ends."""
        self._stop.set()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for link in (self.outer, self.outer2):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def start_sample_workload(workdir: pathlib.Path, mib: int = 32, *, dirty: float = 1.0,
                          touch: int = 16) -> tuple[int, pathlib.Path]:
    """Start the sample workload (``dirty`` of its pages per second get ``touch`` new
    bytes each); returns (pid, counter file)."""
    script = install_script(workdir / "workload.py")
    counter = workdir / "counter"
    cmd = (f"{HIDE_MEMORY}exec {sys.executable} {script} {mib} {counter} {dirty} {touch} "
           "</dev/null >/dev/null 2>&1")
    # Own PID and mount namespace, session leader inside it (CRIU needs both), and no
    # descriptors inherited from the host's mount namespace.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", cmd],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = script_pids(script)
        if pids:
            while not counter.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return pids[0], counter
        time.sleep(0.05)
    proc.kill()
    raise ConfigError("the sample workload did not start")


