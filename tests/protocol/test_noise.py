"""Noise Protocol Framework: the published cacophony vectors, and primitives."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from ctlive.errors import HandshakeError, TamperedRecordError
from ctlive.protocol import noise, noise_vectors

VECTORS = pathlib.Path(__file__).parents[1] / "data" / "noise" / "cacophony-25519.json"


def test_every_cacophony_vector_passes() -> None:
    vectors = json.loads(VECTORS.read_text())["vectors"]
    passed, failed, skipped, notes = noise_vectors.run_vectors(vectors)
    assert notes == []
    # 59 patterns (fundamental, deferred, PSK) x 2 ciphers x 2 hashes.
    assert (passed, failed, skipped) == (236, 0, 0)


def test_cli_runner_reports_counts() -> None:
    out = subprocess.run([sys.executable, "-m", "ctlive.protocol.noise", str(VECTORS)],
                         capture_output=True, text=True, check=True).stdout
    assert "236 passed, 0 failed" in out


def test_cli_runner_counts_failures_and_skips(tmp_path: pathlib.Path) -> None:
    vectors = json.loads(VECTORS.read_text())["vectors"][:2]
    bad = dict(vectors[0])
    bad["handshake_hash"] = "00" * 64
    unsupported = dict(vectors[1], protocol_name="Noise_XXfallback_448_ChaChaPoly_BLAKE2b")
    f = tmp_path / "v.json"
    f.write_text(json.dumps({"vectors": [vectors[0], bad, unsupported]}))
    proc = subprocess.run([sys.executable, "-m", "ctlive.protocol.noise_vectors", str(f)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "1 passed, 1 failed" in proc.stdout
    assert "1 skipped" in proc.stdout


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_cipherstate_rekey_and_tamper(cipher: str) -> None:
    a, b = noise.CipherState(cipher, bytes(32)), noise.CipherState(cipher, bytes(32))
    ct = a.encrypt_with_ad(b"ad", b"hello")
    assert b.decrypt_with_ad(b"ad", ct) == b"hello"
    a.rekey()
    b.rekey()
    ct = a.encrypt_with_ad(b"", b"after rekey")
    assert b.decrypt_with_ad(b"", ct) == b"after rekey"
    ct = bytearray(a.encrypt_with_ad(b"", b"x"))
    ct[0] ^= 1
    with pytest.raises(TamperedRecordError):
        b.decrypt_with_ad(b"", bytes(ct))


def test_low_order_public_key_is_refused() -> None:
    hs_r = noise.HandshakeState("Noise_NN_25519_AESGCM_BLAKE2b", False)
    with pytest.raises(HandshakeError):
        hs_r.read_message(bytes(32))  # the all-zero point
        hs_r.write_message(b"")
