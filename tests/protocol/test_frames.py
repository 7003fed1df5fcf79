"""The frame layer: the codec, and fragmentation of change items into CHANGE payloads."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive import errors
from ctlive.protocol.frames import MAX_CHANGE, Fragment, Reassembler, decode_frame, fragment


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


# --- fragmentation ----------------------------------------------------------------------


def test_fragment_flags_and_sizes() -> None:
    assert list(fragment(b"abc", 10)) == [b"\x00abc"]
    assert list(fragment(b"", 10)) == [b"\x00"]
    assert list(fragment(b"abcdefghi", 10)) == [b"\x00abcdefghi"]  # exactly one payload
    parts = list(fragment(b"abcdefghij", 10))  # one byte too many for one payload
    assert parts == [b"\x01abcdefghi", b"\x02j"]
    parts = list(fragment(bytes(range(256)) * 40, MAX_CHANGE))
    assert len(parts) == 1 and parts[0][0] == Fragment.WHOLE
    big = os.urandom(2 * MAX_CHANGE + 5)
    parts = list(fragment(big))
    assert [p[0] for p in parts] == [Fragment.MORE, Fragment.MORE, Fragment.LAST]
    assert all(len(p) <= MAX_CHANGE for p in parts)
    assert b"".join(p[1:] for p in parts) == big


@settings(max_examples=100)
@given(items=st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=60)), max_size=30),
       room=st.integers(2, 17), seed=st.randoms(use_true_random=False))
def test_reassembly_of_interleaved_lanes(items: list[tuple[int, bytes]], room: int,
                                         seed: random.Random) -> None:
    """Items fragmented on several lanes, the lanes interleaved in any way that keeps each
    lane's order: every item comes back whole, once, in its lane's order."""
    lanes: dict[int, list[bytes]] = {}
    for lane, item in items:
        lanes.setdefault(lane, []).extend(fragment(item, room))
    queues = {lane: list(p) for lane, p in lanes.items()}
    r = Reassembler()
    got: dict[int, list[bytes]] = {}
    while queues:
        lane = seed.choice(sorted(queues))
        out = r.feed(lane, queues[lane].pop(0))
        if out is not None:
            got.setdefault(lane, []).append(out)
        if not queues[lane]:
            del queues[lane]
    r.end_iteration()
    assert got == {lane: [i for ln, i in items if ln == lane]
                   for lane in {ln for ln, _ in items}}
    assert r.pending_bytes == 0


@pytest.mark.parametrize(("payloads", "message"), [
    ([b""], "empty"),
    ([b"\x07abc"], "unknown fragment flag"),
    ([b"\x01ab", b"\x00cd"], "whole item inside a fragmented one"),
    ([b"\x01" + bytes(60), b"\x01" + bytes(60)], "larger than 100"),
    ([b"\x00" + bytes(101)], "larger than 100"),
])
def test_reassembly_rules(payloads: list[bytes], message: str) -> None:
    r = Reassembler(max_item=100)
    with pytest.raises(errors.RemoteProtocolError, match=message):
        for p in payloads:
            r.feed(0, p)


def test_iteration_may_not_end_inside_an_item() -> None:
    r = Reassembler()
    assert r.feed(1, b"\x01half") is None
    assert r.pending_bytes == 4
    assert r.feed(0, b"\x00whole") == b"whole"  # other lanes are unaffected
    with pytest.raises(errors.RemoteProtocolError, match="inside a fragmented item"):
        r.end_iteration()


def test_reassembly_memory_is_capped_before_it_is_held() -> None:
    r = Reassembler(max_item=1000)
    r.feed(0, b"\x01" + bytes(600))
    with pytest.raises(errors.RemoteProtocolError):
        r.feed(0, b"\x01" + bytes(600))
    assert r.pending_bytes == 600  # the refused fragment was not appended


def test_a_nesting_bomb_is_a_protocol_error() -> None:
    with pytest.raises(errors.RemoteProtocolError, match="not JSON"):
        decode_frame(b"\x01\x01" + b"[" * 100_000 + b"]" * 100_000)
