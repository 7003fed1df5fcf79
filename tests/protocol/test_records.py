"""The record layer: AEAD records with counters, rekeying and an explicit end."""

from __future__ import annotations

import os

import pytest

from ctlive import errors
from ctlive.protocol.noise import CipherState
from ctlive.protocol.records import REC_CLOSE, REC_DATA, RecordReceiver, RecordSender


def records(cipher: str = "AESGCM", interval: int = 4) -> tuple[RecordSender, RecordReceiver]:
    key = os.urandom(32)
    return (RecordSender(CipherState(cipher, key), rekey_interval=interval),
            RecordReceiver(CipherState(cipher, key), rekey_interval=interval))


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_records_roundtrip_across_rekeys(cipher: str) -> None:
    tx, rx = records(cipher)
    msgs = [os.urandom(n) for n in range(0, 3000, 97)]
    for m in msgs:
        rx.feed(tx.seal(m))
    rx.feed(tx.close())
    out = []
    while (r := rx.next_record()) is not None:
        out.append(r)
    assert [p for k, p in out if k == REC_DATA] == msgs
    assert out[-1] == (REC_CLOSE, b"")
    rx.eof()  # clean end


def test_record_errors_are_specific() -> None:
    tx, rx = records()
    r0, r1, r2 = tx.seal(b"a"), tx.seal(b"b"), tx.seal(b"c")
    rx.feed(r0)
    assert rx.next_record() == (REC_DATA, b"a")
    with pytest.raises(errors.ReplayedRecordError):
        rx.feed(r0)
        rx.next_record()
    _, rx = records()
    with pytest.raises(errors.ReorderedRecordError):
        rx.feed(r1)
        rx.next_record()
    tx, rx = records()
    rec = bytearray(tx.seal(b"payload"))
    rec[-1] ^= 1
    rx.feed(bytes(rec))
    with pytest.raises(errors.TamperedRecordError):
        rx.next_record()
    with pytest.raises(errors.TamperedRecordError):
        rx.next_record()  # stays failed
    tx, rx = records()
    rx.feed(tx.seal(b"x"))
    rx.next_record()
    with pytest.raises(errors.TruncatedStreamError):
        rx.eof()
    del r2


def test_oversize_record_refused_before_allocation() -> None:
    _, rx = records()
    with pytest.raises(errors.TamperedRecordError):
        rx.parse_header(b"\xff\xff\xff\xff" + bytes(9))
    tx, _ = records()
    with pytest.raises(errors.RecordError):
        tx.seal(bytes((1 << 20) + 257))
