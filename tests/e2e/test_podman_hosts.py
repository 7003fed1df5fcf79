"""A podman container moves between two hosts of `ctlive.testing.hosts`, each with its own
podman store: its image exists only on the source host, it appends a line to a named
volume every 50 ms throughout, and it echoes the requests of a client on the shared bridge
outside every host over one TCP connection (the container joins a named network namespace,
`--network ns:/run/netns/NAME`, its veth's outer end a port of host A's br0). The source
runs inside host A, the receiver is a process of its own inside host B (both on asyncio
and on trio). Afterwards the client saw no reset and no lost reply, the volume has every
line once and grows at the destination, the image was loaded there by digest, the source
host runs nothing and keeps no namespace, and ctlive left no archive or image copy on
either host.

Run as a script, ``python test_podman_hosts.py source CONFIG_JSON`` is the source, and
``python test_podman_hosts.py measure`` prints, for the same container with and without
its volume (and with the image already at the destination), the bytes of files each
iteration carried (archive members, volume, image) and the downtime."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"
pytestmark = pytest.mark.criu
IMAGE = "localhost/ctlive-only-a:test"
PORT = 8080
# An echo server per connection (nc -ll: keep listening) and the volume's appender.
MAIN = (f"busybox nc -ll -p {PORT} -e busybox cat & "
        "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done")
# Files ctlive may have left: archives, saved images, rebuilt dumps (podman's own store aside).
LEFTOVERS = ("find /tmp /var/tmp /run -path /var/tmp/containers -prune -o -path "
             "/run/containers -prune -o -type f \\( -name '*.tar' -o -name '*.tar+*' "
             "-o -name '*.img' \\) -print")


class Echoes:
    """A client on the shared bridge: one request every 50 ms on one connection, each
    reply checked against its request; the first failure (reset, wrong or lost reply)
    stops it."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.settimeout(30)  # longer than any retransmission back-off of a move
        self.times: list[float] = []
        self.failure: str | None = None
        self.done = threading.Event()
        self.worker = threading.Thread(target=self._talk, daemon=True)
        self.worker.start()

    def _talk(self) -> None:
        replies = self.sock.makefile("rb")
        for n in range(1, 1 << 30):
            if self.done.is_set():
                return
            try:
                self.sock.sendall(b"%d\n" % n)
                got = replies.readline()
            except OSError as exc:
                self.failure = f"request {n}: {exc!r}"
                return
            if got != b"%d\n" % n:
                self.failure = f"request {n}: reply {got!r}"
                return
            self.times.append(time.monotonic())
            time.sleep(0.05)

    def longest_gap(self) -> float:
        return max(b - a for a, b in zip(self.times, self.times[1:], strict=False))

    def close(self) -> None:
        self.done.set()
        self.worker.join(timeout=35)
        self.sock.close()


def named_netns(host: Any, name: str, addr: str, gateway: str) -> None:
    """Named network namespace NAME in ``host``: a veth, outer end on the host's br0."""
    for argv in (["netns", "add", name],
                 ["link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns",
                  name],
                 ["link", "set", f"v{name}", "master", host.bridge, "up"],
                 ["-n", name, "link", "set", "lo", "up"],
                 ["-n", name, "addr", "add", f"{addr}/24", "dev", "eth0"],
                 ["-n", name, "link", "set", "eth0", "up"],
                 ["-n", name, "route", "add", "default", "via", gateway]):
        host.run(["ip", *argv], check=True)


