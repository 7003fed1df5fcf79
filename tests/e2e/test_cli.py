"""The command line as a user drives it, each command a subprocess: `keygen`, `serve` with
the simulated platform, `migrate pid:` and `runc:` targets, `status`, and the exit codes
scripts rely on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from criu_harness import Mutator, read_counter, require_criu, workload_pids

CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))
pytestmark = pytest.mark.criu


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CTLIVE, *args], capture_output=True, text=True, timeout=timeout)


class Receiver:
    def __init__(self, tmp: pathlib.Path, state: pathlib.Path) -> None:
        self.tmp = tmp
        assert run("keygen", "-o", str(tmp / "dst.key")).returncode == 0
        assert run("keygen", "-o", str(tmp / "src.key")).returncode == 0
        (tmp / "allow.txt").write_text((tmp / "src.key.pub").read_text())
        self.state = state / "rx-state"  # memory: a receiver refuses a disk
        # The receiver's settings come from a TOML file, as an operator's would.
        (tmp / "serve.toml").write_text(
            '[serve]\nlisten = "127.0.0.1:0"\n'
            f'key = "{tmp / "dst.key"}"\nallow = "{tmp / "allow.txt"}"\n'
            f'state = "{self.state}"\nprovider = "simulated"\n'
            f'simulated_chain = "{tmp / "chain.pem"}"\n'
            # This host stands for the destination: its store is where tests make rootfs.
            f'restore_store = "{tmp}"\nmax_sessions = 8\n')
        assert run("config", "check", str(tmp / "serve.toml")).returncode == 0
        self.proc = subprocess.Popen([CTLIVE, "serve", "--config", str(tmp / "serve.toml")],
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        self.banner = ""
        while "listening on" not in self.banner:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.banner
            self.banner += self.proc.stderr.readline()
        self.addr = self.banner.rsplit("listening on ", 1)[1].split()[0]
        (tmp / "policy.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                         'simulated_chain = "chain.pem"\n')
        (tmp / "strict.toml").write_text('[snp]\nallow_any_measurement = true\n')

    def migrate(self, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return run("migrate", target, self.addr, "--key", str(self.tmp / "src.key"),
                   "--policy", str(self.tmp / "policy.toml"), "--state",
                   str(self.tmp / "src-state"), "--max-iterations", "3", *extra)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def receiver(tmp_path: pathlib.Path, memory_path: pathlib.Path) -> Iterator[Receiver]:
    require_criu()
    rx = Receiver(tmp_path, memory_path)
    yield rx
    rx.close()


def test_serve_says_it_is_insecure_and_keygen_keeps_keys(receiver: Receiver) -> None:
    assert "INSECURE" in receiver.banner and "SIMULATED" in receiver.banner
    again = run("keygen", "-o", str(receiver.tmp / "src.key"))
    assert again.returncode == 2 and "--force" in again.stderr
    assert run("--version").stdout.startswith("ctlive ")


def test_migrate_a_process_tree(receiver: Receiver, tmp_path: pathlib.Path) -> None:
    m = Mutator(tmp_path, mib=8)
    try:
        before = m.count()
        out = receiver.migrate(f"pid:{m.pid}", "--json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        new_pid = report["destination_summary"]["restored_pid"]
        assert workload_pids(m.script) == [new_pid] != [m.pid]
        at_handover = m.count()
        time.sleep(0.3)
        assert m.count() > at_handover >= before  # it counts on at the destination
        status = run("status", "--state", str(tmp_path / "src-state"), "--all", "--json")
        assert [e["state"] for e in json.loads(status.stdout)] == ["committed"]
    finally:
        m.kill()


def test_exit_codes(receiver: Receiver, tmp_path: pathlib.Path) -> None:
    m = Mutator(tmp_path, mib=8)
    try:
        # Attestation refused (a policy that does not trust the simulated chain): 3, and
        # the workload never left.
        refused = run("migrate", f"pid:{m.pid}", receiver.addr, "--key",
                      str(tmp_path / "src.key"), "--policy", str(tmp_path / "strict.toml"),
                      "--state", str(tmp_path / "src-state"))
        assert refused.returncode == 3, refused.stderr
        # Not a terminal: whole lines per phase, no progress bar.
        assert "connect iteration 0:" in refused.stderr
        assert "failed iteration 0:" in refused.stderr
        assert workload_pids(m.script) == [m.pid]
        # A bad target or a missing file: 2, nothing started.
        assert receiver.migrate("vm:1").returncode == 2
        assert receiver.migrate("pid:x").returncode == 2
        missing = run("migrate", f"pid:{m.pid}", receiver.addr, "--key",
                      str(tmp_path / "nope.key"), "--policy", str(tmp_path / "policy.toml"))
        assert missing.returncode == 2
        # The receiver is gone: the migration fails and the source runs on: 5.
        receiver.close()
        failed = receiver.migrate(f"pid:{m.pid}")
        assert failed.returncode == 5, failed.stderr
        assert workload_pids(m.script) == [m.pid]
    finally:
        m.kill()


def test_migrate_a_runc_container(receiver: Receiver, tmp_path: pathlib.Path) -> None:
    from criu_harness import RuncBundle

    name = f"ctlive-cli-{os.getpid()}-{time.monotonic_ns() % 100000}"
    box = RuncBundle(tmp_path, name)
    try:
        before = box.count()
        out = receiver.migrate(f"runc:{name}", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["workload"] == "runc"
        assert subprocess.run(["runc", "state", name], capture_output=True).returncode != 0
        # The restored container counts on in its own root filesystem (the receiver's
        # copy when the rootfs was carried).
        restored = json.loads(subprocess.run(
            ["runc", "--root", str(receiver.state / "runc"), "state", name],
            capture_output=True, text=True, check=True).stdout)
        rootfs = json.loads((pathlib.Path(restored["bundle"]) / "config.json").read_text())[
            "root"]["path"]
        counter = pathlib.Path(restored["bundle"], rootfs, "tmp", "c")
        at_handover = read_counter(counter)
        time.sleep(0.5)
        assert read_counter(counter) > at_handover >= before
        # What is left: at the receiver only the running container's own (its bundle,
        # runc's state, the journal); at the source no dump.
        deadline = time.monotonic() + 10
        while True:
            tops = {p.relative_to(receiver.state).parts[0] for p in receiver.state.rglob("*")
                    if p.is_file()}
            if tops <= {"journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm",
                        "simulated-platform.pem", "bundles", "runc"}:
                break
            assert time.monotonic() < deadline, tops
            time.sleep(0.1)
        assert {p.name for p in (receiver.state / "bundles").iterdir()} == {name}
        status = run("status", "--state", str(tmp_path / "src-state"), "--all", "--json")
        entries = json.loads(status.stdout)
        assert [e["state"] for e in entries] == ["committed"]
        for e in entries:
            assert not pathlib.Path(e["data"]["workdir"]).exists()
    finally:
        box.cleanup(str(receiver.state / "runc"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PausingReceiver:
    """A receiver process (tests/helpers/fault_procs.py) that stops at a receiver stage
    until told to go, so that a test can kill it there."""

    def __init__(self, tmp: pathlib.Path, state: pathlib.Path, port: int, src_pub: str,
                 pause_at: str | None) -> None:
        from ctlive.attest import SimulatedSnpPlatform

        self.ctl = tmp / f"ctl-{time.monotonic_ns()}"
        self.ctl.mkdir()
        platform = tmp / "fault-platform.pem"
        SimulatedSnpPlatform(key_file=platform).write_chain(tmp / "fault-chain.pem")
        cfg = {"ctl": str(self.ctl), "platform": str(platform), "port": port,
               "key": bytes(range(33, 65)).hex(), "allow": src_pub, "state": str(state),
               "pause_at": pause_at, "backend": "asyncio"}
        helper = pathlib.Path(__file__).parents[1] / "helpers" / "fault_procs.py"
        self.proc = subprocess.Popen([sys.executable, str(helper), "receiver", json.dumps(cfg)],
                                     start_new_session=True)
        self.wait_for("rx-addr.json", 30)

    def wait_for(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ctl / name).exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, name
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_exit_code_in_doubt_then_recover(tmp_path: pathlib.Path, memory_path: pathlib.Path
                                         ) -> None:
    """The receiver dies after COMMIT reached it, before it resumed its copy: the source's
    copy is already gone, so `ctlive migrate` cannot know the outcome: exit 4, which
    names `ctlive recover`; its --metrics endpoint showed the commit phase meanwhile.
    `ctlive recover`, once the receiver is back, finishes the migration (exit 0)."""
    require_criu()
    assert run("keygen", "-o", str(tmp_path / "src.key")).returncode == 0
    src_pub = (tmp_path / "src.key.pub").read_text().strip()
    port, state = free_port(), memory_path / "rx-state"
    rx = PausingReceiver(tmp_path, state, port, src_pub, "before-resume")
    (tmp_path / "policy.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                          'simulated_chain = "fault-chain.pem"\n')
    m = Mutator(tmp_path, mib=8)
    try:
        metrics = free_port()
        mig = subprocess.Popen(
            [CTLIVE, "migrate", f"pid:{m.pid}", f"127.0.0.1:{port}", "--key",
             str(tmp_path / "src.key"), "--policy", str(tmp_path / "policy.toml"), "--state",
             str(tmp_path / "src-state"), "--max-iterations", "2", "--commit-timeout", "4",
             "--metrics", f"127.0.0.1:{metrics}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rx.wait_for("rx-before-resume", 120)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            scraped = r.read().decode()
        assert 'ctlive_source_phase{phase="commit"} 1.0' in scraped
        sent = [ln for ln in scraped.splitlines() if ln.startswith("ctlive_source_sent_bytes ")]
        assert float(sent[0].split()[1]) > 1 << 20
        rx.kill()
        _, err = mig.communicate(timeout=120)
        assert mig.returncode == 4, err
        assert "ctlive recover" in err
        assert workload_pids(m.script) == []  # stopped at the destination, gone here
        rx = PausingReceiver(tmp_path, state, port, src_pub, None)  # back, adopts the copy
        rec = run("recover", "--key", str(tmp_path / "src.key"), "--policy",
                  str(tmp_path / "policy.toml"), "--state", str(tmp_path / "src-state"))
        assert rec.returncode == 0, rec.stderr
        pids = workload_pids(m.script)
        assert len(pids) == 1 and pids[0] != m.pid
        before = m.count()
        time.sleep(0.3)
        assert m.count() > before  # it runs at the destination
    finally:
        rx.kill()
        m.kill()
        for pid in workload_pids(m.script):
            os.kill(pid, 9)


def test_exit_code_other_error_and_refused_at_restore(receiver: Receiver,
                                                      tmp_path: pathlib.Path) -> None:
    """1: another ctlive error (here the source's journal directory cannot be made), and
    nothing moved. 5: the receiver refuses the container's spec at the restore, after the
    final dump stopped the container: the container runs again at the source."""
    from criu_harness import RuncBundle

    (tmp_path / "afile").write_text("")
    m = Mutator(tmp_path, mib=8)
    try:
        other = run("migrate", f"pid:{m.pid}", receiver.addr, "--key",
                    str(tmp_path / "src.key"), "--policy", str(tmp_path / "policy.toml"),
                    "--state", str(tmp_path / "afile" / "state"))
        assert other.returncode == 1, other.stderr
        assert "afile" in other.stderr
        assert workload_pids(m.script) == [m.pid]
    finally:
        m.kill()
    name = f"ctlive-cli-hook-{os.getpid()}-{time.monotonic_ns() % 100000}"
    box = RuncBundle(tmp_path, name)
    try:
        # The container asks for a hook (read at migrate time): this receiver allows none.
        cfg = json.loads((box.bundle / "config.json").read_text())
        cfg["hooks"] = {"prestart": [{"path": "/bin/true"}]}
        (box.bundle / "config.json").write_text(json.dumps(cfg))
        failed = receiver.migrate(f"runc:{name}")
        assert failed.returncode == 5, failed.stderr
        assert "restore-spec-refused" in failed.stderr and "hooks" in failed.stderr
        state = subprocess.run(["runc", "state", name], capture_output=True, text=True)
        assert json.loads(state.stdout)["status"] == "running"
        before = box.count()
        time.sleep(0.3)
        assert box.count() > before
        # Nothing of the refused copy is left at the receiver: no images, no bundle.
        deadline = time.monotonic() + 10
        while left := [p for p in receiver.state.rglob("*") if p.is_file() and not
                       p.name.startswith("journal.sqlite") and p.name != "simulated-platform.pem"]:
            assert time.monotonic() < deadline, left
            time.sleep(0.1)
    finally:
        box.cleanup(str(receiver.state / "runc"))
