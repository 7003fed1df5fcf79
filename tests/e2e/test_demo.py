"""`ctlive demo`, as the README's first command runs it: a real migration between two
hosts of `ctlive.testing.hosts`, driven by `ctlive serve` in one and `ctlive migrate` in
the other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from criu_harness import require_criu

pytestmark = pytest.mark.criu


def test_demo_moves_the_service_between_two_hosts() -> None:
    require_criu()
    out = subprocess.run([sys.executable, "-m", "ctlive", "demo", "--mib", "8", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr
    assert "two hosts on bridge" in log and "INSECURE" in log
    # Both commands ran in their own host, and their lines were shown whole.
    assert "[host-b serve] ctlive receiver listening on 0.0.0.0:7788" in log
    assert "[host-a migrate]" in log and "phase commit" in log
    assert "no reset and no lost reply" in log
    assert "in host-a gone" in log and "in host-b running" in log
    report = json.loads(out.stdout)
    assert report["iterations"][-1]["final"] and report["downtime"] > 0
    # The receiver was host-b, across the bridge.
    assert report["destination"].split(":")[0].endswith(".12"), report["destination"]
