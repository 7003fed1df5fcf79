"""ctlive's attested handshake, sans-I/O: Noise XX (or IK to a known key) with the
destination's attestation evidence bound to the handshake.

Flow (XX)::

    source (initiator)                       destination (responder, in the guest)
    msg1: e, payload=hello            ->
                                      <-     msg2: e, ee, s, es, payload=evidence
    [verify evidence; binding checked]
    msg3: s, se, payload=hello        ->     [check the source key's allow-list]

Binding: the evidence's 64-byte ``report_data`` is
``BLAKE2b-512(DOMAIN || h || s_resp)``, where ``h`` is the handshake hash just
before msg2's payload is encrypted. By then ``h`` has absorbed both ephemeral
keys and the responder's encrypted static key, so the report names this very
handshake and this very key; a report from any other handshake (different
ephemerals, so a different ``h``) cannot be replayed. See docs/protocol.md.

If the verifier refuses, the initiator produces no msg3: it never reveals its
static key nor sends anything under the new keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any, Literal

import attrs
from nacl.encoding import RawEncoder
from nacl.hash import blake2b

from ctlive.errors import AttestationError, HandshakeError, PeerNotAllowedError
from ctlive.identity import Identity
from ctlive.protocol.evidence import AttestationResult, EvidenceProvider, EvidenceVerifier
from ctlive.protocol.noise import CipherState, HandshakeState, KeyPair

__all__ = [
    "BINDING_DOMAIN",
    "CIPHERS",
    "PROLOGUE",
    "Cipher",
    "HandshakeResult",
    "InitiatorHandshake",
    "ResponderHandshake",
    "binding_report_data",
    "protocol_name",
]

PROLOGUE = b"ctlive migration protocol v1"
BINDING_DOMAIN = b"ctlive attestation binding v1\x00"
Cipher = Literal["AESGCM", "ChaChaPoly"]
"""The AEAD of a ctlive session (AESGCM is several times faster on x86 with AES-NI)."""
CIPHERS: tuple[Cipher, ...] = ("AESGCM", "ChaChaPoly")


def protocol_name(pattern: str, cipher: Cipher) -> str:
    """The Noise protocol name for a ctlive session."""
    if pattern not in ("XX", "IK"):
        raise HandshakeError(f"ctlive uses the XX or IK pattern, not {pattern}")
    if cipher not in CIPHERS:
        raise HandshakeError(f"cipher must be one of {CIPHERS}, not {cipher}")
    return f"Noise_{pattern}_25519_{cipher}_BLAKE2b"


def binding_report_data(handshake_hash: bytes, responder_static: bytes) -> bytes:
    """The 64 bytes the destination's report must carry for this handshake."""
    data = BINDING_DOMAIN + handshake_hash + responder_static
    return bytes(blake2b(data, digest_size=64, encoder=RawEncoder))


@attrs.frozen(repr=False)
class HandshakeResult:
    """A finished handshake: transport keys and what was learned about the peer."""

    send: CipherState
    recv: CipherState
    handshake_hash: bytes
    remote_static: bytes
    cipher: Cipher
    attestation: AttestationResult | None
    peer_hello: dict[str, Any]
    _chaining_key: bytes

    def derive_key(self, label: bytes) -> bytes:
        """A 32-byte key for ``label`` (e.g. per-lane keys), from the final chaining key."""
        mac = blake2b(label, key=self._chaining_key[:64], digest_size=32, encoder=RawEncoder)
        return bytes(mac)

    def __repr__(self) -> str:
        return (f"HandshakeResult(cipher={self.cipher}, remote_static="
                f"{self.remote_static.hex()[:16]}…, attested={self.attestation is not None})")


def _encode_hello(hello: dict[str, Any]) -> bytes:
    return json.dumps(hello, sort_keys=True, separators=(",", ":")).encode()


def _decode_hello(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode()) if data else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting bombs too
        raise HandshakeError("peer hello is not JSON", cause=exc) from exc
    if not isinstance(value, dict):
        raise HandshakeError("peer hello is not a JSON object")
    return value


def _result(hs: HandshakeState, cipher: Cipher, attestation: AttestationResult | None,
            hello: dict[str, Any]) -> HandshakeResult:
    assert hs.transport and hs.handshake_hash and hs.chaining_key and hs.rs
    send, recv = hs.transport
    return HandshakeResult(send, recv, hs.handshake_hash, hs.rs, cipher, attestation, hello,
                           hs.chaining_key)


