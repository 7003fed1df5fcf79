"""A podman container moves between two hosts of `ctlive.testing.hosts`, each with its own
podman store: its image exists only on the source host, and it appends a line to a named
volume every 50 ms throughout. The source runs inside host A, the receiver is a process of
its own inside host B (both on asyncio and on trio). Afterwards the volume has every line
once and grows at the destination, the image was loaded there once and by digest, the
source host runs nothing, and ctlive left no archive or image copy on either host.

Run as a script (``python test_podman_hosts.py source CONFIG_JSON``), it is the source."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"
pytestmark = pytest.mark.criu
IMAGE = "localhost/ctlive-only-a:test"
LOOP = "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done"
# Files ctlive may have left: archives, saved images, rebuilt dumps (podman's own store aside).
LEFTOVERS = ("find /tmp /var/tmp /run -path /var/tmp/containers -prune -o -path "
             "/run/containers -prune -o -type f \\( -name '*.tar' -o -name '*.img' \\) -print")


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop both sides run on (the receiver and the source are processes)."""
    return str(request.param)


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
    tar = shared / "rootfs.tar"
    import subprocess

    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    return tar


def lines(host: Any, path: str) -> list[int]:
    text = host.path(path).read_text()
    return [int(x) for x in text.splitlines()[:-1]]  # the last one may be half-written


def start_receiver(b: Any, shared: pathlib.Path, loop: str) -> None:
    from criu_harness import require_criu

    from ctlive.identity import Identity

    require_criu()
    dst, src = Identity(bytes(range(33, 65))), Identity(bytes(range(1, 33)))
    rx_cfg = {"ctl": str(shared / "ctl"), "platform": str(shared / "platform.pem"),
              "port": 7788, "listen": "0.0.0.0", "key": dst.private_key.hex(),
              "allow": src.public_key.hex(), "state": "/run/ctlive", "backend": loop}
    b.popen([sys.executable, str(HELPERS / "fault_procs.py"), "receiver", json.dumps(rx_cfg)])
    deadline = time.monotonic() + 30
    while not (shared / "ctl" / "rx-addr.json").exists():
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.05)


def test_podman_container_with_a_volume_between_two_hosts(loop: str,
                                                          shared: pathlib.Path) -> None:
    from criu_harness import require_criu

    from ctlive.attest import SimulatedSnpPlatform
    from ctlive.testing.hosts import Network

    require_criu()
    tar = busybox_image(shared)
    (shared / "ctl").mkdir()
    SimulatedSnpPlatform(key_file=shared / "platform.pem")
    name = f"pm-{loop}"
    with Network(index=236 if loop == "asyncio" else 237) as net:
        a, b = net.host("host-a"), net.host("host-b")
        podman(a, "import", "--quiet", str(tar), IMAGE)
        image_id = podman(a, "image", "inspect", "--format", "{{.Id}}", IMAGE)
        # Each host has its own store: B has never seen the image.
        assert b.run(["podman", "image", "exists", image_id]).returncode != 0
        podman(a, "volume", "create", "data")
        podman(a, "run", "-d", "--name", name, "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "-v", "data:/data", IMAGE,
               "sh", "-c", LOOP)
        start_receiver(b, shared, loop)
        time.sleep(0.5)
        src_cfg = {"ctl": str(shared / "ctl"), "platform": str(shared / "platform.pem"),
                   "name": name, "destination": [b.ip, 7788], "backend": loop,
                   "state": "/var/tmp/ctlive-src"}
        out = a.run([sys.executable, __file__, "source", json.dumps(src_cfg)], timeout=180)
        result = json.loads((shared / "ctl" / "src-result.json").read_text())
        assert result["ok"], (result, out.stderr[-3000:])
        restored = f"{name}-{result['migration_id'][:8]}"
        # The source host runs nothing any more; its container is gone.
        assert podman(a, "ps", "--all", "--quiet") == ""
        assert podman(b, "ps", "--format", "{{.Names}}") == restored
        assert podman(b, "inspect", "--format", "{{.State.Status}}", restored) == "running"
        # The image was loaded at B, by its digest, under its name.
        assert podman(b, "image", "inspect", "--format", "{{.Id}} {{.RepoTags}}",
                      IMAGE) == f"{image_id} [{IMAGE}]"
        # Every line once, in order, and the volume keeps growing at the destination.
        log = podman(b, "volume", "inspect", "--format", "{{.Mountpoint}}", "data") + "/log"
        first = lines(b, log)
        assert first == list(range(1, len(first) + 1)) and len(first) > 10
        time.sleep(0.6)
        later = lines(b, log)
        assert later == list(range(1, len(later) + 1)) and len(later) > len(first) + 3
        # No archive, saved image or dump left behind by ctlive on either host.
        for host in (a, b):
            assert host.run(["sh", "-c", LEFTOVERS]).stdout == "", host.name
        assert [p.name for p in b.path("/run/ctlive").iterdir() if p.is_dir()] == []
        assert not list(a.path("/var/tmp").glob("ctlive-src-*"))


async def _source(cfg: dict[str, Any]) -> None:
    sys.path.insert(0, str(HELPERS))
    from fault_procs import verifier

    from ctlive import errors
    from ctlive.backends.podman import PodmanContainer
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    result: dict[str, Any]
    try:
        report = await migrate(
            PodmanContainer(cfg["name"], tcp_established=cfg.get("tcp", False)),
            tuple(cfg["destination"]), identity=Identity(bytes(range(1, 33))),
            attestation=verifier(cfg["platform"]),
            convergence=Convergence(max_iterations=3, max_downtime=0.0),
            state_dir=cfg["state"], connect_timeout=5, ready_timeout=60)
        result = {"ok": True, **report.to_dict()}
    except errors.CtliveError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    (pathlib.Path(cfg["ctl"]) / "src-result.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    import anyio

    conf = json.loads(sys.argv[2])
    anyio.run(_source, conf, backend=conf["backend"])
