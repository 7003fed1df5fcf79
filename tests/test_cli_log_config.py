"""`log_format` and `log_level` from a `[migrate]` table take effect as the flags do (the
file is merged before logging is set up)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))


def test_migrate_logs_as_its_config_file_says(tmp_path: pathlib.Path) -> None:
    assert subprocess.run([CTLIVE, "keygen", "-o", str(tmp_path / "src.key")],
                          capture_output=True).returncode == 0
    (tmp_path / "policy.toml").write_text("[snp]\nallow_any_measurement = true\n")
    (tmp_path / "m.toml").write_text(
        f'[migrate]\nkey = "{tmp_path / "src.key"}"\npolicy = "{tmp_path / "policy.toml"}"\n'
        f'state = "{tmp_path / "state"}"\nlog_format = "json"\nlog_level = "DEBUG"\n'
        "connect_timeout = 2.0\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # Nothing listens on port 1: the migration fails while connecting, after logging.
        out = subprocess.run([CTLIVE, "migrate", f"pid:{sleeper.pid}", "127.0.0.1:1",
                              "--config", str(tmp_path / "m.toml")],
                             capture_output=True, text=True, timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert out.returncode != 0
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert records, out.stderr
    assert any(r.get("phase") == "connect" or "connect" in str(r.get("message", ""))
               for r in records), records
