"""The attested ctlive handshake, wired in memory with no sockets."""

from __future__ import annotations

import os

import pytest

from ctlive.errors import AttestationError, HandshakeError, PeerNotAllowedError
from ctlive.identity import Identity
from ctlive.protocol.handshake import InitiatorHandshake, ResponderHandshake
from ctlive.testing.doubles import FakeProvider, FakeVerifier

SRC, DST = Identity.generate(), Identity.generate()


def run(cipher: str = "AESGCM", allow: object = None, verifier: FakeVerifier | None = None,
        provider: FakeProvider | None = None) -> tuple[object, object]:
    init = InitiatorHandshake(SRC, verifier or FakeVerifier(), cipher=cipher,
                              hello={"role": "source"})
    resp = ResponderHandshake(DST, provider or FakeProvider(),
                              allow if allow is not None else {SRC.public_key},
                              cipher=cipher, hello={"role": "destination"})
    msg2 = resp.receive(init.start())
    msg3 = init.receive(msg2)
    assert msg3 is not None
    return init.result(), resp.receive_final(msg3)


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_roundtrip_and_transport(cipher: str) -> None:
    a, b = run(cipher)
    assert a.handshake_hash == b.handshake_hash  # type: ignore[attr-defined]
    assert a.remote_static == DST.public_key  # type: ignore[attr-defined]
    assert b.remote_static == SRC.public_key  # type: ignore[attr-defined]
    assert a.attestation.platform == "fake"  # type: ignore[attr-defined]
    assert a.peer_hello == {"role": "destination"}  # type: ignore[attr-defined]
    ct = a.send.encrypt_with_ad(b"", b"pages")  # type: ignore[attr-defined]
    assert b.recv.decrypt_with_ad(b"", ct) == b"pages"  # type: ignore[attr-defined]
    assert a.derive_key(b"lane 1") == b.derive_key(b"lane 1")  # type: ignore[attr-defined]
    assert a.derive_key(b"lane 1") != a.derive_key(b"lane 2")  # type: ignore[attr-defined]


def test_verifier_refusal_produces_no_third_message() -> None:
    init = InitiatorHandshake(SRC, FakeVerifier(accept=False))
    resp = ResponderHandshake(DST, FakeProvider(), {SRC.public_key})
    msg2 = resp.receive(init.start())
    with pytest.raises(AttestationError):
        init.receive(msg2)
    with pytest.raises(HandshakeError):
        init.result()


def test_unknown_source_key_refused() -> None:
    with pytest.raises(PeerNotAllowedError):
        run(allow={Identity.generate().public_key})
    with pytest.raises(PeerNotAllowedError):
        run(allow=lambda key: False)


def test_evidence_binds_each_handshake() -> None:
    # Evidence captured from one handshake is refused in another: the hash differs.
    provider = FakeProvider()
    run(provider=provider)
    old = provider.asked[-1]

    class Replayer(FakeProvider):
        def get_evidence(self, report_data: bytes) -> bytes:
            return b"EV" + old

    with pytest.raises(AttestationError, match="bind"):
        run(provider=Replayer())


def test_responder_static_key_is_bound() -> None:
    # The report_data the source checks includes the responder's static key.
    v = FakeVerifier()
    run(verifier=v)
    _, rd = v.seen[-1]
    from ctlive.protocol.handshake import binding_report_data
    assert len(rd) == 64
    assert rd != binding_report_data(b"\0" * 64, DST.public_key)


@pytest.mark.parametrize("where", [0, 40, 70, -1])
def test_tampered_messages_fail(where: int) -> None:
    init = InitiatorHandshake(SRC, FakeVerifier())
    resp = ResponderHandshake(DST, FakeProvider(), {SRC.public_key})
    msg2 = bytearray(resp.receive(init.start()))
    msg2[where] ^= 0x40
    with pytest.raises((HandshakeError, AttestationError)):
        init.receive(bytes(msg2))


def test_garbage_and_truncated_messages() -> None:
    # Random bytes as message 1: too short for a key, or a payload that is not a hello.
    for junk in (b"", b"\x01" * 10, os.urandom(31), os.urandom(200)):
        with pytest.raises(HandshakeError):
            ResponderHandshake(DST, FakeProvider(), {SRC.public_key}).receive(junk)
    # Random or truncated message 2: fails authentication or length checks.
    good = ResponderHandshake(DST, FakeProvider(), {SRC.public_key})
    init = InitiatorHandshake(SRC, FakeVerifier())
    msg2 = good.receive(init.start())
    for junk in (b"", os.urandom(40), os.urandom(500), msg2[:-1], msg2[:90]):
        fresh = InitiatorHandshake(SRC, FakeVerifier())
        fresh.start()
        with pytest.raises(HandshakeError):
            fresh.receive(junk)


def test_ik_reconnect_to_known_key() -> None:
    init = InitiatorHandshake(SRC, FakeVerifier(), pattern="IK", responder_static=DST.public_key)
    resp = ResponderHandshake(DST, FakeProvider(), {SRC.public_key}, pattern="IK")
    msg2 = resp.receive(init.start())
    assert init.receive(msg2) is None
    a, b = init.result(), resp.result()
    assert a.handshake_hash == b.handshake_hash
    assert a.attestation is not None  # fresh evidence on reconnect too
    wrong = InitiatorHandshake(SRC, FakeVerifier(), pattern="IK",
                               responder_static=Identity.generate().public_key)
    with pytest.raises(HandshakeError):
        ResponderHandshake(DST, FakeProvider(), {SRC.public_key}, pattern="IK").receive(
            wrong.start())
