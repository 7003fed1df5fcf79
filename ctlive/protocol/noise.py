"""The Noise Protocol Framework (revision 34), as a pure state machine.

No I/O: messages are bytes in and bytes out. DH is X25519 and BLAKE2b comes from
PyNaCl; ChaChaPoly is libsodium's IETF ChaCha20-Poly1305 (PyNaCl); AESGCM is
``cryptography``'s; SHA256 (for the test vectors) is hashlib's. HKDF is HMAC
over the protocol's hash, as the specification defines it.

Every fundamental, deferred and PSK handshake pattern of the specification is
supported, so any conforming implementation interoperates. Run the cacophony
test vectors with ``python -m ctlive.protocol.noise FILE``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b as _nacl_blake2b
from nacl.public import PrivateKey

from ctlive.errors import HandshakeError, TamperedRecordError

__all__ = [
    "MAX_MESSAGE",
    "PATTERNS",
    "CipherState",
    "HandshakeState",
    "KeyPair",
    "NoiseProtocol",
    "SymmetricState",
]

MAX_MESSAGE = 65535
"""Noise messages are at most 65535 bytes."""
MAX_NONCE = 2**64 - 1
DHLEN = 32


# --- primitives --------------------------------------------------------------------


def _blake2b(data: bytes) -> bytes:
    return bytes(_nacl_blake2b(data, digest_size=64, encoder=RawEncoder))


class _Hash:
    def __init__(self, name: str) -> None:
        if name == "BLAKE2b":
            self.fn: Callable[[bytes], bytes] = _blake2b
            self.hashlen, self.blocklen = 64, 128
        elif name == "SHA256":
            self.fn = lambda d: hashlib.sha256(d).digest()
            self.hashlen, self.blocklen = 32, 64
        else:
            raise HandshakeError(f"unsupported hash {name}")
        self.name = name

    def hmac(self, key: bytes, data: bytes) -> bytes:
        if self.name == "SHA256":
            return hmac.new(key, data, hashlib.sha256).digest()
        # HMAC per RFC 2104 with BLAKE2b as H and BLOCKLEN 128, as Noise defines it.
        if len(key) > self.blocklen:
            key = self.fn(key)
        key = key.ljust(self.blocklen, b"\0")
        inner = self.fn(bytes(b ^ 0x36 for b in key) + data)
        return self.fn(bytes(b ^ 0x5C for b in key) + inner)

    def hkdf(self, ck: bytes, ikm: bytes, n: int) -> list[bytes]:
        temp = self.hmac(ck, ikm)
        out = [self.hmac(temp, b"\x01")]
        for i in range(2, n + 1):
            out.append(self.hmac(temp, out[-1] + bytes([i])))
        return out


class KeyPair:
    """An X25519 key pair."""

    def __init__(self, private: bytes) -> None:
        if len(private) != DHLEN:
            raise HandshakeError("an X25519 private key is 32 bytes")
        self.private = private
        self.public = bindings.crypto_scalarmult_base(private)

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair."""
        return cls(bytes(PrivateKey.generate()))


def _dh(kp: KeyPair, public: bytes) -> bytes:
    try:
        return bytes(bindings.crypto_scalarmult(kp.private, public))
    except CryptoError as exc:
        # libsodium refuses low-order points (an all-zero shared secret).
        raise HandshakeError("invalid X25519 public key from the peer", cause=exc) from exc


# --- CipherState ---------------------------------------------------------------------


