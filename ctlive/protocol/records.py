"""The record layer: AEAD records after the Noise handshake, sans-I/O.

On the wire a record is::

    u32 length (big-endian; ciphertext bytes, tag included)
    u64 sequence number (big-endian)
    u8  kind (DATA or CLOSE)
    ciphertext = AEAD(key, nonce = sequence, ad = the 13 header bytes, payload)

The sequence number is the Noise nonce, sent in clear but authenticated (it is
both the nonce and part of the associated data). Sending it lets the receiver
name what went wrong instead of only "bad tag":

- a number already seen: :class:`~ctlive.errors.ReplayedRecordError`;
- a number ahead of the next expected one (a record was dropped, or they were
  swapped): :class:`~ctlive.errors.ReorderedRecordError`;
- the expected number but a failing tag (flipped bits, forged or injected
  bytes): :class:`~ctlive.errors.TamperedRecordError`;
- the byte stream ending without an authenticated CLOSE record:
  :class:`~ctlive.errors.TruncatedStreamError`.

Both directions rekey (Noise REKEY) every ``rekey_interval`` records. Any error
leaves the layer unusable: a channel that saw a bad record is torn down.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from ctlive.errors import (
    ClosedChannelError,
    RecordError,
    ReorderedRecordError,
    ReplayedRecordError,
    TamperedRecordError,
    TruncatedStreamError,
)
from ctlive.protocol.noise import CipherState

__all__ = [
    "HEADER",
    "MAX_PAYLOAD",
    "REC_CLOSE",
    "REC_DATA",
    "REKEY_INTERVAL",
    "RecordReceiver",
    "RecordSender",
]

HEADER = struct.Struct(">IQB")
TAG = 16
MAX_PAYLOAD = (1 << 20) + 256
"""Largest plaintext payload of one record: a 1 MiB change plus its frame header."""
REKEY_INTERVAL = 1 << 16
REC_DATA = 0
REC_CLOSE = 1


class RecordSender:
    """Seals records for one direction of one connection."""

    def __init__(self, cipher: CipherState, *, rekey_interval: int = REKEY_INTERVAL) -> None:
        self._cs = cipher
        self._seq = 0
        self._interval = rekey_interval
        self.closed = False
        self.records = 0
        self.bytes = 0

    def reserve(self, length: int, kind: int = REC_DATA) -> tuple[bytes, CipherState]:
        """Claim the next sequence number for a payload of ``length`` bytes.

        Returns the header and the key state to encrypt with, so several records
        can be encrypted concurrently (:meth:`encrypt_reserved`) and then written
        in reservation order.
        """
        if self.closed:
            raise ClosedChannelError("the record stream was closed")
        if length > MAX_PAYLOAD:
            raise RecordError(f"record payload of {length} bytes exceeds {MAX_PAYLOAD}")
        header = HEADER.pack(length + TAG, self._seq, kind)
        keys = self._cs.snapshot()
        self._advance()
        self.records += 1
        self.bytes += len(header) + length + TAG
        return header, keys

    @staticmethod
    def encrypt_reserved(header: bytes, keys: CipherState,
                         payload: bytes | bytearray | memoryview) -> bytes:
        """Encrypt a reserved record's payload (thread-safe: touches no shared state)."""
        seq = HEADER.unpack(header)[1]
        return keys.encrypt(seq, header, payload)

    def seal_parts(self, payload: bytes | bytearray | memoryview,
                   kind: int = REC_DATA) -> tuple[bytes, bytes]:
        """One record as (header, ciphertext), so a transport can write both
        without joining them."""
        header, keys = self.reserve(len(payload), kind)
        return header, self.encrypt_reserved(header, keys, payload)

    def seal(self, payload: bytes | bytearray | memoryview, kind: int = REC_DATA) -> bytes:
        """One record carrying ``payload`` (at most MAX_PAYLOAD bytes)."""
        header, ct = self.seal_parts(payload, kind)
        return header + ct

    def close(self) -> bytes:
        """The authenticated CLOSE record (empty payload, kind CLOSE); nothing may be
        sealed after it."""
        rec = self.seal(b"", REC_CLOSE)
        self.closed = True
        return rec

    def _advance(self) -> None:
        self._seq += 1
        if self._seq % self._interval == 0:
            self._cs.rekey()


