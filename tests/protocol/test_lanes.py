"""Lanes, sans-I/O: the merge of many lanes into one logical order, the preambles, and
lane joins. No sockets: frames are put on the merger's queues as the pumps would."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive import errors
from ctlive.identity import Identity
from ctlive.protocol.frames import Change, Event, IterationBegin, IterationEnd, MigrationMeta
from ctlive.protocol.handshake import InitiatorHandshake, ResponderHandshake
from ctlive.protocol.lanes import (
    LANE_PREAMBLE_SIZE,
    PREAMBLE_PREFIX,
    LaneMerger,
    check_join,
    control_preamble,
    join_tag,
    lane_keys,
    lane_preamble,
    parse_control_preamble,
    parse_lane_preamble,
    session_id,
)


def drain(m: LaneMerger) -> list[Event]:
    out = []
    while (ev := m.pop()) is not None:
        out.append(ev)
    return out


def iterations(plan: list[list[int]]) -> tuple[list[Event], list[list[Change]]]:
    """Control frames and per-lane CHANGE frames for iterations whose changes go on the
    given lanes (plan[k] = the lane of each change of iteration k)."""
    nlanes = 1 + max((ln for it in plan for ln in it), default=0)
    control: list[Event] = [MigrationMeta({})]
    lanes: list[list[Change]] = [[] for _ in range(nlanes)]
    for k, it in enumerate(plan):
        counts = [0] * nlanes
        control.append(IterationBegin(k, k == len(plan) - 1))
        for n, ln in enumerate(it):
            lanes[ln].append(Change(k, counts[ln], b"%d:%d" % (k, n)))
            counts[ln] += 1
        control.append(IterationEnd(k, k == len(plan) - 1, tuple(counts)))
    return control, lanes


@settings(max_examples=150)
@given(plan=st.lists(st.lists(st.integers(0, 3), max_size=8), min_size=1, max_size=4),
       rnd=st.randoms(use_true_random=False))
def test_merge_presents_logical_order_whatever_the_arrival(plan: list[list[int]],
                                                           rnd: random.Random) -> None:
    """Frames arrive in any interleaving of the connections (each in its own order):
    the merger yields BEGIN, exactly that iteration's changes, END, iteration by
    iteration, and each lane's changes in their order."""
    control, lanes = iterations(plan)
    m = LaneMerger(len(lanes))
    queues = [("c", list(control))] + [(i, list(q)) for i, q in enumerate(lanes) if q]
    out: list[Event] = []
    while queues:
        j = rnd.randrange(len(queues))
        key, q = queues[j]
        ev = q.pop(0)
        if key == "c":
            m.control.append(ev)
        else:
            m.lanes[int(key)].append(ev)  # type: ignore[arg-type]
        if not q:
            queues.pop(j)
        out += drain(m)
    assert not drain(m)
    assert isinstance(out[0], MigrationMeta)
    pos = 1
    for k, it in enumerate(plan):
        assert out[pos] == IterationBegin(k, k == len(plan) - 1)
        body = out[pos + 1 : pos + 1 + len(it)]
        assert all(isinstance(c, Change) and c.iteration == k for c in body)
        for ln in set(it):
            seqs = [c.seq for c in body if isinstance(c, Change) and c.lane == ln]
            assert seqs == list(range(it.count(ln)))
        assert isinstance(out[pos + 1 + len(it)], IterationEnd)
        pos += len(it) + 2
    assert pos == len(out)


def test_changes_wait_for_their_iteration() -> None:
    m = LaneMerger(2)
    m.lanes[1].append(Change(0, 0, b"early"))  # a lane ran ahead of the control connection
    assert m.pop() is None
    m.control.append(IterationBegin(0))
    assert m.pop() == IterationBegin(0)
    ch = m.pop()
    assert isinstance(ch, Change) and ch.lane == 1 and ch.data == b"early"
    assert m.pop() is None  # END not here yet
    m.control.append(IterationEnd(0, False, (0, 1)))
    assert isinstance(m.pop(), IterationEnd)