class CipherState:
    """A Noise CipherState: key ``k`` and 64-bit nonce ``n``.

    ``cipher`` is "ChaChaPoly" or "AESGCM". Decryption failures raise
    :class:`~ctlive.errors.TamperedRecordError`; the handshake turns them into
    HandshakeError.
    """

    def __init__(self, cipher: str, key: bytes | None = None) -> None:
        if cipher not in ("ChaChaPoly", "AESGCM"):
            raise HandshakeError(f"unsupported cipher {cipher}")
        self.cipher = cipher
        self.n = 0
        self.k: bytes | None = None
        self._aes: AESGCM | None = None
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """Set a new key and reset the nonce to 0."""
        self.k = key
        self.n = 0
        self._aes = AESGCM(key) if key is not None and self.cipher == "AESGCM" else None

    def snapshot(self) -> CipherState:
        """A copy holding the current key (nonce untouched), for use off-thread."""
        copy = CipherState.__new__(CipherState)
        copy.cipher, copy.n, copy.k, copy._aes = self.cipher, self.n, self.k, self._aes
        return copy

    def has_key(self) -> bool:
        """Whether a key is set (before that, messages pass in clear)."""
        return self.k is not None

    def nonce_bytes(self, n: int) -> bytes:
        """The 96-bit AEAD nonce for counter ``n``."""
        if self.cipher == "AESGCM":
            return b"\0\0\0\0" + n.to_bytes(8, "big")
        return b"\0\0\0\0" + n.to_bytes(8, "little")

    def encrypt(self, n: int, ad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        """ENCRYPT(k, n, ad, plaintext) with an explicit nonce."""
        assert self.k is not None
        nonce = self.nonce_bytes(n)
        if self._aes is not None:
            return self._aes.encrypt(nonce, plaintext, ad)
        return bytes(bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(plaintext), ad, nonce, self.k))

    def decrypt(self, n: int, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """DECRYPT(k, n, ad, ciphertext); raises TamperedRecordError."""
        assert self.k is not None
        nonce = self.nonce_bytes(n)
        try:
            if self._aes is not None:
                return self._aes.decrypt(nonce, ciphertext, ad)
            return bytes(bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                bytes(ciphertext), ad, nonce, self.k))
        except (InvalidTag, CryptoError) as exc:
            raise TamperedRecordError("authentication failed: data was modified or forged",
                                      cause=exc) from exc

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt with the next nonce (or pass through when no key is set)."""
        if self.k is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise HandshakeError("nonce space exhausted; rekey first")
        out = self.encrypt(self.n, ad, plaintext)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt with the next nonce; the nonce advances only on success."""
        if self.k is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise HandshakeError("nonce space exhausted; rekey first")
        out = self.decrypt(self.n, ad, ciphertext)
        self.n += 1
        return out

    def rekey(self) -> None:
        """REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros(32))."""
        assert self.k is not None
        n = self.n
        self.initialize_key(self.encrypt(MAX_NONCE, b"", bytes(32))[:32])
        self.n = n


# --- SymmetricState -------------------------------------------------------------------


