"""A host with a kernel of its own: a QEMU guest (TCG) on a :class:`~ctlive.testing.hosts.Network`.

:class:`VmHost` boots Debian 12's kernel (``scripts/install-guest`` unpacks it into
``/opt/ctlive/guest``) with virtme-ng, this machine's root shared read-only over 9p, and
its ``eth0`` a tap device that is a port of the network's bridge: the guest is one more
host on the bridge, at ``<prefix>.<index>``. ``/dev/kvm`` here cannot run stock kernels,
so QEMU emulates the CPU (slow: boot one guest per test session). Inside, a command agent
(``scripts/vm_agent.py``) runs what :meth:`VmHost.run` and :meth:`VmHost.spawn` ask,
through a directory shared over 9p (no listener on the network), and
:meth:`VmHost.serve` starts ``ctlive serve`` with its state on a tmpfs of its own.

Workloads that move from this machine into the guest must be portable
(:func:`portable_shell`, docs/backends.md "What makes a workload portable"): glibc told
not to use CPU features the guest lacks, only ``/``, ``/proc``, ``/sys`` and ``/dev`` in
their mount namespace (no cgroup v1 tree, no 9p share), and ``/dev`` declared external.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from ctlive.backends.process import Process
from ctlive.errors import ConfigError
from ctlive.testing.hosts import Network
from ctlive.testing.workloads import SampleService, script_pids

__all__ = [
    "DEV_EXTERNAL",
    "DEV_EXTERNAL_MAP",
    "GUEST_PREFIX",
    "PORTABLE_TUNABLES",
    "PortableService",
    "VmHost",
    "guest_kernel",
    "portable_shell",
    "start_portable",
]

GUEST_PREFIX = pathlib.Path(os.environ.get("CTLIVE_GUEST_PREFIX", "/opt/ctlive/guest"))
"""Where ``scripts/install-guest`` unpacks the guest kernel."""
PORTABLE_TUNABLES = ("glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,"
                     "-XSAVEC")
"""``GLIBC_TUNABLES`` that keep glibc off the AVX-512 and XSAVEC paths, which QEMU's CPU
(and AMD Milan, the common SEV-SNP part) lacks."""
DEV_EXTERNAL = "mnt[/dev]:dev"
"""The dump's external for ``/dev``: another kernel's devtmpfs cannot be restored."""
DEV_EXTERNAL_MAP = f"{DEV_EXTERNAL}=mnt[dev]:/dev"
"""``ctlive serve --external-map`` for it: bind the destination's own ``/dev``."""
_KEEP = ("/", "/proc", "/sys", "/dev")
_AGENT = pathlib.Path(__file__).with_name("scripts") / "vm_agent.py"


def guest_kernel() -> pathlib.Path:
    """The guest kernel image (``$CTLIVE_GUEST_KERNEL``, else the newest in
    :data:`GUEST_PREFIX`); ConfigError saying what to run when there is none."""
    env = os.environ.get("CTLIVE_GUEST_KERNEL")
    if env:
        return pathlib.Path(env)
    images = sorted((GUEST_PREFIX / "boot").glob("vmlinuz-*"))
    if not images:
        raise ConfigError(f"no guest kernel in {GUEST_PREFIX}/boot: run scripts/setup "
                          "(scripts/install-guest) as root")
    return images[-1]


def portable_shell(command: str, *, keep: Sequence[str] = _KEEP, tunables: bool = True) -> str:
    """A ``sh -c`` script, for inside a fresh mount namespace, that unmounts everything
    but ``keep`` (deepest first; cgroup v1 trees, 9p shares and tmpfs mounts would travel
    or fail at another kernel), then execs ``command`` as its own session leader, with
    :data:`PORTABLE_TUNABLES` unless ``tunables`` is false."""
    cases = "|".join(shlex.quote(k) for k in keep)
    env = f"export GLIBC_TUNABLES={shlex.quote(PORTABLE_TUNABLES)}; " if tunables else ""
    # Several passes: a mount hidden under a later one (virtme-ng's /usr/lib overlay under
    # its /usr overlay) can be unmounted only once the one above it is gone.
    return ("mount --make-rprivate /; for pass in 1 2 3 4; do "
            "awk '{print $5}' /proc/self/mountinfo | sort -r | while read -r m; do "
            f"case \"$m\" in {cases}) ;; *) umount -l \"$m\" 2>/dev/null ;; esac; done; "
            "done; "
            f"cd /; {env}exec setsid {command} </dev/null >/dev/null 2>&1")


