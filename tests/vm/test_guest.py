"""Migrations that cross a kernel: into a QEMU guest (Debian's 6.1 kernel, TCG) that runs
``ctlive serve``, and, inside it, between two of its own namespace hosts with CRIU
``pre-dump`` on soft-dirty tracking, which this machine's kernel lacks. One guest serves
the whole session (tests/vm/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import sys
import time

import anyio
import pytest
from mitm import Mitm

from ctlive.backends.process import Process
from ctlive.backends.workload import DumpMethod
from ctlive.errors import Phase
from ctlive.migration.convergence import Convergence
from ctlive.migration.preflight import PreflightError
from ctlive.migration.source import migrate
from ctlive.testing.vm import DEV_EXTERNAL, PortableService, start_portable
from ctlive.testing.workloads import install_script, script_pids
from tests.vm.conftest import SRC, Guest

pytestmark = [pytest.mark.vm, pytest.mark.criu]
HERE = pathlib.Path(__file__).resolve().parent
PAGE = 4096


@pytest.mark.anyio
async def test_tcp_client_kept_moving_into_the_guest(guest: Guest, tmp_path: pathlib.Path,
                                                     anyio_backend: str) -> None:
    svc = PortableService(tmp_path, 61 if anyio_backend == "asyncio" else 62, guest.vm, mib=8)
    try:
        svc.plumb_guest()
        before = len(svc.replies)
        report = await migrate(svc.workload(), guest.address, identity=SRC,
                               attestation=guest.policy,
                               convergence=Convergence(max_iterations=3, max_downtime=0.0),
                               state_dir=tmp_path / "src-state", ready_timeout=600,
                               progress_timeout=300, connect_timeout=60)
        # Preflight passed across kernels: noted, not refused.
        assert report.preflight["kernel"] == guest.vm.release
        assert any("kernel" in n for n in report.preflight["notes"])
        assert len(report.iterations) == 3
        assert svc.pids() == []  # gone from this machine
        await anyio.to_thread.run_sync(svc.wait_replies, 10, 240.0)
        assert svc.errors == [], svc.errors
        assert len(svc.replies) >= before + 10
        # The replies that came after the move come from the copy in the guest.
        restored = report.destination_summary["restored_pid"]
        assert guest.vm.run(["kill", "-0", str(restored)]).returncode == 0
    finally:
        svc.cleanup()
        guest.vm.run(["pkill", "-KILL", "-f", str(svc.script)])


@pytest.mark.anyio
async def test_refused_before_any_image_byte_without_glibc_tunables(
        guest: Guest, tmp_path: pathlib.Path) -> None:
    script = install_script(tmp_path / "plain.py")
    pid = start_portable([sys.executable, str(script), "4", str(tmp_path / "counter")],
                         tunables=False)
    try:
        async with anyio.create_task_group() as tg:
            mitm = Mitm(guest.address)
            paddr = await tg.start(mitm.serve)
            with pytest.raises(PreflightError) as info:
                await migrate(Process(pid, external=(DEV_EXTERNAL,)), paddr, identity=SRC,
                              attestation=guest.policy, state_dir=tmp_path / "src-state",
                              connect_timeout=60)
            tg.cancel_scope.cancel()
        msg = str(info.value)
        assert info.value.phase == Phase.PREFLIGHT
        assert "CPU features missing at the destination" in msg
        assert "avx512f" in msg and "GLIBC_TUNABLES=glibc.cpu.hwcaps=" in msg
        # HELLO, PREFLIGHT, ABORT and the channel's CLOSE: no META, no CHANGE.
        assert mitm.records_seen <= 4 and mitm.bytes_after_msg1 < 32 << 10
        assert script_pids(script) == [pid]  # runs on, untouched
        # The same from the command line: `ctlive migrate --check` prints the differences
        # and exits 6.
        SRC.save(tmp_path / "src.key", force=True)
        (tmp_path / "policy.toml").write_text(
            f'[snp]\nallow_any_measurement = true\nsimulated_chain = "{guest.vm.dir}/chain.pem"\n')
        ctlive = pathlib.Path(sys.executable).parent / "ctlive"
        out = await anyio.run_process(
            [str(ctlive), "migrate", f"pid:{pid}", f"{guest.vm.ip}:7788", "--key",
             str(tmp_path / "src.key"), "--policy", str(tmp_path / "policy.toml"),
             "--external", DEV_EXTERNAL, "--state", str(tmp_path / "cli-state"), "--check"],
            check=False)
        text = out.stdout.decode()
        assert out.returncode == 6, (text, out.stderr.decode()[-2000:])
        assert text.startswith("not compatible") and "refused (cpu)" in text
        assert "avx512f" in text
        assert script_pids(script) == [pid]
    finally:
        for p in script_pids(script, ("S", "R", "D", "T")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


_HOT = """import os, sys, time
mib, hot = int(sys.argv[1]), int(sys.argv[2])
buf = bytearray(os.urandom(mib << 20))
while True:
    for i in range(hot):
        buf[i * 4096:(i + 1) * 4096] = os.urandom(4096)
    time.sleep(0.2)
"""


def test_predump_chain_sends_only_changed_pages_inside_the_guest(guest: Guest) -> None:
    """Runs wholly in the guest (tests/vm/guest_predump.py); this side checks the wire
    figures of its report. The workload keeps rewriting ``hot`` pages of random bytes in
    an image of random bytes, so every iteration after the first must send those pages
    (incompressible) and little else."""
    mib, hot = 16, 64
    script = guest.vm.dir / "hot.py"
    script.write_text(_HOT)
    out = guest.vm.dir / "predump.json"
    r = guest.vm.run([sys.executable, str(HERE / "guest_predump.py"), str(guest.vm.dir),
                      str(script), str(mib), str(hot), str(out)], timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    result = json.loads(out.read_text())
    its = result["report"]["iterations"]
    assert [i["method"] for i in its] == [DumpMethod.PRE_DUMP] * (len(its) - 1) + ["final"]
    assert len(its) == 4
    image = mib << 20
    for it in its[1:-1]:
        # Incremental pre-dumps: CRIU wrote the pages soft-dirty marked (the hot ones and
        # the interpreter's own), the rest are PE_PARENT runs.
        assert hot <= it["pages_written"] < it["pages_total"] // 4, it
    final = its[-1]
    dirtied = hot * PAGE  # since the last pre-dump (plus the interpreter's own pages)
    assert dirtied * 0.9 <= final["wire_bytes"] <= 3 * dirtied + (256 << 10), final
    assert final["wire_bytes"] < image // 20
    assert its[0]["wire_bytes"] > image * 0.9  # the first iteration sent it all
    assert result["restored_in_b"] and result["running"] != [result["source_pid"]]
    # The figures docs/backends.md quotes (pages and freeze per iteration).
    print("\npre-dump path inside the guest:", json.dumps(
        [{"method": i["method"], "pages_written": i["pages_written"],
          "frozen_ms": (i["frozen_time_us"] or 0) / 1000, "wire_bytes": i["wire_bytes"],
          "pages_changed": i["pages_changed"]} for i in its]), f"({time.strftime('%F')})")