class SymmetricState:
    """Chaining key ``ck``, handshake hash ``h`` and the current CipherState."""

    def __init__(self, protocol_name: bytes, cipher: str, hash_name: str) -> None:
        self.hash = _Hash(hash_name)
        if len(protocol_name) <= self.hash.hashlen:
            self.h = protocol_name.ljust(self.hash.hashlen, b"\0")
        else:
            self.h = self.hash.fn(protocol_name)
        self.ck = self.h
        self.cs = CipherState(cipher)
        self.cipher = cipher

    def mix_key(self, ikm: bytes) -> None:
        """MixKey."""
        self.ck, temp_k = self.hash.hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        """MixHash."""
        self.h = self.hash.fn(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        """MixKeyAndHash (used by psk tokens)."""
        self.ck, temp_h, temp_k = self.hash.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(temp_k[:32])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash."""
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash; failures are HandshakeErrors."""
        try:
            pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        except TamperedRecordError as exc:
            raise HandshakeError("handshake message failed authentication", cause=exc) from exc
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        """Split: the two transport CipherStates (initiator→responder, then back)."""
        k1, k2 = self.hash.hkdf(self.ck, b"", 2)
        return CipherState(self.cipher, k1[:32]), CipherState(self.cipher, k2[:32])


# --- patterns -------------------------------------------------------------------------

# name: (pre-messages, messages). Each message is "->" or "<-" then tokens.
_BASE: dict[str, tuple[list[str], list[str]]] = {
    "N": (["<- s"], ["-> e es"]),
    "K": (["-> s", "<- s"], ["-> e es ss"]),
    "X": (["<- s"], ["-> e es s ss"]),
    "NN": ([], ["-> e", "<- e ee"]),
    "NK": (["<- s"], ["-> e es", "<- e ee"]),
    "NX": ([], ["-> e", "<- e ee s es"]),
    "KN": (["-> s"], ["-> e", "<- e ee se"]),
    "KK": (["-> s", "<- s"], ["-> e es ss", "<- e ee se"]),
    "KX": (["-> s"], ["-> e", "<- e ee se s es"]),
    "XN": ([], ["-> e", "<- e ee", "-> s se"]),
    "XK": (["<- s"], ["-> e es", "<- e ee", "-> s se"]),
    "XX": ([], ["-> e", "<- e ee s es", "-> s se"]),
    "IN": ([], ["-> e s", "<- e ee se"]),
    "IK": (["<- s"], ["-> e es s ss", "<- e ee se"]),
    "IX": ([], ["-> e s", "<- e ee se s es"]),
    # Deferred patterns (section 18 of the specification).
    "NK1": (["<- s"], ["-> e", "<- e ee es"]),
    "NX1": ([], ["-> e", "<- e ee s", "-> es"]),
    "X1N": ([], ["-> e", "<- e ee", "-> s", "<- se"]),
    "X1K": (["<- s"], ["-> e es", "<- e ee", "-> s", "<- se"]),
    "XK1": (["<- s"], ["-> e", "<- e ee es", "-> s se"]),
    "X1K1": (["<- s"], ["-> e", "<- e ee es", "-> s", "<- se"]),
    "X1X": ([], ["-> e", "<- e ee s es", "-> s", "<- se"]),
    "XX1": ([], ["-> e", "<- e ee s", "-> es s se"]),
    "X1X1": ([], ["-> e", "<- e ee s", "-> es s", "<- se"]),
    "K1N": (["-> s"], ["-> e", "<- e ee", "-> se"]),
    "K1K": (["-> s", "<- s"], ["-> e es", "<- e ee", "-> se"]),
    "KK1": (["-> s", "<- s"], ["-> e", "<- e ee se es"]),
    "K1K1": (["-> s", "<- s"], ["-> e", "<- e ee es", "-> se"]),
    "K1X": (["-> s"], ["-> e", "<- e ee s es", "-> se"]),
    "KX1": (["-> s"], ["-> e", "<- e ee se s", "-> es"]),
    "K1X1": (["-> s"], ["-> e", "<- e ee s", "-> se es"]),
    "I1N": ([], ["-> e s", "<- e ee", "-> se"]),
    "I1K": (["<- s"], ["-> e es s", "<- e ee", "-> se"]),
    "IK1": (["<- s"], ["-> e s", "<- e ee se es"]),
    "I1K1": (["<- s"], ["-> e s", "<- e ee es", "-> se"]),
    "I1X": ([], ["-> e s", "<- e ee s es", "-> se"]),
    "IX1": ([], ["-> e s", "<- e ee se s", "-> es"]),
    "I1X1": ([], ["-> e s", "<- e ee s", "-> se es"]),
}
PATTERNS = frozenset(_BASE)
"""Base pattern names supported (each may also carry psk modifiers)."""

_NAME = re.compile(r"^Noise_([A-Z0-9]+?)((?:psk\d)(?:\+psk\d)*)?_(25519)_(ChaChaPoly|AESGCM)_"
                   r"(BLAKE2b|SHA256)$")


class NoiseProtocol:
    """A parsed protocol name such as ``Noise_XX_25519_AESGCM_BLAKE2b``."""

    def __init__(self, name: str) -> None:
        m = _NAME.match(name)
        if not m or m.group(1) not in _BASE:
            raise HandshakeError(f"unsupported Noise protocol {name!r}")
        self.name = name
        self.pattern = m.group(1)
        self.cipher = m.group(4)
        self.hash = m.group(5)
        pre, msgs = _BASE[self.pattern]
        self.pre = [(p[:2], p[3:].split()) for p in pre]
        self.messages = [(p[:2], p[3:].split()) for p in msgs]
        self.psks = sorted(int(x[3:]) for x in m.group(2).split("+")) if m.group(2) else []
        for k in self.psks:
            if k == 0:
                self.messages[0][1].insert(0, "psk")
            elif k <= len(self.messages):
                self.messages[k - 1][1].append("psk")
            else:
                raise HandshakeError(f"psk{k} is past the last message of {self.pattern}")
        self.one_way = len(self.pattern) == 1


# --- HandshakeState -------------------------------------------------------------------


class HandshakeState:
    """Runs one handshake. Call :meth:`write_message` and :meth:`read_message` in the
    pattern's order; after the last message, :attr:`transport` holds the split
    CipherStates as ``(send, receive)`` for this side."""

    def __init__(
        self,
        protocol: str | NoiseProtocol,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        self.protocol = protocol if isinstance(protocol, NoiseProtocol) else NoiseProtocol(
            protocol)
        p = self.protocol
        self.initiator = initiator
        self.ss = SymmetricState(p.name.encode(), p.cipher, p.hash)
        self.s, self.e, self.rs, self.re = s, e, rs, re
        self.psks = list(psks)
        if len(self.psks) != len(p.psks) or any(len(k) != 32 for k in self.psks):
            raise HandshakeError(f"{p.name} needs {len(p.psks)} pre-shared keys of 32 bytes")
        self.ss.mix_hash(prologue)
        for direction, tokens in p.pre:
            mine = (direction == "->") == initiator
            for t in tokens:
                key = (self.s.public if self.s else None) if mine and t == "s" else (
                    (self.e.public if self.e else None) if mine else (
                        self.rs if t == "s" else self.re))
                if key is None:
                    raise HandshakeError(f"{p.name} needs a pre-message {t} key")
                self.ss.mix_hash(key)
        self._step = 0
        self.payload_hash = b""
        """The handshake hash just before the last message's payload was encrypted."""
        self.transport: tuple[CipherState, CipherState] | None = None
        self.handshake_hash: bytes | None = None
        self.chaining_key: bytes | None = None

    @property
    def finished(self) -> bool:
        """Whether every handshake message has been processed."""
        return self.transport is not None

    def is_my_turn(self) -> bool:
        """Whether the next handshake message is ours to write."""
        if self.finished:
            return False
        direction = self.protocol.messages[self._step][0]
        return (direction == "->") == self.initiator

    def _dh_token(self, t: str) -> bytes:
        # es: initiator's e with responder's s; se: initiator's s with responder's e.
        local = {"ee": ("e", "e"), "ss": ("s", "s"),
                 "es": ("e", "s") if self.initiator else ("s", "e"),
                 "se": ("s", "e") if self.initiator else ("e", "s")}[t]
        mine = self.e if local[0] == "e" else self.s
        theirs = self.re if local[1] == "e" else self.rs
        if mine is None or theirs is None:
            raise HandshakeError(f"token {t} needs keys that are not available")
        return _dh(mine, theirs)

    def _advance(self) -> None:
        self._step += 1
        if self._step == len(self.protocol.messages):
            c1, c2 = self.ss.split()
            self.handshake_hash = self.ss.h
            self.chaining_key = self.ss.ck
            self.transport = (c1, c2) if self.initiator else (c2, c1)

    def write_message(self, payload: bytes | Callable[[bytes], bytes] = b"") -> bytes:
        """Produce the next handshake message carrying ``payload``.

        ``payload`` may be a function of the handshake hash at the point where the
        payload is encrypted (after this message's tokens), so the payload can bind
        it — ctlive's attestation evidence does.
        """
        if not self.is_my_turn():
            raise HandshakeError("not our turn to write a handshake message")
        out = bytearray()
        psk_mode = bool(self.protocol.psks)
        for t in self.protocol.messages[self._step][1]:
            if t == "e":
                if self.e is None:
                    self.e = KeyPair.generate()
                out += self.e.public
                self.ss.mix_hash(self.e.public)
                if psk_mode:
                    self.ss.mix_key(self.e.public)
            elif t == "s":
                if self.s is None:
                    raise HandshakeError("no static key to send")
                out += self.ss.encrypt_and_hash(self.s.public)
            elif t == "psk":
                self.ss.mix_key_and_hash(self.psks.pop(0))
            else:
                self.ss.mix_key(self._dh_token(t))
        self.payload_hash = self.ss.h
        if callable(payload):
            payload = payload(self.ss.h)
        out += self.ss.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE:
            raise HandshakeError("handshake message would exceed 65535 bytes")
        self._advance()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message; return its payload."""
        if self.finished or self.is_my_turn():
            raise HandshakeError("unexpected handshake message")
        if len(message) > MAX_MESSAGE:
            raise HandshakeError("handshake message exceeds 65535 bytes")
        psk_mode = bool(self.protocol.psks)
        off = 0
        for t in self.protocol.messages[self._step][1]:
            if t == "e":
                if len(message) - off < DHLEN:
                    raise HandshakeError("handshake message too short for an ephemeral key")
                self.re = message[off : off + DHLEN]
                off += DHLEN
                self.ss.mix_hash(self.re)
                if psk_mode:
                    self.ss.mix_key(self.re)
            elif t == "s":
                n = DHLEN + (16 if self.ss.cs.has_key() else 0)
                if len(message) - off < n:
                    raise HandshakeError("handshake message too short for a static key")
                self.rs = self.ss.decrypt_and_hash(message[off : off + n])
                off += n
            elif t == "psk":
                self.ss.mix_key_and_hash(self.psks.pop(0))
            else:
                self.ss.mix_key(self._dh_token(t))
        if self.ss.cs.has_key() and len(message) - off < 16:
            raise HandshakeError("handshake message too short for its tag")
        self.payload_hash = self.ss.h
        payload = self.ss.decrypt_and_hash(message[off:])
        self._advance()
        return payload


if __name__ == "__main__":  # python -m ctlive.protocol.noise VECTORS.json
    from ctlive.protocol.noise_vectors import main

    sys.exit(main(sys.argv[1:]))