class RecordReceiver:
    """Opens records for one direction of one connection.

    Either push bytes with :meth:`feed` and pull with :meth:`next_record`, or let a
    transport read the header itself (:meth:`parse_header`) and then the body
    into a buffer of exactly the announced size (:meth:`open`).
    """

    def __init__(self, cipher: CipherState, *, rekey_interval: int = REKEY_INTERVAL) -> None:
        self._cs = cipher
        self._seq = 0
        self._interval = rekey_interval
        self._buf = bytearray()
        self.closed = False
        self.failed: RecordError | None = None
        self.records = 0
        self.bytes = 0

    def parse_header(self, header: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Validate a 13-byte header; return (ciphertext length, sequence)."""
        self._check_usable()
        length, seq, _ = HEADER.unpack(header)
        if length < TAG or length > MAX_PAYLOAD + TAG:
            self._fail(TamperedRecordError(f"record length {length} is out of range"))
        if seq < self._seq:
            self._fail(ReplayedRecordError(
                f"record {seq} was already received (expected {self._seq}): replay"))
        if seq > self._seq:
            self._fail(ReorderedRecordError(
                f"record {seq} arrived while {self._seq} was expected: "
                "records were dropped or reordered"))
        return length, seq

    def accept(self, header: bytes | bytearray | memoryview) -> tuple[int, CipherState]:
        """Check a header and claim its sequence number; returns (ciphertext length,
        key state) for :meth:`decrypt_accepted`, which may run in another thread."""
        length, seq = self.parse_header(header)
        kind = header[12]
        if kind not in (REC_DATA, REC_CLOSE):
            self._fail(TamperedRecordError(f"record {seq} has unknown kind {kind}"))
        keys = self._cs.snapshot()
        self._seq += 1
        if self._seq % self._interval == 0:
            self._cs.rekey()
        self.records += 1
        self.bytes += HEADER.size + length
        if kind == REC_CLOSE:
            self.closed = True
        return length, keys

    def decrypt_accepted(self, header: bytes | bytearray | memoryview, keys: CipherState,
                         body: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Authenticate and decrypt an accepted record; returns (kind, payload)."""
        _, seq, kind = HEADER.unpack(header)
        try:
            pt = keys.decrypt(seq, bytes(header), body)
        except TamperedRecordError as exc:
            self._fail(TamperedRecordError(
                f"record {seq} failed authentication: modified, forged or injected",
                cause=exc))
        return kind, pt

    def open(self, header: bytes | bytearray | memoryview,
             body: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Authenticate and decrypt one record; returns (kind, payload)."""
        length, keys = self.accept(header)
        if len(body) != length:
            self._fail(TamperedRecordError("record body length does not match its header"))
        return self.decrypt_accepted(header, keys, body)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes for :meth:`next_record`."""
        self._buf += data

    def next_record(self) -> tuple[int, bytes] | None:
        """The next complete record from the buffer, or None if more bytes are needed."""
        if self.failed is not None:
            raise self.failed
        if self.closed and not self._buf:
            return None
        if len(self._buf) < HEADER.size:
            return None
        length, _ = self.parse_header(self._buf[: HEADER.size])
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        header, body = bytes(self._buf[: HEADER.size]), bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return self.open(header, body)

    def eof(self) -> None:
        """The byte stream ended. Fine after CLOSE, truncation otherwise."""
        if not self.closed:
            self._fail(TruncatedStreamError(
                "the stream ended without an authenticated close: truncated"))

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.closed:
            self._fail(TamperedRecordError("data after the authenticated close: injected"))

    def _fail(self, exc: RecordError) -> NoReturn:
        self.failed = exc
        raise exc
