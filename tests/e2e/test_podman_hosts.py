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

The two processes are tests/helpers/host_procs.py's. Run as a script,
``python test_podman_hosts.py measure`` prints, for the same container with and without
its volume (and with the image already at the destination), the bytes of files each
iteration carried (archive members, volume, image) and the downtime."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"
sys.path.insert(0, str(HELPERS))  # run as a script too (``measure``)
from echo_client import EchoClient  # noqa: E402
from host_procs import control, run_source, source_argv, source_result  # noqa: E402
from host_procs import start_receiver as start_host_receiver  # noqa: E402

pytestmark = pytest.mark.criu
IMAGE = "localhost/ctlive-only-a:test"
PORT = 8080
# The source's: the image may take a while to load at the destination.
TIMEOUTS = {"ready_timeout": 60, "abort_timeout": 30}
# An echo server per connection (nc -ll: keep listening) and the volume's appender.
MAIN = (f"busybox nc -ll -p {PORT} -e busybox cat & "
        "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done")
# Files ctlive may have left: archives, saved images, rebuilt dumps (podman's own store aside).
LEFTOVERS = ("find /tmp /var/tmp /run -path /var/tmp/containers -prune -o -path "
             "/run/containers -prune -o -type f \\( -name '*.tar' -o -name '*.tar+*' "
             "-o -name '*.img' \\) -print")


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
    """host_procs' receiver inside ``b`` (paused at stage ``pause_at`` until rx-go), its
    state on b's tmpfs /run."""
    from criu_harness import require_criu

    require_criu()
    start_host_receiver(b, shared, backend=loop, pause_at=pause_at)


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
        self.client = EchoClient((self.addr, PORT))
        time.sleep(0.5)

    def source(self, **timeouts: Any) -> Any:
        argv = source_argv(self.b, self.shared, kind="podman", name=self.name,
                           backend=self.loop, state="/var/tmp/ctlive-src",
                           timeouts=TIMEOUTS | timeouts)
        return self.a.popen(argv, stderr=subprocess.PIPE, text=True)

    def result(self, proc: Any) -> dict[str, Any]:
        _, err = proc.communicate(timeout=180)
        return source_result(self.shared) | {"stderr": err[-3000:]}

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

    require_criu()
    control(shared)


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
        assert client.error is None, client.error
        assert client.replies[-1] > time.monotonic() - 1.5, "replies stopped"
        print(f"\npodman across hosts ({loop}): longest reply gap {client.longest_gap():.2f}"
              f" s, downtime {result['downtime']:.2f} s, {len(client.replies)} replies")
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
        aborted = time.monotonic()
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
        # Client and all: replies come again after the abort (TCP's back-off decides when).
        deadline = time.monotonic() + 15
        while not (s.client.replies and s.client.replies[-1] > aborted):
            assert s.client.error is None and time.monotonic() < deadline, s.client.error
            time.sleep(0.1)
        s.client.close()
        assert s.client.error is None, s.client.error
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


def _measure() -> None:
    """One migration per case, same container (4 MiB of random data in its volume besides
    the log, or in its /tmp without one), no TCP; prints one line per iteration."""
    from ctlive.testing.hosts import Network

    cases = (("volume, image carried", True, False), ("no volume, image carried", False, False),
             ("no volume, image at B", False, True))
    for n, (label, volume, image_at_b) in enumerate(cases):
        shared = pathlib.Path(f"/var/lib/ctlive-measure-{n}")
        shutil.rmtree(shared, ignore_errors=True)
        try:
            control(shared)
            tar = busybox_image(shared)
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
                r = run_source(a, b, shared, kind="podman", name="m",
                               state="/var/tmp/ctlive-src", timeouts=TIMEOUTS)
                phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in r["downtime_phases"].items())
                print(f"{label}: downtime {r['downtime'] * 1000:.0f} ms ({phases})")
                for it, kinds in zip(r["iterations"], r["sizes"], strict=True):
                    files = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                    print(f"  iteration {it['index']} ({it['method']}): files {files}; "
                          f"read {it['image_bytes']}, wire {it['wire_bytes']}")
        finally:
            shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    _measure()
