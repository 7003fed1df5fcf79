"""`ctlive migrate podman:NAME HOST:PORT --key K --policy P` as a user runs it on two
machines: the receiver is `ctlive serve --config FILE.toml` inside host B (its state on
B's own tmpfs), the source the command line inside host A, where the container and its
image live. It exits 0 with the report on stdout, and the container runs in B, its named
volume carried with every line. Host B holds the image already (the preflight says so),
so it does not travel. The same commands also move a container on one machine."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import time

import pytest
from cli_setup import CTLIVE, keys_and_policy, serve_config, wait_listening

pytestmark = pytest.mark.criu
IMAGE = "localhost/ctlive-cli-only-a:test"
LOOP = "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done"


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_migrate_a_podman_container_between_two_hosts(shared: pathlib.Path) -> None:
    from criu_harness import require_criu

    from ctlive.testing.hosts import Network

    require_criu()
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("podman") is None:
        pytest.skip("podman or busybox-static missing: run scripts/install-criu")
    rootfs = shared / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for tool in ("sh", "sleep"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(shared / "rootfs.tar"), "."],
                   check=True)
    keys_and_policy(shared)
    config = serve_config(shared, "0.0.0.0:7791", "/run/ctlive-rx")
    with Network(index=238) as net:
        a, b = net.host("cli-a"), net.host("cli-b")
        ok(a.run(["podman", "import", "--quiet", str(shared / "rootfs.tar"), IMAGE]))
        ok(a.run(["podman", "volume", "create", "data"]))
        ok(a.run(["podman", "save", "--quiet", "--output", str(shared / "image.tar"), IMAGE]))
        ok(b.run(["podman", "load", "--quiet", "--input", str(shared / "image.tar")]))
        size = int(ok(b.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE])))
        ok(a.run(["podman", "run", "-d", "--name", "web", "--network", "none", "--ulimit",
                  "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "-v", "data:/data",
                  IMAGE, "sh", "-c", LOOP]))
        rx = b.popen([CTLIVE, "serve", "--config", str(config)], stderr=subprocess.PIPE,
                     text=True)
        wait_listening(rx)
        time.sleep(0.3)
        out = a.run([CTLIVE, "migrate", "podman:web", f"{b.ip}:7791", "--key",
                     str(shared / "src.key"), "--policy", str(shared / "policy.toml"),
                     "--state", "/run/ctlive-src", "--max-iterations", "3", "--json"],
                    timeout=180)
        report = json.loads(ok(out))
        assert report["workload"] == "podman" and len(report["iterations"]) == 3
        assert all(i["image_bytes"] < size // 2 for i in report["iterations"])
        restored = f"web-{report['migration_id'][:8]}"
        assert ok(a.run(["podman", "ps", "--all", "--quiet"])) == ""
        assert ok(b.run(["podman", "inspect", "--format", "{{.State.Status}}",
                         restored])) == "running"
        log = ok(b.run(["podman", "volume", "inspect", "--format", "{{.Mountpoint}}",
                        "data"])) + "/log"
        time.sleep(0.3)
        got = [int(x) for x in b.path(log).read_text().splitlines()[:-1]]
        assert got == list(range(1, len(got) + 1)) and len(got) > 10
        time.sleep(0.5)  # and it goes on at the destination
        later = [int(x) for x in b.path(log).read_text().splitlines()[:-1]]
        assert later == list(range(1, len(later) + 1)) and len(later) > len(got)
        rx.kill()
        rx.wait()


def test_migrate_a_podman_container_on_one_machine(tmp_path: pathlib.Path,
                                                   memory_path: pathlib.Path) -> None:
    """The same commands with source and receiver on this machine (one podman store), as
    tests/e2e/test_cli.py runs pid: and runc: targets; the receiver's state on memory. The
    container's named volume is the same one before and after (not unpacked over itself)."""
    from criu_harness import PodmanBox, require_criu

    require_criu()
    name = f"ctlive-clipm-{time.monotonic_ns() % 100000}"
    box = PodmanBox(tmp_path, f"{name}-unused")  # the image, and CRIU on PATH
    box.cleanup()
    vol = f"{name}-data"
    pm = ["podman"]
    keys_and_policy(tmp_path)
    config = serve_config(tmp_path, "127.0.0.1:0", memory_path / "rx")
    rx = subprocess.Popen([CTLIVE, "serve", "--config", str(config)], stderr=subprocess.PIPE,
                          text=True)
    try:
        ok(subprocess.run([*pm, "run", "-d", "--name", name, "--ulimit", "nofile=1024:1024",
                           "--ulimit", "nproc=4096:4096", "-v", f"{vol}:/data", box.IMAGE,
                           "sh", "-c", LOOP], capture_output=True, text=True, env=box.env))
        log = pathlib.Path(ok(subprocess.run([*pm, "volume", "inspect", "--format",
                                              "{{.Mountpoint}}", vol], capture_output=True,
                                             text=True))) / "log"
        banner = wait_listening(rx)
        addr = banner.rsplit("listening on ", 1)[1].split()[0]
        out = subprocess.run([CTLIVE, "migrate", f"podman:{name}", addr, "--key",
                              str(tmp_path / "src.key"), "--policy",
                              str(tmp_path / "policy.toml"), "--max-iterations", "3", "--json"],
                             capture_output=True, text=True, timeout=180)
        report = json.loads(ok(out))
        restored = f"{name}-{report['migration_id'][:8]}"
        assert box.pid_of(name) == 0 and box.pid_of(restored) > 0
        first = [int(x) for x in log.read_text().splitlines()[:-1]]
        time.sleep(0.5)
        later = [int(x) for x in log.read_text().splitlines()[:-1]]
        assert later == list(range(1, len(later) + 1)) and len(later) > len(first) > 10
    finally:
        rx.kill()
        rx.wait()
        box.name = name  # its cleanup removes every container whose name starts so
        box.cleanup()
        subprocess.run([*pm, "volume", "rm", "-f", vol], capture_output=True)
