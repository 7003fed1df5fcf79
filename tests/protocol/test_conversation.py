"""The conversation's rules, sans-I/O: two peers wired in memory, no sockets. Every
rule of ctlive.protocol.conversation has a test here that fails when it is broken."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive import errors
from ctlive.protocol.conversation import Conversation, State
from ctlive.protocol.frames import (
    MAX_CHANGE,
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


def pair() -> tuple[Conversation, Conversation]:
    return Conversation(Role.SOURCE), Conversation(Role.DESTINATION)


def deliver(src: Conversation, dst: Conversation, event: object, from_source: bool = True) -> None:
    a, b = (src, dst) if from_source else (dst, src)
    assert b.receive(a.send(event)) == event  # type: ignore[arg-type]


def change(s: Conversation, d: Conversation, iteration: int, payload: bytes,
           lane: int | None = None) -> int:
    """The source sends one CHANGE; it arrives on its lane and, in order, is checked."""
    index, frame = s.send_change(iteration, payload, lane)
    event = decode_frame(frame)
    d.check_link(index, event)
    d.receive_event(event)
    return index


def test_full_conversation() -> None:
    s, d = pair()
    deliver(s, d, Hello(capabilities={"lanes": 2}))
    deliver(s, d, Hello(capabilities={"window": 10}), from_source=False)
    deliver(s, d, MigrationMeta({"kind": "process"}))
    for k in range(3):
        final = k == 2
        deliver(s, d, IterationBegin(k, final))
        assert change(s, d, k, b"pages", lane=0) == 0
        deliver(s, d, Credit(5), from_source=False)
        deliver(s, d, IterationEnd(k, final, s.lane_counts(k), {"pages": 3}))
        assert s.lane_counts(k) == (1, 0)
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


# --- record layer -----------------------------------------------------------------------




# --- CHANGE frames, credit and links ------------------------------------------------------


def iterating(lanes: int = 1, window: int = 100) -> tuple[Conversation, Conversation]:
    """Both peers inside iteration 0, with ``lanes`` lanes and a ``window``-byte credit."""
    s, d = pair()
    deliver(s, d, Hello(capabilities={"lanes": lanes}))
    deliver(s, d, Hello(capabilities={"window": window}), from_source=False)
    deliver(s, d, MigrationMeta({}))
    deliver(s, d, IterationBegin(0))
    return s, d


def test_credit_exhaustion_and_return() -> None:
    s, d = iterating(window=100)
    assert s.credit.window == d.credit.window == 100
    change(s, d, 0, bytes(60))
    assert s.credit.may_send(40) and not s.credit.may_send(41)
    change(s, d, 0, bytes(40))
    assert s.credit.available == d.credit.available == 0
    assert not s.credit.may_send(1)
    with pytest.raises(errors.LocalProtocolError, match="overruns the credit"):
        s.send_change(0, b"x")
    deliver(s, d, Credit(60), from_source=False)
    assert s.credit.available == d.credit.available == 60
    change(s, d, 0, bytes(60))
    assert s.credit.outstanding == d.credit.outstanding == 100


def test_a_frame_larger_than_the_window_moves_alone() -> None:
    s, d = iterating(window=10)
    change(s, d, 0, bytes(50))  # nothing outstanding: allowed
    assert not s.credit.may_send(1)
    deliver(s, d, Credit(50), from_source=False)
    assert s.credit.may_send(50)


def test_a_peer_that_overruns_its_credit_is_cut_off() -> None:
    """A destination accounts each CHANGE as it arrives, before it holds it."""
    s, d = iterating(window=100)
    change(s, d, 0, bytes(90))
    rogue = Conversation(Role.SOURCE)  # a source that ignores the credit
    rogue.send(Hello())
    rogue.receive(encode_frame(Hello(capabilities={"window": 1000})))
    rogue.send(MigrationMeta({}))
    rogue.send(IterationBegin(0))
    _, frame = rogue.send_change(0, bytes(20))
    with pytest.raises(errors.RemoteProtocolError, match="overruns the credit"):
        d.check_link(0, decode_frame(frame))
    assert d.credit.outstanding == 90


def test_credit_may_not_exceed_what_is_outstanding() -> None:
    s, d = iterating(window=100)
    change(s, d, 0, bytes(30))
    with pytest.raises(errors.LocalProtocolError, match="only 30 are outstanding"):
        d.send(Credit(31))
    with pytest.raises(errors.RemoteProtocolError, match="only 30 are outstanding"):
        s.receive(encode_frame(Credit(31)))


@settings(max_examples=200)
@given(window=st.integers(1, 500), ops=st.lists(
    st.one_of(st.tuples(st.just("send"), st.integers(0, 200)),
              st.tuples(st.just("grant"), st.integers(0, 100))), max_size=60))
def test_a_source_that_waits_for_credit_never_overruns(window: int,
                                                       ops: list[tuple[str, int]]) -> None:
    """Whatever the sizes and the order of grants: a source that sends only when
    ``may_send`` says so is never refused, and both sides agree on what is outstanding;
    one that sends anyway is refused by the destination."""
    s, d = iterating(window=window)
    consumed = 0
    for op, n in ops:
        if op == "send":
            if s.credit.may_send(n):
                change(s, d, 0, bytes(n))
                consumed += n
            else:
                with pytest.raises(errors.LocalProtocolError):
                    s.send_change(0, bytes(n))
                frame = encode_frame(Change(0, s.lane_counts(0)[0], bytes(n)))
                with pytest.raises(errors.RemoteProtocolError):
                    d.check_link(0, decode_frame(frame))
        elif consumed:
            amount = min(n, consumed)
            deliver(s, d, Credit(amount), from_source=False)
            consumed -= amount
        assert s.credit.outstanding == d.credit.outstanding == consumed


def test_changes_spread_over_lanes_with_sequences_per_lane() -> None:
    s, d = iterating(lanes=3)
    lanes = [change(s, d, 0, b"x") for _ in range(7)]
    assert lanes == [0, 1, 2, 0, 1, 2, 0]
    assert s.lane_counts(0) == (3, 2, 2)
    assert change(s, d, 0, b"y", lane=2) == 2
    assert s.lane_counts(0) == (3, 2, 3)
    with pytest.raises(errors.LocalProtocolError, match="no lane 3"):
        s.send_change(0, b"z", lane=3)
    with pytest.raises(errors.LocalProtocolError, match="lane counts differ"):
        s.send(IterationEnd(0, False, (3, 2, 2)))
    deliver(s, d, IterationEnd(0, False, s.lane_counts(0)))


@pytest.mark.parametrize(("setup", "index", "event", "message"), [
    ("iterating", 1, Hello(), "on lane 1, which carries CHANGE frames only"),
    ("iterating", 3, Change(0, 0, b""), "on lane 3, the session has 3"),
    ("source", 0, Change(0, 0, b""), "CHANGE on a connection that carries none"),
    ("iterating", 0, Change(0, 0, bytes(MAX_CHANGE + 1)), "more than"),
])
def test_link_rules(setup: str, index: int, event: object, message: str) -> None:
    s, d = iterating(lanes=3, window=1 << 30)
    receiver = s if setup == "source" else d
    with pytest.raises(errors.RemoteProtocolError, match=message):
        receiver.check_link(index, event)  # type: ignore[arg-type]


def test_change_only_inside_its_iteration() -> None:
    s, d = iterating()
    with pytest.raises(errors.LocalProtocolError, match="CHANGE of iteration 1"):
        s.send_change(1, b"x")
    with pytest.raises(errors.RemoteProtocolError, match="CHANGE of iteration 1"):
        d.receive_event(Change(1, 0, b"x"))
    deliver(s, d, IterationEnd(0, False, (0,)))
    with pytest.raises(errors.LocalProtocolError, match="not allowed in state"):
        s.send_change(0, b"x")
    with pytest.raises(errors.LocalProtocolError, match="only the source"):
        d.send_change(0, b"x")
    with pytest.raises(errors.LocalProtocolError, match="send_change"):
        s.send(Change(0, 0, b"x"))


@pytest.mark.parametrize("caps", [{"lanes": 0}, {"lanes": 17}, {"lanes": "2"}, {"lanes": True}])
def test_hello_lane_count_is_checked(caps: dict[str, object]) -> None:
    s, d = pair()
    with pytest.raises(errors.LocalProtocolError, match="lanes"):
        s.send(Hello(capabilities=caps))
    with pytest.raises(errors.RemoteProtocolError, match="lanes"):
        d.receive(encode_frame(Hello(capabilities=caps)))


@pytest.mark.parametrize("window", [0, -5, "big", 1.5])
def test_hello_window_is_checked(window: object) -> None:
    s, d = pair()
    deliver(s, d, Hello())
    with pytest.raises(errors.RemoteProtocolError, match="window"):
        s.receive(encode_frame(Hello(capabilities={"window": window})))
