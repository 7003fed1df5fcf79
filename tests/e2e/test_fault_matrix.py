"""The fault matrix: for each phase of a migration and each fault, the workload survives.

Real CRIU, a real receiver process and a real source process (``fault_procs.py``), so a
fault can be a SIGKILL; a proxy between them cuts or partitions the network. Each
process stops at its phase (a file handshake), the test injects the fault from outside,
lets it go on, then runs ``ctlive recover`` where a source is gone or in doubt. It then
checks what a user relies on:

- exactly one copy of the workload runs (never none, never two);
- its state goes on from where it was (the counter never goes back);
- no image file is left behind (the source's work directory and the receiver's
  per-migration directories are gone; a restored copy that was discarded is gone too).

The migration runs in a child process, under asyncio or trio (alternating by cell).
A summary of the matrix is printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from criu_harness import Mutator, read_counter, require_criu, workload_pids
from faultproxy import FaultProxy

from ctlive.identity import Identity
from ctlive.migration.journal import Journal
from ctlive.testing.memory import memory_dir

pytestmark = [pytest.mark.criu, pytest.mark.slow]

HELPERS = pathlib.Path(__file__).resolve().parents[1] / "helpers"
SRC, DST = Identity(bytes(range(1, 33))), Identity(bytes(range(33, 65)))

# Where each party stops, by phase: (who, the point it stops at).
PHASES = {
    "handshake": ("src", "connect"),
    "pre-copy": ("src", "iterate"),
    "final dump": ("src", "send"),            # dumped and stopped, nothing final sent
    "before READY": ("rx", "before-ready"),   # restored, stopped, READY not sent
    "after READY": ("src", "commit"),         # READY received, nothing decided
    "after COMMIT": ("rx", "before-resume"),  # COMMIT received, not resumed, no ACK
}
FAULTS = ["cut", "partition", "receiver killed", "source killed", "cancelled"]
MATRIX: dict[tuple[str, str], str] = {}


def pytest_matrix_summary() -> str:
    """The table the e2e conftest prints at the end of the run."""
    if not MATRIX:
        return ""
    rows = ["| phase | " + " | ".join(FAULTS) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    for phase in PHASES:
        rows.append(f"| {phase} | " + " | ".join(MATRIX.get((phase, f), "-") for f in FAULTS)
                    + " |")
    return "\n".join(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: pathlib.Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({path.name})")
        time.sleep(0.02)


class Cell:
    """One run of the matrix: its processes, files and the checks."""

    def __init__(self, tmp: pathlib.Path, phase: str, fault: str, backend: str,
                 platform: pathlib.Path) -> None:
        self.tmp, self.phase, self.fault, self.backend = tmp, phase, fault, backend
        self.ctl = tmp / "ctl"
        self.ctl.mkdir()
        # The receiver's state on memory (it refuses a disk); ctlive.testing.memory's root.
        self.rx_state, self.src_state = memory_dir("fault-") / "rx-state", tmp / "src-state"
        self.platform = platform
        self.port = free_port()
        self.rx: subprocess.Popen[bytes] | None = None
        self.src: subprocess.Popen[bytes] | None = None
        self.mutator = Mutator(tmp, mib=8)

    def start_receiver(self, pause_at: str | None) -> None:
        (self.ctl / "rx-addr.json").unlink(missing_ok=True)
        cfg = {"ctl": str(self.ctl), "platform": str(self.platform), "port": self.port,
               "key": DST.private_key.hex(), "allow": SRC.public_key.hex(),
               "state": str(self.rx_state), "pause_at": pause_at, "backend": self.backend}
        self.rx = subprocess.Popen([sys.executable, str(HELPERS / "fault_procs.py"),
                                    "receiver", json.dumps(cfg)], start_new_session=True)
        wait_for(self.ctl / "rx-addr.json", 30, "the receiver")

    def start_source(self, destination: tuple[str, int], pause_at: str | None) -> None:
        cfg = {"ctl": str(self.ctl), "platform": str(self.platform), "pid": self.mutator.pid,
               "destination": list(destination), "key": SRC.private_key.hex(),
               "state": str(self.src_state), "pause_at": pause_at, "backend": self.backend}
        self.src = subprocess.Popen([sys.executable, str(HELPERS / "fault_procs.py"),
                                     "source", json.dumps(cfg)], start_new_session=True)

    @staticmethod
    def kill(p: subprocess.Popen[bytes] | None) -> None:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def recover(self) -> dict[str, Any]:
        """``ctlive recover`` as a user runs it; retried while in doubt (exit 4)."""
        policy = self.tmp / "policy.toml"
        chain = self.tmp / "chain.pem"
        chain.write_bytes(b"".join(self.platform.read_bytes().split(b"-----BEGIN PRIVATE")[0:1]))
        policy.write_text('[snp]\nallow_any_measurement = true\n'
                          f'simulated_chain = "{chain}"\n')
        key = self.tmp / "source.key"
        if not key.exists():
            SRC.save(key)
        ctlive = pathlib.Path(sys.executable).with_name("ctlive")
        for _ in range(5):
            out = subprocess.run([str(ctlive), "recover", "--state", str(self.src_state),
                                  "--key", str(key), "--policy", str(policy), "--json"],
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                return {"recovered": json.loads(out.stdout)}
            assert out.returncode == 4, out.stderr
            time.sleep(1)
        raise AssertionError(f"ctlive recover left the migration in doubt: {out.stdout}")

    def check(self) -> str:
        """The invariants; returns where the workload runs."""
        deadline = time.monotonic() + 10
        while True:
            running = workload_pids(self.mutator.script)
            stopped = workload_pids(self.mutator.script, ("T",))
            if len(running) == 1 and not stopped:
                break
            assert time.monotonic() < deadline, f"running {running}, stopped {stopped}"
            time.sleep(0.1)
        c = read_counter(self.mutator.counter)
        time.sleep(0.4)
        assert read_counter(self.mutator.counter) > c >= self.count_at_fault, \
            "the workload's state did not go on from where it was"
        journal = Journal(self.src_state, "source")
        try:
            entries = list(journal.entries())
            assert entries, "the source journalled no migration"  # else the loop checks nothing
            for e in entries:
                assert not pathlib.Path(e.data["workdir"]).exists(), "source images left"
                assert e.state in ("committed", "aborted"), e.state
        finally:
            journal.close()
        deadline = time.monotonic() + 10
        while self.rx_state.exists():  # a receiver's session may end just after the source
            left = [p.name for p in self.rx_state.iterdir() if p.is_dir()]
            if not left:
                break
            assert time.monotonic() < deadline, f"receiver images left: {left}"
            time.sleep(0.2)
        return "destination" if running[0] != self.mutator.pid else "source"

    def close(self) -> None:
        self.kill(self.src)
        self.kill(self.rx)
        self.mutator.kill()
        shutil.rmtree(self.rx_state.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def platform_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from ctlive.attest import SimulatedSnpPlatform

    path = tmp_path_factory.mktemp("platform") / "platform.pem"
    SimulatedSnpPlatform(key_file=path)  # the RSA keys take seconds: make them once
    return path


@contextlib.contextmanager
def proxy_to(port: int) -> Iterator[tuple[FaultProxy, tuple[str, int], Any]]:
    proxy = FaultProxy(("127.0.0.1", port))
    with start_blocking_portal() as portal:
        future, addr = portal.start_task(proxy.serve)
        try:
            yield proxy, addr, portal
        finally:
            portal.call(proxy.cut)
            future.cancel()


CELLS = [(p, f) for p in PHASES for f in FAULTS]


@pytest.mark.parametrize(("phase", "fault"), CELLS, ids=[f"{p}|{f}" for p, f in CELLS])
def test_fault_matrix(phase: str, fault: str, tmp_path: pathlib.Path,
                      platform_file: pathlib.Path) -> None:
    require_criu()
    backend = ("asyncio", "trio")[CELLS.index((phase, fault)) % 2]
    who, point = PHASES[phase]
    cell = Cell(tmp_path, phase, fault, backend, platform_file)
    try:
        cell.start_receiver(point if who == "rx" else None)
        with proxy_to(cell.port) as (proxy, addr, portal):
            if phase == "handshake" and fault in ("cut", "partition"):
                # The fault is there before the first byte: the connection breaks (or
                # hangs) inside the handshake.
                portal.call(proxy.partition, True)
                if fault == "cut":
                    cell.start_source(addr, None)
                    time.sleep(0.5)
                    portal.call(proxy.cut)
                    portal.call(proxy.partition, False)
                else:
                    cell.start_source(addr, None)
            else:
                cell.start_source(addr, point if who == "src" else None)
            marker = cell.ctl / (f"rx-{point}" if who == "rx" else f"src-{point}")
            if not (phase == "handshake" and fault in ("cut", "partition")):
                wait_for(marker, 60, f"{who} at {point}")
            cell.count_at_fault = read_counter(cell.mutator.counter)
            go = cell.ctl / ("rx-go" if who == "rx" else "src-go")
            if fault == "cut":
                portal.call(proxy.cut)
                go.touch()
            elif fault == "partition":
                portal.call(proxy.partition, True)
                go.touch()
            elif fault == "receiver killed":
                cell.kill(cell.rx)
                go.touch()
                cell.start_receiver(None)
            elif fault == "source killed":
                cell.kill(cell.src)
                (cell.ctl / "rx-go").touch()
            elif fault == "cancelled":
                (cell.ctl / "src-cancel").touch()
                time.sleep(0.3)
                go.touch()
            if fault == "partition":
                # Longer than every timeout of both sides, then the network comes back.
                deadline = time.monotonic() + 40
                while cell.src.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1)
                portal.call(proxy.partition, False)
            if cell.src is not None and fault != "source killed":
                cell.src.wait(timeout=90)
            result_file = cell.ctl / "src-result.json"
            result = json.loads(result_file.read_text()) if result_file.exists() else {}
            if fault == "source killed" or result.get("in_doubt"):
                cell.recover()
            where = cell.check()
        MATRIX[(phase, fault)] = f"ok ({where})"
    except BaseException:
        MATRIX[(phase, fault)] = "FAILED"
        raise
    finally:
        cell.close()
