"""Files and steps of the command-line tests that run `ctlive serve` and `ctlive migrate`
as a user would: keys, the allow list, the source's policy, a receiver's config file, and
waiting for a receiver's banner."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from typing import Any

CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))


def keys_and_policy(d: pathlib.Path) -> None:
    """In ``d``: src.key and dst.key (`ctlive keygen`), allow.txt (the source's public key)
    and policy.toml (any measurement, the simulated chain in chain.pem next to it)."""
    for key in ("src.key", "dst.key"):
        made = subprocess.run([CTLIVE, "keygen", "-o", str(d / key)], capture_output=True,
                              text=True)
        assert made.returncode == 0, made.stderr[-2000:]
    (d / "allow.txt").write_text((d / "src.key.pub").read_text())
    (d / "policy.toml").write_text('[snp]\nallow_any_measurement = true\n'
                                   'simulated_chain = "chain.pem"\n')


def serve_config(d: pathlib.Path, listen: str, state: str | pathlib.Path) -> pathlib.Path:
    """``d``/serve.toml for `ctlive serve --config`, with the keys of `keys_and_policy`,
    the simulated provider (its chain written to ``d``/chain.pem)."""
    path = d / "serve.toml"
    path.write_text(
        f'[serve]\nlisten = "{listen}"\nkey = "{d / "dst.key"}"\n'
        f'allow = "{d / "allow.txt"}"\nstate = "{state}"\n'
        f'provider = "simulated"\nsimulated_chain = "{d / "chain.pem"}"\n')
    return path


def wait_listening(rx: subprocess.Popen[Any], timeout: float = 60) -> str:
    """The receiver's stderr up to its "listening on" line (it must not end before)."""
    assert rx.stderr is not None
    banner, deadline = "", time.monotonic() + timeout
    while "listening on" not in banner:
        assert time.monotonic() < deadline and rx.poll() is None, banner
        banner += rx.stderr.readline()
    return banner