class VmHost:
    """A QEMU guest on ``network``'s bridge, at ``<prefix>.<index>``; ``close()`` (or the
    context manager) powers it off and removes its tap device and shared directory."""

    def __init__(self, network: Network, *, index: int = 200, memory: str = "2G",
                 cpus: int = 1, boot_timeout: float = 600.0) -> None:
        self.network = network
        self.ip = f"{network.prefix}.{index}"
        self.tap = f"{network.bridge}v{index}"
        self.kernel = guest_kernel()
        self.release = self.kernel.name.removeprefix("vmlinuz-")
        bindir = pathlib.Path(sys.prefix) / "bin"
        vng = shutil.which("vng", path=f"{bindir}:{os.environ.get('PATH', '')}")
        if vng is None or shutil.which("qemu-system-x86_64") is None:
            raise ConfigError("virtme-ng (vng) or qemu-system-x86_64 is missing: run "
                              "scripts/setup as root")
        # Not under /tmp: the guest sees this machine's /tmp through an overlay, and the
        # share must be live both ways.
        self.dir = pathlib.Path(f"/var/lib/ctlive-vm-{os.getpid()}-{index}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700, parents=True)
        self._seq = itertools.count()
        self._last = ""
        self._proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["ip", "link", "del", self.tap], capture_output=True, check=False)
        try:
            for argv in (["ip", "tuntap", "add", self.tap, "mode", "tap"],
                         ["ip", "link", "set", self.tap, "master", network.bridge, "up"]):
                subprocess.run(argv, capture_output=True, text=True, check=True)
        except subprocess.CalledProcessError as exc:
            self.close()
            raise ConfigError(f"cannot make tap {self.tap}: {exc.stderr.strip()}") from exc
        init = self.dir / "init.sh"
        init.write_text(self._init_script(bindir))
        mac = f"52:54:00:89:{index % 256:02x}:02"
        argv = [vng, "--disable-kvm", "-r", str(self.kernel), "-m", memory, "-p", str(cpus),
                "--rwdir", str(self.dir),
                # One argument with '=': a value starting with '-' is not taken otherwise.
                f"--qemu-opts=-netdev tap,id=n0,ifname={self.tap},script=no,downscript=no "
                f"-device virtio-net-pci,netdev=n0,mac={mac}",
                "-e", f"sh {init}"]
        env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
        with open(self.dir / "vng.log", "wb") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, close_fds=True,
                                          start_new_session=True)
        t0 = time.monotonic()
        while not (self.dir / "ready").exists():
            if self._proc.poll() is not None or time.monotonic() - t0 > boot_timeout:
                tail = self._tail("vng.log") + self._tail("console.log")
                self.close()
                raise ConfigError(f"the guest did not boot: {tail}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - t0
        """Seconds from starting QEMU to the agent running."""

    def _init_script(self, bindir: pathlib.Path) -> str:
        gw, d = self.network.gateway, shlex.quote(str(self.dir))
        return (f"exec > {d}/console.log 2>&1\nset -x\n"
                "modprobe -a virtio_net veth bridge tun sch_tbf 2>/dev/null\n"
                "dev=$(ls /sys/class/net | grep -v '^lo$' | head -n1)\n"
                f"ip link set lo up\nip addr add {self.ip}/24 dev \"$dev\"\n"
                f"ip link set \"$dev\" up\nip route add default via {gw}\n"
                "sysctl -qw net.ipv4.ip_forward=1\n"
                "mkdir -p /run/ctlive-vm && mount -t tmpfs -o mode=0700 tmpfs /run/ctlive-vm\n"
                f"export PATH={shlex.quote(str(bindir))}:/usr/local/sbin:/usr/sbin:$PATH\n"
                f"exec {shlex.quote(sys.executable)} {shlex.quote(str(_AGENT))} {d}\n")

    def _tail(self, name: str, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / name).read_text(errors="replace")[-n:]
        return ""

    def _ask(self, req: dict[str, object], timeout: float) -> dict[str, object]:
        name = self._last = f"{next(self._seq):06d}.json"
        tmp = self.dir / "cmd" / f".{name}.tmp"
        tmp.write_text(json.dumps(req))
        os.replace(tmp, self.dir / "cmd" / name)
        out = self.dir / "out" / name
        deadline = time.monotonic() + timeout
        while not out.exists():
            if self._proc is None or self._proc.poll() is not None:
                raise ConfigError(f"the guest is gone: {self._tail('console.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest did not answer {req.get('argv')} in {timeout} s")
            time.sleep(0.05)
        data: dict[str, object] = json.loads(out.read_text())
        out.unlink()
        return data

    def run(self, argv: Sequence[str], *, timeout: float = 600.0, check: bool = False,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the guest and wait for it (its output: the last 64 KiB)."""
        r = self._ask({"argv": list(argv), "timeout": timeout, "env": dict(env or {})},
                      timeout + 30)
        done = subprocess.CompletedProcess(list(argv), int(str(r["rc"])), str(r["stdout"]),
                                           str(r["stderr"]))
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
              ) -> tuple[int, pathlib.Path]:
        """Start ``argv`` inside the guest in the background: its pid there, and the file
        (on this machine) that collects its output."""
        r = self._ask({"argv": list(argv), "background": True, "env": dict(env or {})}, 120)
        if "pid" not in r:
            raise ConfigError(f"the guest could not start {argv[0]}: {r.get('stderr')}")
        return int(str(r["pid"])), self.dir / "logs" / self._last.replace(".json", ".log")

    def serve(self, *, key: pathlib.Path, allow: pathlib.Path, chain: pathlib.Path,
              port: int = 7788, extra: Sequence[str] = (), timeout: float = 300.0
              ) -> tuple[int, pathlib.Path]:
        """Start ``ctlive serve`` in the guest (simulated SNP platform, INSECURE: tests
        only; state on the guest's own tmpfs; ``/dev`` mapped for portable workloads) and
        wait until it accepts connections. Files must be in :attr:`dir` (shared)."""
        ctlive = pathlib.Path(sys.prefix) / "bin" / "ctlive"
        pid, log = self.spawn([str(ctlive), "serve", "--listen", f"0.0.0.0:{port}", "--key",
                               str(key), "--allow", str(allow), "--state",
                               "/run/ctlive-vm/state", "--provider", "simulated",
                               "--simulated-chain", str(chain), "--external-map",
                               DEV_EXTERNAL_MAP, *extra])
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((self.ip, port), 2):
                return pid, log
            text = log.read_text(errors="replace") if log.exists() else ""
            if time.monotonic() > deadline or "Traceback (most recent call last)" in text:
                raise ConfigError(f"ctlive serve did not start in the guest: {text[-2000:]}")
            time.sleep(0.5)

    def close(self) -> None:
        """Power the guest off (kill QEMU if it lingers), remove the tap and the share."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                tmp = self.dir / "cmd" / ".off.tmp"
                tmp.write_text(json.dumps({"argv": ["poweroff"]}))
                os.replace(tmp, self.dir / "cmd" / "zzzzzz.json")
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        subprocess.run(["ip", "link", "del", self.tap], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> VmHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_portable(argv: Sequence[str], *, tunables: bool = True, net: bool = False) -> int:
    """Start ``argv`` on this machine as a workload that can move into the guest: its
    own PID and mount namespace (and network namespace with ``net``), through
    :func:`portable_shell`; returns its pid once it runs ``argv``."""
    ns = ["--net"] if net else []
    proc = subprocess.Popen(["unshare", "--pid", *ns, "--fork", "--mount-proc", "sh", "-c",
                             portable_shell(shlex.join(argv), tunables=tunables)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pids := script_pids(pathlib.Path(argv[1])):
            return pids[0]
        time.sleep(0.02)
    proc.kill()
    raise ConfigError(f"the portable workload did not start: {shlex.join(argv)[:200]}")


class PortableService(SampleService):
    """The sample TCP service (:class:`~ctlive.testing.workloads.SampleService`), made
    to move into ``vm``: started through :func:`portable_shell`, ``/dev`` external, and
    its client on this machine connecting from the bridge's address, which stays when
    the source's veth goes. Once the service runs in the guest, this machine reaches it
    through the guest (a route that takes over when the source's veth is gone), and the
    guest gives the restored veth end the service's gateway address
    (:meth:`plumb_guest`, started before the migration)."""

    udp_probe = False

    def __init__(self, workdir: pathlib.Path, net: int, vm: VmHost, mib: int = 8, *,
                 tunables: bool = True, dirty: float = 0.3, touch: int = 16) -> None:
        self.vm, self.tunables = vm, tunables
        self.net_prefix = f"10.77.{net}.0/24"
        super().__init__(workdir, net, mib, dirty=dirty, touch=touch)

    def launch(self, argv: list[str]) -> int:
        """Start the service portably, in its own network namespace too."""
        return start_portable(argv, tunables=self.tunables, net=True)

    def prepare(self) -> None:
        """Replies to the bridge's address go through the veth; the route via the guest
        waits behind the veth's own (metric 0) until that is gone."""
        for cmd in (f"nsenter -t {self.pid} -n ip route add default via {self.host_ip}",
                    f"ip route replace {self.net_prefix} via {self.vm.ip} metric 50"):
            done = subprocess.run(cmd.split(), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                self.cleanup()  # nothing else would stop the started service
                raise ConfigError(f"{cmd}: {done.stderr.strip()}")

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 60  # the service may still be starting
        while True:
            try:
                return socket.create_connection((self.ip, 7000), timeout=60,
                                                source_address=(self.vm.network.gateway, 0))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def workload(self) -> Process:
        """The source backend: TCP connections, the veth and ``/dev`` external."""
        return Process(self.pid, tcp_established=True,
                       external=(f"veth[ceth0]:{self.outer}", DEV_EXTERNAL))

    def plumb_guest(self) -> None:
        """In the guest, in the background: once the restore made the veth's outer end,
        give it the service's gateway address and bring it up."""
        o = self.outer
        # Polls sysfs: `ip link show` of a missing link makes the kernel run modprobe,
        # which under emulation would take the guest's one CPU.
        self.vm.spawn(["sh", "-c", f"until [ -e /sys/class/net/{o} ]; do sleep 0.2; done; "
                       f"ip addr add {self.host_ip}/24 dev {o}; ip link set {o} up"])

    def cleanup(self) -> None:
        """Also remove the route through the guest."""
        super().cleanup()
        subprocess.run(["ip", "route", "del", self.net_prefix, "via", self.vm.ip],
                       capture_output=True, check=False)