@pytest.fixture
def shared(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A directory every host sees (outside their private /tmp, /var/tmp and /run)."""
    d = pathlib.Path("/var/lib") / f"ctlive-test-{tmp_path.name}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def podman(host: Any, *args: str, check: bool = True) -> str:
    out = host.run(["podman", *args])
    assert out.returncode == 0 or not check, (args, out.stderr[-1500:])
    return str(out.stdout).strip()


def busybox_image(shared: pathlib.Path) -> pathlib.Path:
    """A busybox rootfs tarball for `podman import` (no registry needed)."""
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("podman") is None:
        pytest.skip("podman or busybox-static missing: run scripts/install-criu")
    rootfs = shared / "rootfs"
    for d in ("bin", "tmp", "data"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for tool in ("sh", "sleep"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (rootfs / "gone").write_text("deleted in the container\n")
    tar = shared / "rootfs.tar"

    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    return tar


def lines(host: Any, path: str) -> list[int]:
    text = host.path(path).read_text()
    return [int(x) for x in text.splitlines()[:-1]]  # the last one may be half-written


def start_receiver(b: Any, shared: pathlib.Path, loop: str, pause_at: str | None = None) -> None:
    """fault_procs' receiver inside ``b`` (paused at stage ``pause_at`` until rx-go), its
    state on b's tmpfs /run."""
    from criu_harness import require_criu

    from ctlive.identity import Identity

    require_criu()
    dst, src = Identity(bytes(range(33, 65))), Identity(bytes(range(1, 33)))
    rx_cfg = {"ctl": str(shared / "ctl"), "platform": str(shared / "platform.pem"),
              "port": 7788, "listen": "0.0.0.0", "key": dst.private_key.hex(),
              "allow": src.public_key.hex(), "state": "/run/ctlive", "backend": loop,
              "pause_at": pause_at}
    b.popen([sys.executable, str(HELPERS / "fault_procs.py"), "receiver", json.dumps(rx_cfg)])
    deadline = time.monotonic() + 30
    while not (shared / "ctl" / "rx-addr.json").exists():
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.05)


class Setup:
    """Two hosts, the container running in A (image only there, volume, named netns),
    the receiver running in B, the client talking."""

    def __init__(self, net: Any, shared: pathlib.Path, loop: str, pause_at: str | None) -> None:
        self.shared, self.loop, self.name = shared, loop, f"pm-{loop}"
        self.a, self.b = net.host("host-a"), net.host("host-b")
        self.addr = f"{net.prefix}.60"
        named_netns(self.a, self.name, self.addr, net.gateway)
        podman(self.a, "import", "--quiet", str(busybox_image(shared)), IMAGE)
        self.image_id = podman(self.a, "image", "inspect", "--format", "{{.Id}}", IMAGE)
        # Each host has its own store: B has never seen the image.
        assert self.b.run(["podman", "image", "exists", self.image_id]).returncode != 0
        podman(self.a, "volume", "create", "data")
        # A file the container never touches, with an extended attribute that must travel.
        tag = self.a.path(podman(self.a, "volume", "inspect", "--format", "{{.Mountpoint}}",
                                 "data") + "/tag")
        tag.write_text("from host a\n")
        os.setxattr(tag, "user.origin", b"host-a")
        podman(self.a, "run", "-d", "--name", self.name, "--network",
               f"ns:/run/netns/{self.name}", "--ulimit", "nofile=1024:1024", "--ulimit",
               "nproc=4096:4096", "-v", "data:/data", IMAGE, "sh", "-c", MAIN)
        # The rootfs diff: a file made and one of the image's deleted in the container.
        podman(self.a, "exec", self.name, "sh", "-c", "echo made > /tmp/made; rm /gone")
        start_receiver(self.b, shared, loop, pause_at)
        time.sleep(0.3)
        self.client = Echoes((self.addr, PORT))
        time.sleep(0.5)

    def source(self, **extra: Any) -> Any:
        cfg = {"ctl": str(self.shared / "ctl"), "platform": str(self.shared / "platform.pem"),
               "name": self.name, "destination": [self.b.ip, 7788], "backend": self.loop,
               "state": "/var/tmp/ctlive-src", **extra}
        return self.a.popen([sys.executable, __file__, "source", json.dumps(cfg)],
                            stderr=subprocess.PIPE, text=True)

    def result(self, proc: Any) -> dict[str, Any]:
        _, err = proc.communicate(timeout=180)
        out: dict[str, Any] = json.loads((self.shared / "ctl" / "src-result.json").read_text())
        return out | {"stderr": err[-3000:]}

    def log(self, host: Any) -> list[int]:
        where = podman(host, "volume", "inspect", "--format", "{{.Mountpoint}}", "data")
        return lines(host, where + "/log")

    def leftovers(self) -> None:
        """No archive, saved image or dump left behind by ctlive on either host."""
        for host in (self.a, self.b):
            found = host.run(["sh", "-c", LEFTOVERS])
            assert (found.returncode, found.stdout) == (0, ""), (host.name, found)
        assert [p.name for p in self.b.path("/run/ctlive").iterdir() if p.is_dir()] == []
        assert not list(self.a.path("/var/tmp").glob("ctlive-src-*"))


