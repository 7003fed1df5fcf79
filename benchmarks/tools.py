"""One migration of one workload by each tool the suite compares, measured the same way.

Every runner takes a started workload (``benchmarks.workloads``) and returns a
``Row``. Downtime is what the workload's own client saw: the longest gap between two
replies. CPU time is counted per side: for processes the benchmark runs, from
``wait4``/``getrusage`` (their waited-for children included); for podman, whose
CRIU runs under conmon, as the machine's busy time during each side's phase.
Images always live on a tmpfs mounted *after* the workload started, so CRIU never
archives them as part of the workload.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import anyio
import attrs
from cryptography import x509

from ctlive.attest import SnpPolicy, SnpVerifier
from ctlive.attest.certs import Product, TrustedRoot
from ctlive.backends.criu import find_criu
from ctlive.identity import Identity
from ctlive.migration.convergence import Convergence
from ctlive.migration.source import migrate
from ctlive.testing.workloads import SampleService

REPO = pathlib.Path(__file__).resolve().parent.parent


@attrs.define
class Row:
    """One tool's figures for one workload."""

    tool: str
    workload: str
    downtime: float = 0.0
    """Longest gap between two replies seen by the workload's client, seconds: its UDP
    echo prober (every 10 ms) where the workload has one, else its TCP client."""
    tcp_gap: float = 0.0
    """Longest gap between two replies on the TCP client's connection, seconds (includes
    TCP's retransmission backoff: packets sent while the workload is frozen are
    dropped and resent after 0.2, 0.6, 1.4, 3.0 s...)."""
    total: float = 0.0
    wire: int = 0
    """Bytes that crossed to the destination (0 for the local floor)."""
    cpu_src: float = 0.0
    cpu_dst: float = 0.0
    rss_dst: int = 0
    """Peak resident set of the destination's own process (receiver, CRIU), bytes."""
    image: int = 0
    """Size of the final checkpoint image, bytes."""
    reported_downtime: float | None = None
    """ctlive's own figure: final dump start until COMMIT_ACK, source clock."""
    rss_idle: int = 0
    """Resident set of the receiver before the migration, bytes."""
    iterations: list[dict[str, Any]] = attrs.field(factory=list)
    phases: dict[str, float] = attrs.field(factory=dict)
    """ctlive: where its own downtime went (source clock, with the destination's
    split), and where the client's longest gap lay relative to the final freeze."""
    errors: list[str] = attrs.field(factory=list)


# --- measuring helpers -------------------------------------------------------------------