@pytest.mark.parametrize(("lane_frames", "end", "message"), [
    ([[Change(0, 1, b"")], []], (0, 1), "lane 0 sent change 1, expected 0"),
    ([[Change(0, 0, b""), Change(0, 1, b"")], []], (1, 0), "more changes than announced"),
    ([[Change(0, 0, b""), Change(1, 0, b"")], []], (2, 0), "moved on before"),
    ([[], [Change(0, 0, b"")]], (0, 1, 0), "names 3 lanes, the session has 2"),
])
def test_merge_rules(lane_frames: list[list[Change]], end: tuple[int, ...],
                     message: str) -> None:
    m = LaneMerger(len(lane_frames))
    m.control.extend([IterationBegin(0), IterationEnd(0, False, end)])
    for i, frames in enumerate(lane_frames):
        m.lanes[i].extend(frames)
    with pytest.raises(errors.RemoteProtocolError, match=message):
        drain(m)


def test_a_change_of_a_past_iteration_is_refused() -> None:
    m = LaneMerger(2)
    m.control.extend([IterationBegin(0), IterationEnd(0, False, (0, 0)), IterationBegin(1)])
    assert len(drain(m)) == 3
    m.lanes[1].append(Change(0, 0, b"late"))
    with pytest.raises(errors.RemoteProtocolError, match="past iteration"):
        m.pop()


def handshake() -> tuple[object, object]:
    src, dst = Identity.generate(), Identity.generate()
    init = InitiatorHandshake(src, None)
    resp = ResponderHandshake(dst, None, {src.public_key})
    msg2 = resp.receive(init.start())
    msg3 = init.receive(msg2)
    assert msg3 is not None
    resp.receive_final(msg3)
    return init.result(), resp.result()


def test_preambles_and_joins() -> None:
    ih, rh = handshake()
    pre = control_preamble("ChaChaPoly")
    assert len(pre) == PREAMBLE_PREFIX and parse_control_preamble(pre) == "ChaChaPoly"
    with pytest.raises(errors.HandshakeError):
        parse_control_preamble(pre[:4] + b"\x09\x01")
    with pytest.raises(errors.HandshakeError):
        parse_control_preamble(pre[:4] + b"\x01\x02")  # a pattern other than XX
    lp = lane_preamble(ih, 2)  # type: ignore[arg-type]
    assert len(lp) == LANE_PREAMBLE_SIZE
    sid, lane, tag = parse_lane_preamble(lp)
    assert sid == session_id(rh) and lane == 2  # type: ignore[arg-type]
    check_join(rh, lane, tag, 3, set())  # type: ignore[arg-type]
    for bad in ((2, tag, 3, {2}),            # joined twice
                (3, tag, 3, set()),          # no such lane
                (0, tag, 3, set()),          # lane 0 is the control connection
                (2, bytes(32), 3, set()),    # forged tag
                (1, tag, 3, set())):         # another lane's tag
        with pytest.raises(errors.RemoteProtocolError, match="invalid lane join"):
            check_join(rh, *bad)  # type: ignore[arg-type]
    with pytest.raises(errors.RemoteProtocolError):
        parse_lane_preamble(lp[:-1])
    # Each side's send key is the other's receive key; lanes and directions differ.
    s_send, s_recv = lane_keys(ih, 1, True)  # type: ignore[arg-type]
    d_send, d_recv = lane_keys(rh, 1, False)  # type: ignore[arg-type]
    assert (s_send, s_recv) == (d_recv, d_send) and s_send != s_recv
    assert lane_keys(ih, 2, True) != (s_send, s_recv)  # type: ignore[arg-type]
    assert join_tag(ih, 1) == join_tag(rh, 1) != join_tag(ih, 2)  # type: ignore[arg-type]