def setup(shared: pathlib.Path) -> None:
    from criu_harness import require_criu

    from ctlive.attest import SimulatedSnpPlatform

    require_criu()
    (shared / "ctl").mkdir()
    SimulatedSnpPlatform(key_file=shared / "platform.pem")


def test_podman_container_with_a_volume_and_tcp_between_two_hosts(
        anyio_backend: str, shared: pathlib.Path) -> None:
    from ctlive.testing.hosts import Network

    loop = anyio_backend  # the loop both processes run under
    setup(shared)
    with Network(index=236 if loop == "asyncio" else 237) as net:
        s = Setup(net, shared, loop, None)
        a, b, name, client = s.a, s.b, s.name, s.client
        result = s.result(s.source())
        assert result["ok"], result
        time.sleep(1.0)
        # The connection is host B's now: its copy holds the socket.
        held = b.run(["ip", "netns", "exec", name, "ss", "-tnH", "state", "established"])
        assert f"{s.addr}]:{PORT} " in held.stdout, held  # busybox nc listens on IPv6 too
        client.close()
        assert client.failure is None, client.failure
        assert client.times[-1] > time.monotonic() - 1.5, "replies stopped"
        print(f"\npodman across hosts ({loop}): longest reply gap {client.longest_gap():.2f}"
              f" s, downtime {result['downtime']:.2f} s, {len(client.times)} replies")
        # The source host runs nothing any more and keeps no namespace. Podman restores
        # established connections only under their own name.
        assert podman(a, "ps", "--all", "--quiet") == ""
        assert not a.path(f"/run/netns/{name}").exists()
        assert podman(b, "ps", "--format", "{{.Names}}") == name
        assert podman(b, "inspect", "--format", "{{.State.Status}}", name) == "running"
        assert podman(b, "exec", name, "sh", "-c", "cat /tmp/made; test ! -e /gone") == "made"
        # Committed: the record of what a discard would remove is gone too.
        assert b.run(["find", "/var/tmp/containers", "-name", "ctlive-undo.json"]).stdout == ""
        # The image travelled once, in iteration 0 (later ones send far less than it).
        size = int(podman(a, "image", "inspect", "--format", "{{.Size}}", IMAGE))
        its = result["iterations"]
        assert its[0]["image_bytes"] > size and its[0]["wire_bytes"] > size // 4
        assert all(i["wire_bytes"] < size // 4 for i in its[1:]), its
        # It was loaded at B, by its digest, under its name.
        assert podman(b, "image", "inspect", "--format", "{{.Id}} {{.RepoTags}}",
                      IMAGE) == f"{s.image_id} [{IMAGE}]"
        # Every line once, in order, and the volume keeps growing at the destination.
        tag = b.path(podman(b, "volume", "inspect", "--format", "{{.Mountpoint}}", "data")
                     + "/tag")
        assert tag.read_text() == "from host a\n"
        assert os.getxattr(tag, "user.origin") == b"host-a"
        first = s.log(b)
        assert first == list(range(1, len(first) + 1)) and len(first) > 10
        time.sleep(0.6)
        later = s.log(b)
        assert later == list(range(1, len(later) + 1)) and len(later) > len(first) + 3
        s.leftovers()


def test_a_discarded_copy_leaves_nothing_in_the_destination_store(
        anyio_backend: str, shared: pathlib.Path) -> None:
    """The receiver holds its restored copy just before READY until the source has given
    up waiting and aborted: the copy is discarded (container, the volume and the image
    its restore added, the namespace), and the source runs on, client and all."""
    from ctlive.testing.hosts import Network

    loop = anyio_backend
    setup(shared)
    ctl = shared / "ctl"
    with Network(index=234 if loop == "asyncio" else 235) as net:
        s = Setup(net, shared, loop, "before-ready")
        proc = s.source(ready_timeout=3)
        deadline = time.monotonic() + 120
        while not (ctl / "rx-before-ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no restore"
            time.sleep(0.05)
        assert podman(s.b, "image", "exists", s.image_id, check=False) == ""  # loaded
        time.sleep(4)  # the source's READY timeout passes: it aborts
        (ctl / "rx-go").touch()
        result = s.result(proc)
        assert not result["ok"] and result["error"] == "MigrationError", result
        deadline = time.monotonic() + 30
        while podman(s.b, "ps", "--all", "--quiet") or podman(s.b, "volume", "ls", "--quiet"):
            assert time.monotonic() < deadline, "the copy was not discarded"
            time.sleep(0.2)
        assert s.b.run(["podman", "image", "exists", s.image_id]).returncode != 0
        assert podman(s.b, "images", "--all", "--quiet") == ""
        assert not s.b.path(f"/run/netns/{s.name}").exists()
        # The source copy runs again (restored from its final checkpoint), client and all.
        assert podman(s.a, "inspect", "--format", "{{.State.Status}}", s.name) == "running"
        first = s.log(s.a)
        time.sleep(0.6)
        later = s.log(s.a)
        assert later == list(range(1, len(later) + 1)) and len(later) > len(first) > 10
        s.client.close()
        assert s.client.failure is None, s.client.failure
        s.leftovers()


ADOPTED_DISCARD = """
import sys, anyio
from ctlive.backends import podman, podman_store
from ctlive.backends.criu import run_runtime
from ctlive.errors import Phase

async def main(name):
    where = await run_runtime(["inspect", "--format", "{{.StaticDir}} {{.State.Pid}}", name],
                              phase=Phase.RESTORE, tool="podman")
    static_dir, pid = where.split()
    undo = podman_store.Undo(name)
    undo.volumes, undo.image = ["data"], sys.argv[3]
    undo.save(static_dir)  # as restore_podman keeps it
    # What a restarted receiver has: the journal's pid and container name, nothing else.
    await podman._PodmanRestored(int(pid), container_id=name).discard()

anyio.run(main, sys.argv[2], backend=sys.argv[1])
"""


def test_a_restarted_receiver_discards_all_an_adopted_copy_added(
        anyio_backend: str, shared: pathlib.Path) -> None:
    """The undo record lives in the container's own directory of podman's store, so a
    discard by a receiver that adopted the copy after a restart also removes the volume
    and the image the restore added."""
    from ctlive.testing.hosts import Network

    with Network(index=233) as net:
        a = net.host("adopting")
        podman(a, "import", "--quiet", str(busybox_image(shared)), IMAGE)
        image_id = podman(a, "image", "inspect", "--format", "{{.Id}}", IMAGE)
        podman(a, "volume", "create", "data")
        podman(a, "run", "-d", "--name", "adopted", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "-v", "data:/data", IMAGE,
               "sleep", "1000")
        out = a.run([sys.executable, "-c", ADOPTED_DISCARD, anyio_backend, "adopted",
                     image_id])
        assert out.returncode == 0, out.stderr[-2000:]
        assert podman(a, "ps", "--all", "--quiet") == ""
        assert podman(a, "volume", "ls", "--quiet") == ""
        assert podman(a, "images", "--all", "--quiet") == ""


async def _source(cfg: dict[str, Any]) -> None:
    sys.path.insert(0, str(HELPERS))
    from fault_procs import verifier

    from ctlive import errors
    from ctlive.backends.podman import PodmanContainer
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    sizes: list[dict[str, int]] = []

    class Recorded(PodmanContainer):
        """Notes what each dump holds, by kind of file (for ``measure``)."""

        async def _dump(self, images_dir: pathlib.Path, **kw: Any) -> Any:
            res = await super()._dump(images_dir, **kw)
            kinds: dict[str, int] = {}
            for f in images_dir.iterdir():
                kind = ("image" if f.name.startswith("podman-image+") else
                        "volumes" if f.name.startswith("podman+volumes+") else
                        "archive" if f.name.startswith("podman+") else
                        "pages" if f.name.startswith("pages-") else "criu")
                kinds[kind] = kinds.get(kind, 0) + f.stat().st_size
            sizes.append(kinds)
            return res

    result: dict[str, Any]
    try:
        report = await migrate(
            Recorded(cfg["name"], tcp_established=cfg.get("tcp")),
            tuple(cfg["destination"]), identity=Identity(bytes(range(1, 33))),
            attestation=verifier(cfg["platform"]),
            convergence=Convergence(max_iterations=3, max_downtime=0.0),
            state_dir=cfg["state"], connect_timeout=5,
            ready_timeout=cfg.get("ready_timeout", 60), abort_timeout=30)
        result = {"ok": True, **report.to_dict(), "sizes": sizes}
    except errors.CtliveError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    (pathlib.Path(cfg["ctl"]) / "src-result.json").write_text(json.dumps(result, default=str))


def _measure() -> None:
    """One migration per case, same container (4 MiB of random data in its volume besides
    the log, or in its /tmp without one), no TCP; prints one line per iteration."""
    sys.path.insert(0, str(HELPERS))
    from ctlive.attest import SimulatedSnpPlatform
    from ctlive.testing.hosts import Network

    cases = (("volume, image carried", True, False), ("no volume, image carried", False, False),
             ("no volume, image at B", False, True))
    for n, (label, volume, image_at_b) in enumerate(cases):
        shared = pathlib.Path(f"/var/lib/ctlive-measure-{n}")
        shutil.rmtree(shared, ignore_errors=True)
        (shared / "ctl").mkdir(parents=True)
        try:
            tar = busybox_image(shared)
            SimulatedSnpPlatform(key_file=shared / "platform.pem")
            with Network(index=239) as net:
                a, b = net.host("m-a"), net.host("m-b")
                podman(a, "import", "--quiet", str(tar), IMAGE)
                if image_at_b:
                    podman(a, "save", "--quiet", "--output", str(shared / "i.tar"), IMAGE)
                    podman(b, "load", "--quiet", "--input", str(shared / "i.tar"))
                where = "/data" if volume else "/tmp"
                fill = f"head -c 4194304 /dev/urandom > {where}/blob; "
                podman(a, "run", "-d", "--name", "m", "--network", "none", "--ulimit",
                       "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                       *(["-v", "data:/data"] if volume else []), IMAGE, "sh", "-c",
                       fill + MAIN.split("& ", 1)[1].replace("/data", where))
                start_receiver(b, shared, "asyncio")
                time.sleep(0.5)
                cfg = {"ctl": str(shared / "ctl"), "platform": str(shared / "platform.pem"),
                       "name": "m", "destination": [b.ip, 7788], "backend": "asyncio",
                       "state": "/var/tmp/ctlive-src"}
                a.run([sys.executable, __file__, "source", json.dumps(cfg)], timeout=180)
                r = json.loads((shared / "ctl" / "src-result.json").read_text())
                assert r["ok"], r
                phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in r["downtime_phases"].items())
                print(f"{label}: downtime {r['downtime'] * 1000:.0f} ms ({phases})")
                for it, kinds in zip(r["iterations"], r["sizes"], strict=True):
                    files = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                    print(f"  iteration {it['index']} ({it['method']}): files {files}; "
                          f"read {it['image_bytes']}, wire {it['wire_bytes']}")
        finally:
            shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    import anyio

    if sys.argv[1] == "measure":
        _measure()
    else:
        conf = json.loads(sys.argv[2])
        anyio.run(_source, conf, backend=conf["backend"])