def private_tmpfs(tag: str, size: str = "12g") -> pathlib.Path:
    """A fresh tmpfs, mounted after the workload started: the workload's own mount
    namespace does not see it, so CRIU does not archive it."""
    d = pathlib.Path(tempfile.mkdtemp(prefix=f"ctlive-{tag}-", dir="/run"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ctlive-bench", str(d)],
                   check=True)
    return d


def drop_tmpfs(d: pathlib.Path) -> None:
    subprocess.run(["umount", "-l", str(d)], check=False)
    shutil.rmtree(d, ignore_errors=True)


def du(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@attrs.frozen
class Ran:
    seconds: float
    cpu: float
    maxrss: int


def run_waited(argv: list[str], log_dir: pathlib.Path | None = None) -> Ran:
    """Run to completion; wall time, CPU and peak RSS of the process (and of the
    children it waited for), from ``wait4``."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        logs = ""
        if log_dir is not None:
            for f in log_dir.glob("*.log"):
                logs += f"\n--- {f.name}\n" + f.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{argv[0]} {argv[1]} failed ({p.returncode}): "
                           f"{err.decode(errors='replace')[-1500:]}{logs}")
    return Ran(seconds, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024)


def busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_self_children() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class HwmSampler:
    """Peak VmHWM of processes whose name is in ``names`` while it runs (for tools
    that start CRIU out of our reach, such as podman via conmon)."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.peak = names, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in pathlib.Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                with contextlib.suppress(OSError, ValueError):
                    if (d / "comm").read_text().strip() in self.names:
                        for line in (d / "status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def _finish(row: Row, svc: SampleService, more: int = 20) -> Row:
    svc.wait_replies(more)
    row.tcp_gap = svc.max_gap()
    row.downtime = svc.probe_gap() if svc.probes else row.tcp_gap
    row.errors += svc.errors
    if not svc.errors and len(svc.replies) < 2:
        row.errors.append("the client saw no replies")
    return row


# --- the tools ---------------------------------------------------------------------------


def _ext(svc: SampleService, outer: str) -> list[str]:
    return ["--tcp-established", "--external", f"veth[ceth0]:{outer}"]


def floor(svc: SampleService, label: str) -> Row:
    """The final dump and a restore, local on tmpfs, no network: the least downtime
    any CRIU-based migration can have on this machine."""
    criu = find_criu().path
    img = private_tmpfs("floor")
    try:
        d = run_waited([criu, "dump", "-t", str(svc.pid), "-D", str(img), "-o", "dump.log",
                        *_ext(svc, svc.outer)], img)
        image = du(img)
        r = run_waited([criu, "restore", "-D", str(img), "-d", "--root", "/", "-o",
                        "restore.log", *_ext(svc, svc.outer2)], img)
        for cmd in svc.plumb_commands() + svc.switch_commands():
            subprocess.run(cmd, check=True, capture_output=True)
        row = Row("floor", label, total=d.seconds + r.seconds, cpu_src=d.cpu, cpu_dst=r.cpu,
                  rss_dst=r.maxrss, image=image)
        return _finish(row, svc)
    finally:
        drop_tmpfs(img)


def page_server(svc: SampleService, label: str, port: int = 27700) -> Row:
    """CRIU's own network path: ``criu page-server`` on the destination side, ``criu
    dump --page-server`` from the source, the other images copied beside the pages,
    then restore. No encryption, no compression, no iterations."""
    criu = find_criu().path
    img, pages = private_tmpfs("ps-src"), private_tmpfs("ps-dst")
    try:
        srv = subprocess.Popen([criu, "page-server", "-D", str(pages), "--port", str(port),
                                "-o", "ps.log"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        t = time.perf_counter()
        d = run_waited([criu, "dump", "-t", str(svc.pid), "-D", str(img), "-o", "dump.log",
                        "--page-server", "--address", "127.0.0.1", "--port", str(port),
                        *_ext(svc, svc.outer)], img)
        _, _, ps_ru = os.wait4(srv.pid, 0)
        srv.returncode = 0
        wire = du(pages)
        for f in img.iterdir():  # the rest of the images travel beside the pages
            if f.is_file() and not f.name.endswith(".log"):
                wire += f.stat().st_size
                shutil.copy(f, pages / f.name)
        r = run_waited([criu, "restore", "-D", str(pages), "-d", "--root", "/", "-o",
                        "restore.log", *_ext(svc, svc.outer2)], pages)
        total = time.perf_counter() - t
        for cmd in svc.plumb_commands() + svc.switch_commands():
            subprocess.run(cmd, check=True, capture_output=True)
        row = Row("criu page-server", label, total=total, wire=wire, cpu_src=d.cpu,
                  cpu_dst=ps_ru.ru_utime + ps_ru.ru_stime + r.cpu,
                  rss_dst=max(ps_ru.ru_maxrss * 1024, r.maxrss), image=wire)
        return _finish(row, svc)
    finally:
        drop_tmpfs(img)
        drop_tmpfs(pages)


def podman(svc: Any, label: str) -> Row:
    """``podman container checkpoint --export`` (zstd), a copy to the destination's
    directory, removal of the original, ``podman container restore --import``: the
    stop-and-copy most users do today. ``svc`` runs in podman (``in_podman``)."""
    src, dst = private_tmpfs("pod-src"), private_tmpfs("pod-dst")
    try:
        archive = src / "checkpoint.tar.zst"
        b0, t0 = busy_seconds(), time.perf_counter()
        subprocess.run(["podman", "container", "checkpoint", "--tcp-established", "--export",
                        str(archive), "--compress", "zstd", svc.name], check=True,
                       capture_output=True)
        shutil.copy(archive, dst / archive.name)
        subprocess.run(["podman", "rm", "-f", "-t", "0", svc.name], check=True,
                       capture_output=True)
        b1 = busy_seconds()
        sampler = HwmSampler({"criu"})
        subprocess.run(["podman", "container", "restore", "--tcp-established", "--import",
                        str(dst / archive.name)], check=True, capture_output=True)
        rss = sampler.stop()
        t1, b2 = time.perf_counter(), busy_seconds()
        row = Row("podman export/import", label, total=t1 - t0, wire=archive.stat().st_size,
                  cpu_src=b1 - b0, cpu_dst=b2 - b1, rss_dst=rss)
        return _finish(row, svc)
    finally:
        drop_tmpfs(src)
        drop_tmpfs(dst)


async def ctlive_run(svc: SampleService, label: str, *, lanes: int = 1,
                     cipher: str = "AESGCM") -> Row:
    """A full ctlive migration into a receiver process of its own (simulated SNP
    platform), over loopback; the source's dumps on a private tmpfs."""
    src_id, dst_id = Identity.generate(), Identity.generate()
    state = private_tmpfs("recv")
    # Above 1 GiB the source's dumps go to disk: workload, two dumps, the receiver's
    # image and the restored copy would not all fit in this machine's memory.
    on_disk = svc.mib > 1024
    srcdir = (pathlib.Path(tempfile.mkdtemp(prefix="ctlive-src-", dir="/var/tmp")) if on_disk
              else private_tmpfs("src"))
    rx = subprocess.Popen([sys.executable, "-m", "benchmarks.receiver"], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert rx.stdin is not None and rx.stdout is not None
    try:
        opts = svc.receiver_options()
        rx.stdin.write(json.dumps({"state": str(state), "key": dst_id.private_key.hex(),
                                   "allow": src_id.public_key.hex(),
                                   "external_map": opts["external_map"],
                                   "plumb": svc.plumb_commands(),
                                   "switch": svc.switch_commands()}) + "\n")
        rx.stdin.flush()
        hello = json.loads(await anyio.to_thread.run_sync(rx.stdout.readline))
        root = TrustedRoot(Product.MILAN, x509.load_pem_x509_certificate(hello["ark"].encode()),
                           x509.load_pem_x509_certificate(hello["ask"].encode()), insecure=True)
        verifier = SnpVerifier(SnpPolicy(measurements=[bytes.fromhex(hello["measurement"])]),
                               trusted_roots=[root])
        c0 = cpu_self_children()
        t0 = time.monotonic()
        report = await migrate(svc.workload(), (hello["addr"][0], hello["addr"][1]),
                               identity=src_id, attestation=verifier,
                               convergence=Convergence(max_iterations=6), lanes=lanes,
                               cipher=cipher, workdir=srcdir)
        cpu_src = cpu_self_children() - c0
        rx.stdin.close()
        stats = json.loads(await anyio.to_thread.run_sync(rx.stdout.readline))
        row = Row(f"ctlive {lanes} lane{'s' if lanes > 1 else ''} {cipher}", label,
                  total=report.total_time, wire=report.bytes_on_wire, cpu_src=cpu_src,
                  cpu_dst=stats["cpu_self"] + stats["cpu_children"] - hello["cpu_idle"],
                  rss_dst=stats["vm_hwm"],
                  image=report.iterations[-1].image_bytes,
                  reported_downtime=report.downtime,
                  iterations=[{"index": i.index, "final": i.final, "wire": i.wire_bytes,
                               "image": i.image_bytes, "changed": i.pages_changed,
                               "pages": i.pages_total, "dump_s": i.dump_seconds,
                               "transfer_s": i.transfer_seconds,
                               "frozen_s": (i.frozen_time_us or 0) / 1e6,
                               "memdump_s": (i.memdump_time_us or 0) / 1e6,
                               "method": i.method}
                              for i in report.iterations])
        row.rss_idle = int(hello.get("rss_idle", 0))
        row.phases = dict(report.downtime_phases)
        timings = report.destination_summary.get("timings", {})
        row.phases.update({f"dst_{k}": float(v) for k, v in timings.items()})
        row = await anyio.to_thread.run_sync(_finish, row, svc)
        # Where the client's longest gap lay, relative to the final freeze.
        freeze = t0 + report.total_time - report.downtime
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(svc.probes or
                                                             [t for t, _ in svc.replies])]
        if gaps:
            _, a, b = max(gaps)
            row.phases.update(gap_from=a - freeze, gap_to=b - freeze)
        return row
    finally:
        if rx.poll() is None:
            rx.kill()
        rx.wait()
        drop_tmpfs(state)
        if on_disk:
            shutil.rmtree(srcdir, ignore_errors=True)
        else:
            drop_tmpfs(srcdir)
