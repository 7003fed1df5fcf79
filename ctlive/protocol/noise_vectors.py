"""Run Noise test vectors (the cacophony / snow JSON format) against ctlive.protocol.noise:
``python -m ctlive.protocol.noise_vectors VECTORS.json``."""

from __future__ import annotations

import json
import sys
from typing import Any

from ctlive.errors import HandshakeError
from ctlive.protocol.noise import HandshakeState, KeyPair, NoiseProtocol

__all__ = [
    "main",
    "run_vectors",
]


def run_vectors(vectors: list[dict[str, Any]]) -> tuple[int, int, int, list[str]]:
    """Run cacophony-format vectors. Returns (passed, failed, skipped, failure notes)."""
    passed = failed = skipped = 0
    notes: list[str] = []
    for v in vectors:
        name = str(v["protocol_name"])
        try:
            NoiseProtocol(name)
        except HandshakeError:
            skipped += 1
            continue
        try:
            _run_one(v)
            passed += 1
        except Exception as exc:  # a vector failing for any reason is a failure
            failed += 1
            notes.append(f"{name}: {type(exc).__name__}: {exc}")
    return passed, failed, skipped, notes


def _run_one(v: dict[str, Any]) -> None:
    def hx(key: str) -> bytes | None:
        val = v.get(key)
        return bytes.fromhex(str(val)) if val is not None else None

    def kp(key: str) -> KeyPair | None:
        raw = hx(key)
        return KeyPair(raw) if raw is not None else None

    def psks(key: str) -> list[bytes]:
        return [bytes.fromhex(x) for x in v.get(key) or []]

    name = str(v["protocol_name"])
    init = HandshakeState(name, True, prologue=hx("init_prologue") or b"", s=kp("init_static"),
                          e=kp("init_ephemeral"), rs=hx("init_remote_static"),
                          psks=psks("init_psks"))
    resp = HandshakeState(name, False, prologue=hx("resp_prologue") or b"",
                          s=kp("resp_static"), e=kp("resp_ephemeral"),
                          rs=hx("resp_remote_static"), psks=psks("resp_psks"))
    one_way = init.protocol.one_way
    for i, m in enumerate(v["messages"]):
        payload, expected = bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])
        from_init = one_way or i % 2 == 0
        sender, receiver = (init, resp) if from_init else (resp, init)
        if not sender.finished:
            ct = sender.write_message(payload)
            got = receiver.read_message(ct)
        else:
            assert sender.transport is not None and receiver.transport is not None
            ct = sender.transport[0].encrypt_with_ad(b"", payload)
            got = receiver.transport[1].decrypt_with_ad(b"", ct)
        if ct != expected:
            raise AssertionError(f"message {i}: ciphertext differs")
        if got != payload:
            raise AssertionError(f"message {i}: payload differs")
    want = hx("handshake_hash")
    if want is not None and init.handshake_hash != want:
        raise AssertionError("handshake hash differs")


def main(argv: list[str]) -> int:
    """Run the vectors file named in ``argv``; exit code 1 when any vector fails."""
    if len(argv) != 1:
        print("usage: python -m ctlive.protocol.noise_vectors VECTORS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    vectors = data["vectors"] if isinstance(data, dict) else data
    passed, failed, skipped, notes = run_vectors(vectors)
    for n in notes:
        print(n)
    print(f"{passed} passed, {failed} failed")
    print(f"{skipped} skipped (unsupported protocol names)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
