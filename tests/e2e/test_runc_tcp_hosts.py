"""A runc container keeps its TCP connection when it moves between two hosts of
`ctlive.testing.hosts`.

The container joins a named network namespace of host A (`/run/netns/NAME`, its veth's
outer end a port of host A's `br0`); a client on the shared bridge outside every host
sends a request every 50 ms over one connection while the container moves to host B
(the source inside host A, the receiver a process of its own inside host B). The
container also appends a line to a file in its rootfs every 50 ms. Afterwards: no reset,
no lost reply, the connection is held by host B's copy (its socket, and the shared
bridge forwards the container's MAC to host B), host A runs no container and has no
namespace left, and the file has every line once and goes on growing. The two
processes are tests/helpers/host_procs.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from cli_setup import keys_and_policy, wait_listening
from echo_client import EchoClient
from host_procs import run_source, start_receiver

pytestmark = pytest.mark.criu
PORT = 9000
# Replies echo the request; the appender writes one numbered line per 50 ms.
SERVER = "#!/bin/sh\nwhile read l; do echo \"$l\"; done\n"
MAIN = ("i=0; (while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done) & "
        f"exec nc -l -p {PORT} -e /bin/srv")


def _make_rootfs(rootfs: pathlib.Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None
    for d in ("bin", "tmp", "proc", "dev", "sys", "data"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for tool in ("sh", "sleep", "nc", "cat"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (rootfs / "bin" / "srv").write_text(SERVER)
    (rootfs / "bin" / "srv").chmod(0o755)


def _make_bundle(bundle: pathlib.Path, inside: str, netns: str) -> None:
    """A bundle at ``bundle`` (seen from here) whose rootfs is ``inside``/rootfs in its
    host."""
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sh", "-c", MAIN]
    cfg["root"] = {"path": f"{inside}/rootfs", "readonly": False}
    for ns in cfg["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = f"/run/netns/{netns}"
    (bundle / "config.json").write_text(json.dumps(cfg))


def _lines(text: str) -> list[int]:
    return [int(x) for x in text.split()]


class Scene:
    """Two hosts; in host A a runc container (rootfs in host A's own /var/tmp, which host
    B cannot see) in named namespace ``cid`` with a client connected from outside."""

    def __init__(self, net: Any, shared: pathlib.Path, b_bridge: str) -> None:
        self.net, self.shared = net, shared
        self.a, self.b = net.host("host-a"), net.host("host-b", bridge=b_bridge)
        self.cid = f"tcp{os.getpid()}"
        self.inside = f"/var/tmp/{self.cid}"
        bundle = self.a.path(self.inside)
        _make_rootfs(bundle / "rootfs")
        _make_bundle(bundle, self.inside, self.cid)
        self.addr = f"{net.prefix}.100"
        self.mac = self.a.container_netns(self.cid, self.addr)
        # stdio on /dev/null: a host log file would be outside the container's mounts.
        assert self.a.popen(["runc", "run", "--detach", "--bundle", self.inside, self.cid],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
        self.client = EchoClient((self.addr, PORT))
        time.sleep(0.5)

    def check_moved(self, label: str, downtime: float) -> None:
        """What the user relies on after the migration."""
        a, b, cid, client = self.a, self.b, self.cid, self.client
        # The client's next retransmission reaches the new place (TCP's back-off decides
        # when: give it time on a loaded machine), and replies go on from there.
        done, deadline = time.monotonic(), time.monotonic() + 15
        while not (client.replies and client.replies[-1] > done + 0.5):
            assert client.error is None and time.monotonic() < deadline, client.error
            time.sleep(0.05)
        seen = len(client.replies)
        # Host A runs no container and keeps no namespace; host B's copy holds the
        # connection, and the shared bridge takes the container's MAC to host B.
        assert cid not in a.run(["runc", "list", "-q"]).stdout.split()
        assert not a.path(f"/run/netns/{cid}").exists()
        state = b.run(["runc", "--root", "/run/ctlive/runc", "state", cid])
        assert state.returncode == 0, state.stderr
        pid = json.loads(state.stdout)["pid"]
        held = b.run(["ip", "netns", "exec", cid, "ss", "-tnH", "state", "established"])
        port = client.sock.getsockname()[1]
        assert self.addr in held.stdout and f":{port}" in held.stdout, held
        (outer,) = json.loads(b.run(["ip", "-j", "link", "show", f"v{cid}"]).stdout)
        assert outer["master"] == b.bridge and outer["operstate"] == "UP"
        fdb = subprocess.run(["bridge", "fdb", "show", "br", self.net.bridge],
                             capture_output=True, text=True).stdout
        assert any(self.mac in ln and b.outer in ln for ln in fdb.splitlines()), fdb
        # The rootfs came along (host B never saw host A's); its file has every line
        # once, in order, and grows at the destination.
        assert not b.path(self.inside).exists()
        log = f"/proc/{pid}/root/data/log"
        lines = _lines(b.run(["cat", log]).stdout)
        assert lines == list(range(1, len(lines) + 1))
        time.sleep(0.3)
        assert len(_lines(b.run(["cat", log]).stdout)) > len(lines) > 20
        client.close()  # (the container's server, and so the container, ends with it)
        assert client.error is None, client.error
        print(f"\nrunc across hosts ({label}): longest reply gap {client.longest_gap():.2f} s,"
              f" downtime {downtime:.2f} s, {len(client.replies)} replies")
        assert len(client.replies) > seen + 5, "replies stopped"
        # No image left behind on either host.
        left = [p for h, d in ((a, "/var/tmp"), (a, "/run"), (b, "/run/ctlive"))
                for p in h.path(d).rglob("pages-*.img")]
        assert left == []


@contextlib.contextmanager
def scene(tag: str, index: int, b_bridge: str = "br0") -> Iterator[Scene]:
    from criu_harness import require_criu

    require_criu()
    if shutil.which("busybox") is None or shutil.which("runc") is None:
        pytest.skip("runc or busybox-static missing: run scripts/install-criu")
    from ctlive.testing.hosts import Network

    # Control files outside /tmp: the hosts' /tmp are private, the machine's root shared.
    shared = pathlib.Path("/var/lib") / f"ctlive-tcp-{os.getpid()}-{tag}"
    shared.mkdir(parents=True)
    sc = None
    try:
        with Network(index=index) as net:
            sc = Scene(net, shared, b_bridge)
            yield sc
    finally:
        if sc is not None:
            sc.client.close()
        shutil.rmtree(shared, ignore_errors=True)
        for cg in pathlib.Path("/sys/fs/cgroup").glob(f"**/tcp{os.getpid()}*"):
            with contextlib.suppress(OSError):
                cg.rmdir()


def test_runc_keeps_tcp_between_two_hosts(anyio_backend: str) -> None:
    loop = anyio_backend  # the loop both processes run under
    with scene(loop, 246 if loop == "asyncio" else 245) as sc:
        start_receiver(sc.b, sc.shared, backend=loop)
        result = run_source(sc.a, sc.b, sc.shared, kind="runc", id=sc.cid, max_downtime=0.3,
                            backend=loop)
        sc.check_moved(loop, result["downtime"])


def test_an_aborted_move_keeps_the_connection_at_the_source() -> None:
    """The receiver fails after the restore (before READY): the source resumes its copy,
    whose connection goes on (its veth up again, its namespace kept), and the copy at the
    destination goes with the namespace rebuilt for it."""
    with scene("abort", 243) as sc:
        ctl = sc.shared / "ctl"
        start_receiver(sc.b, sc.shared, fail_before_ready=True)
        result = run_source(sc.a, sc.b, sc.shared, ok=None, kind="runc", id=sc.cid,
                            max_downtime=0.3)
        assert not result["ok"] and "before READY" in result["message"], result
        assert (ctl / "rx-restored").exists()  # it failed after the namespace was rebuilt
        n = len(sc.client.replies)
        time.sleep(1.5)
        assert len(sc.client.replies) > n + 5 and sc.client.error is None, sc.client.error
        state = sc.a.run(["runc", "state", sc.cid])
        assert json.loads(state.stdout)["status"] == "running"
        assert sc.a.path(f"/run/netns/{sc.cid}").exists()
        assert not sc.b.path(f"/run/netns/{sc.cid}").exists()
        assert sc.b.run(["ip", "link", "show", f"v{sc.cid}"]).returncode != 0
        print(f"\nrunc abort: longest reply gap {sc.client.longest_gap():.2f} s")


def test_cli_migrates_a_runc_container_between_two_hosts() -> None:
    """`ctlive serve` inside host B and `ctlive migrate runc:ID` from host A, as a user
    would run them on two machines; host B's container bridge has another name, which
    the receiver maps (`--bridge-map br0=brguest`)."""
    ctlive = str(pathlib.Path(sys.executable).with_name("ctlive"))
    with scene("cli", 244, b_bridge="brguest") as sc:
        d = sc.shared
        keys_and_policy(d)
        rx = sc.b.popen([ctlive, "serve", "--listen", "0.0.0.0:7788", "--key",
                         str(d / "dst.key"), "--allow", str(d / "allow.txt"), "--state",
                         "/run/ctlive", "--provider", "simulated", "--simulated-chain",
                         str(d / "chain.pem"), "--bridge-map", "br0=brguest"],
                        stderr=subprocess.PIPE, text=True)
        assert "INSECURE" in wait_listening(rx)
        # The source's journal in host A's own /run.
        env = dict(os.environ, CTLIVE_STATE_DIR="/run/ctlive-src")
        out = sc.a.run([ctlive, "migrate", f"runc:{sc.cid}", f"{sc.b.ip}:7788", "--key",
                        str(d / "src.key"), "--policy", str(d / "policy.toml"), "--json"],
                       env=env, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout)
        assert report["workload"] == "runc" and report["downtime"] > 0
        sc.check_moved("cli", report["downtime"])


@pytest.mark.anyio
async def test_tcp_in_a_namespace_runc_made_is_refused_clearly(
        receiver_factory: Any, verifier: Any, tmp_path: pathlib.Path) -> None:
    """A container with an established connection in the network namespace runc made for
    it cannot keep it: the migration fails saying so (not only "criu failed"), and the
    container runs on at the source."""
    from criu_harness import require_criu

    from ctlive.backends import RuncContainer
    from ctlive.errors import MigrationError
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    from .conftest import SRC

    require_criu()
    if shutil.which("busybox") is None or shutil.which("runc") is None:
        pytest.skip("runc or busybox-static missing: run scripts/install-criu")
    bundle = tmp_path / "bundle"
    _make_rootfs(bundle / "rootfs")
    _make_bundle(bundle, str(bundle), "unused")
    cfg = json.loads((bundle / "config.json").read_text())
    for ns in cfg["linux"]["namespaces"]:
        ns.pop("path", None)  # runc makes the network namespace itself
    # A connection over the container's loopback, both ends inside it.
    cfg["process"]["args"] = ["sh", "-c", f"nc -l -p {PORT} -e /bin/srv & sleep 0.3; "
                              f"while true; do echo x; sleep 0.05; done | nc 127.0.0.1 {PORT}"]
    (bundle / "config.json").write_text(json.dumps(cfg))
    cid = f"tcplo{os.getpid()}"
    subprocess.run(["runc", "run", "--detach", "--bundle", str(bundle), cid], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    try:
        await anyio.sleep(0.8)
        rx = await receiver_factory()
        with pytest.raises(MigrationError) as info:
            await migrate(RuncContainer(cid), rx.addr, identity=SRC, attestation=verifier,
                          convergence=Convergence(max_iterations=2, max_downtime=0.0))
        assert "not a named one (/run/netns/NAME" in str(info.value), info.value
        print(f"\n{str(info.value).splitlines()[0]}")
        state = subprocess.run(["runc", "state", cid], capture_output=True, text=True)
        assert json.loads(state.stdout)["status"] == "running"
    finally:
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