class InitiatorHandshake:
    """The source's side. ``verifier`` decides whether the destination may receive."""

    def __init__(self, identity: Identity, verifier: EvidenceVerifier | None, *,
                 cipher: Cipher = "AESGCM", pattern: str = "XX",
                 responder_static: bytes | None = None,
                 hello: dict[str, Any] | None = None) -> None:
        if pattern == "IK" and responder_static is None:
            raise HandshakeError("IK needs the responder's static key")
        self.cipher = cipher
        self.pattern = pattern
        self.verifier = verifier
        self.hello = hello or {}
        self._hs = HandshakeState(
            protocol_name(pattern, cipher), True, prologue=PROLOGUE,
            s=KeyPair(identity.private_key), rs=responder_static)
        self._attestation: AttestationResult | None = None
        self._peer_hello: dict[str, Any] = {}
        self._result: HandshakeResult | None = None

    def start(self) -> bytes:
        """Message 1."""
        return self._hs.write_message(_encode_hello(self.hello))

    def receive(self, msg2: bytes) -> bytes | None:
        """Process message 2 and verify the evidence. Returns message 3 (XX) or None
        (IK: the handshake is complete). Raises AttestationError on refusal, after
        which nothing more may be sent."""
        payload = self._hs.read_message(msg2)
        evidence, hello = _split_payload(payload)
        self._peer_hello = hello
        assert self._hs.rs is not None
        report_data = binding_report_data(self._hs.payload_hash, self._hs.rs)
        if self.verifier is not None:
            if evidence is None:
                raise AttestationError("the destination sent no attestation evidence")
            self._attestation = self.verifier.verify(evidence, report_data)
        if self.pattern == "IK":
            self._result = _result(self._hs, self.cipher, self._attestation, hello)
            return None
        msg3 = self._hs.write_message(_encode_hello(self.hello))
        self._result = _result(self._hs, self.cipher, self._attestation, hello)
        return msg3

    def result(self) -> HandshakeResult:
        """The finished handshake."""
        if self._result is None:
            raise HandshakeError("the handshake has not finished")
        return self._result


def _join_payload(evidence: bytes | None, hello: dict[str, Any]) -> bytes:
    ev = evidence or b""
    return len(ev).to_bytes(4, "big") + ev + _encode_hello(hello)


def _split_payload(payload: bytes) -> tuple[bytes | None, dict[str, Any]]:
    if len(payload) < 4:
        raise HandshakeError("handshake payload too short")
    n = int.from_bytes(payload[:4], "big")
    if n > len(payload) - 4:
        raise HandshakeError("handshake payload evidence length out of range")
    evidence = payload[4 : 4 + n] or None
    return evidence, _decode_hello(payload[4 + n :])


class ResponderHandshake:
    """The destination's side: proves itself with evidence, checks the source's key."""

    def __init__(self, identity: Identity, provider: EvidenceProvider | None,
                 allow: Collection[bytes] | Callable[[bytes], bool], *,
                 cipher: Cipher = "AESGCM", pattern: str = "XX",
                 hello: dict[str, Any] | None = None) -> None:
        self.cipher = cipher
        self.pattern = pattern
        self.provider = provider
        self.allow = allow
        self.hello = hello or {}
        self._hs = HandshakeState(protocol_name(pattern, cipher), False, prologue=PROLOGUE,
                                  s=KeyPair(identity.private_key))
        self._peer_hello: dict[str, Any] = {}
        self._result: HandshakeResult | None = None

    def _check_allowed(self) -> None:
        key = self._hs.rs
        assert key is not None
        ok = self.allow(key) if callable(self.allow) else key in self.allow
        if not ok:
            raise PeerNotAllowedError(
                f"source key {key.hex()} is not on this receiver's allow-list")

    def _evidence(self, h: bytes) -> bytes:
        evidence = None
        if self.provider is not None:
            assert self._hs.s is not None
            evidence = self.provider.get_evidence(binding_report_data(h, self._hs.s.public))
        return _join_payload(evidence, self.hello)

    def receive(self, msg1: bytes) -> bytes:
        """Process message 1; return message 2 carrying the evidence."""
        self._peer_hello = _decode_hello(self._hs.read_message(msg1))
        if self.pattern == "IK":
            self._check_allowed()
        msg2 = self._hs.write_message(self._evidence)
        if self.pattern == "IK":
            self._result = _result(self._hs, self.cipher, None, self._peer_hello)
        return msg2

    def receive_final(self, msg3: bytes) -> HandshakeResult:
        """Process message 3 (XX); checks the source's key against the allow-list."""
        self._peer_hello = _decode_hello(self._hs.read_message(msg3))
        self._result = _result(self._hs, self.cipher, None, self._peer_hello)
        self._check_allowed()
        return self._result

    def result(self) -> HandshakeResult:
        """The finished handshake (also available after a refused source key, so the
        transport can send an authenticated refusal)."""
        if self._result is None:
            raise HandshakeError("the handshake has not finished")
        return self._result
