"""Sans-I/O wire protocol and record layer: two peers wired in memory, no sockets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctlive import errors
from ctlive.protocol.conversation import Conversation, State
from ctlive.protocol.frames import (
    Abort,
    Change,
    Commit,
    CommitAck,
    Credit,
    Error,
    Hello,
    IterationBegin,
    IterationEnd,
    MigrationMeta,
    Ready,
    Role,
    decode_frame,
    encode_frame,
)
from ctlive.protocol.noise import CipherState
from ctlive.protocol.records import REC_CLOSE, REC_DATA, RecordReceiver, RecordSender


def pair() -> tuple[Conversation, Conversation]:
    return Conversation(Role.SOURCE), Conversation(Role.DESTINATION)


def deliver(src: Conversation, dst: Conversation, event: object, from_source: bool = True) -> None:
    a, b = (src, dst) if from_source else (dst, src)
    assert b.receive(a.send(event)) == event  # type: ignore[arg-type]


def test_full_conversation() -> None:
    s, d = pair()
    deliver(s, d, Hello(capabilities={"lanes": 2}))
    deliver(s, d, Hello(capabilities={"window": 10}), from_source=False)
    deliver(s, d, MigrationMeta({"kind": "process"}))
    for k in range(3):
        final = k == 2
        deliver(s, d, IterationBegin(k, final))
        deliver(s, d, Change(k, 0, b"pages"))
        deliver(s, d, Credit(100), from_source=False)
        deliver(s, d, IterationEnd(k, final, (1, 0), {"pages": 3}))
    assert s.state is State.AWAIT_READY
    deliver(s, d, Ready({"verified": True}), from_source=False)
    deliver(s, d, Commit("m1"))
    deliver(s, d, Commit("m1"))  # retried COMMIT is fine
    deliver(s, d, CommitAck("m1"), from_source=False)
    deliver(s, d, Commit("m1"))  # retry after a lost ACK
    deliver(s, d, CommitAck("m1"), from_source=False)
    assert s.state is d.state is State.DONE


@pytest.mark.parametrize(
    ("prefix", "bad", "from_source"),
    [
        ([], MigrationMeta({}), True),  # META before HELLO
        ([Hello()], Ready(), False),  # READY before anything was sent
        ([Hello(), ("d", Hello()), MigrationMeta({})], IterationBegin(1), True),  # skip 0
        ([Hello(), ("d", Hello()), MigrationMeta({})], IterationEnd(0, False, (0,)), True),
        ([Hello(), ("d", Hello()), MigrationMeta({})], Commit("m"), True),  # commit unready
        ([Hello(), ("d", Hello()), MigrationMeta({}), IterationBegin(0, True)],
         IterationEnd(0, False, (0,)), True),  # final flag mismatch
    ],
)
def test_out_of_order_frames_rejected(prefix: list[object], bad: object,
                                      from_source: bool) -> None:
    s, d = pair()
    for item in prefix:
        if isinstance(item, tuple):
            deliver(s, d, item[1], from_source=False)
        else:
            deliver(s, d, item)
    sender, receiver = (s, d) if from_source else (d, s)
    with pytest.raises(errors.LocalProtocolError):
        sender.send(bad)  # type: ignore[arg-type]
    with pytest.raises(errors.RemoteProtocolError):
        receiver.receive(encode_frame(bad))  # type: ignore[arg-type]


def test_no_abort_after_commit() -> None:
    s, d = pair()
    for ev, src in [(Hello(), True), (Hello(), False), (MigrationMeta({}), True),
                    (IterationBegin(0, True), True), (IterationEnd(0, True, (0,)), True),
                    (Ready(), False), (Commit("m"), True)]:
        deliver(s, d, ev, from_source=src)
    with pytest.raises(errors.LocalProtocolError):
        s.send(Abort("too late"))


def test_error_ends_conversation_from_either_side() -> None:
    s, d = pair()
    deliver(s, d, Hello())
    deliver(s, d, Error("boom", "disk full"), from_source=False)
    assert s.state is d.state is State.FAILED


@given(st.binary(max_size=200))
def test_frame_decoder_fuzz(data: bytes) -> None:
    try:
        decode_frame(data)
    except errors.RemoteProtocolError:
        pass


@pytest.mark.parametrize("frame", [
    b"\x02\x01{}",  # other version
    b"\x01\x63{}",  # unknown type
    b"\x01\x05" + b'{"index":-1,"final":false,"lane_counts":[],"stats":{}}',
    b"\x01\x05" + b'{"index":0,"final":false,"lane_counts":[-2],"stats":{}}',
    b"\x01\x06" + b'{"bytes":true}',
    b"\x01\x04\x00",  # short CHANGE header
    b"\x01\x01[1]",
])
def test_bad_frames(frame: bytes) -> None:
    with pytest.raises(errors.RemoteProtocolError):
        decode_frame(frame)


# --- record layer -----------------------------------------------------------------------


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
