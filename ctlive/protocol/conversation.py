"""The conversation's rules, sans-I/O: every rule on which frame may follow which, on
which connection it may travel, and how much CHANGE payload may be in flight, lives in
this module.

Design rules (h11-style):

1. Both peers run the same :class:`Conversation`, which tracks the whole exchange, not
   one side of it. Every frame is checked against :data:`_TABLE` before it is sent (a
   violation is our bug: :class:`~ctlive.errors.LocalProtocolError`) and when it is
   received (the peer's: :class:`~ctlive.errors.RemoteProtocolError`).
2. The control connection (lane 0) carries every frame; lanes 1..N-1 carry CHANGE
   frames only, and only from the source (:meth:`Conversation.check_link`).
   ITERATION_END tells the receiver how many CHANGE frames each lane carried, so lanes
   need no order against the control connection, only within themselves
   (:mod:`ctlive.protocol.lanes` merges them).
3. Credit: the destination's HELLO announces a window; the source may send a CHANGE of
   n payload bytes only while ``outstanding + n <= window``, or when nothing is
   outstanding (so one frame larger than a small window still moves). CREDIT returns
   bytes the destination has consumed, never more than are outstanding. Both sides
   account with the same :class:`CreditWindow`: the source when it sends, the
   destination when a CHANGE arrives, before it is buffered, so a source that overruns
   its credit is cut off before its bytes take memory.
4. The source's HELLO names the number of lanes (1..16); CHANGE frames carry
   consecutive sequence numbers per lane and iteration, and only inside an iteration.
5. ERROR may be sent by either side at any time and ends the conversation. ABORT ends
   it from the source before COMMIT; after COMMIT there is no abort, only a retried
   COMMIT (see the two-phase commit section of docs/protocol.md).
"""

from __future__ import annotations

import enum
from typing import Any

from ctlive.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ctlive.protocol.frames import (
    MAX_CHANGE,
    Abort,
    Change,
    Commit,
    CommitAck,
    Credit,
    Error,
    Event,
    Hello,
    IterationBegin,
    IterationEnd,
    MigrationMeta,
    Outcome,
    Preflight,
    PreflightReply,
    Ready,
    Resolve,
    Role,
    decode_frame,
    encode_frame,
)

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_LANES",
    "Conversation",
    "CreditWindow",
    "State",
]

DEFAULT_WINDOW = 64 << 20
"""Bytes of CHANGE payload a source may have outstanding unless the destination says."""
MAX_LANES = 16

_Error = type[ProtocolError]


class State(enum.Enum):
    """Where the conversation is."""

    START = "start"
    HELLO_SENT = "hello-sent"
    AWAIT_META = "await-meta"
    PREFLIGHT = "preflight"
    BETWEEN_ITERATIONS = "between-iterations"
    IN_ITERATION = "in-iteration"
    AWAIT_READY = "await-ready"
    READY = "ready"
    COMMITTING = "committing"
    DONE = "done"
    RESOLVING = "resolving"
    ABORTED = "aborted"
    FAILED = "failed"


S, D = Role.SOURCE, Role.DESTINATION
_FLOW = (State.BETWEEN_ITERATIONS, State.IN_ITERATION, State.AWAIT_READY)

# (state, sender, event type) -> next state. CREDIT keeps the state; CHANGE is allowed
# only in IN_ITERATION and keeps it (checked in _step, with its iteration).
_TABLE: dict[tuple[State, Role, type[Any]], State] = {
    (State.START, S, Hello): State.HELLO_SENT,
    (State.HELLO_SENT, D, Hello): State.AWAIT_META,
    (State.AWAIT_META, S, MigrationMeta): State.BETWEEN_ITERATIONS,
    # The preflight, once, before META: the source's facts, the destination's answer.
    (State.AWAIT_META, S, Preflight): State.PREFLIGHT,
    (State.PREFLIGHT, D, PreflightReply): State.AWAIT_META,
    (State.BETWEEN_ITERATIONS, S, IterationBegin): State.IN_ITERATION,
    (State.IN_ITERATION, S, Change): State.IN_ITERATION,
    (State.IN_ITERATION, S, IterationEnd): State.BETWEEN_ITERATIONS,  # final: AWAIT_READY
    (State.AWAIT_READY, D, Ready): State.READY,
    (State.READY, S, Commit): State.COMMITTING,
    # A source that lost its session after killing its copy reconnects and repeats
    # COMMIT straight after HELLO; the destination answers from its pending table.
    (State.AWAIT_META, S, Commit): State.COMMITTING,
    (State.COMMITTING, S, Commit): State.COMMITTING,  # a retried COMMIT is idempotent
    (State.COMMITTING, D, CommitAck): State.DONE,
    (State.COMMITTING, D, Error): State.FAILED,
    (State.DONE, S, Commit): State.DONE,  # retry after a lost ACK
    (State.DONE, D, CommitAck): State.DONE,
    # In-doubt resolution on a fresh session: what became of a migration (and, with
    # action "abort", discard it unless committed).
    (State.AWAIT_META, S, Resolve): State.RESOLVING,
    (State.RESOLVING, D, Outcome): State.DONE,
}
for _st in _FLOW:
    _TABLE[(_st, D, Credit)] = _st
for _st in (State.HELLO_SENT, State.AWAIT_META, State.PREFLIGHT, *_FLOW, State.READY):
    _TABLE[(_st, S, Abort)] = State.ABORTED


class CreditWindow:
    """CHANGE payload bytes in flight against the destination's window (rule 3)."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self.outstanding = 0
        """Bytes sent (source) or arrived (destination) and not yet credited back."""

    @property
    def available(self) -> int:
        """Bytes that may still be sent before credit comes back (negative after one
        frame larger than the window)."""
        return self.window - self.outstanding

    def may_send(self, nbytes: int) -> bool:
        """Whether a CHANGE of ``nbytes`` payload fits now."""
        return self.outstanding == 0 or self.outstanding + nbytes <= self.window

    def take(self, nbytes: int, error: _Error) -> None:
        """Account a CHANGE of ``nbytes``; ``error`` if it overruns the credit."""
        if not self.may_send(nbytes):
            raise error(f"a CHANGE of {nbytes} bytes overruns the credit: {self.outstanding} "
                        f"of {self.window} bytes are outstanding")
        self.outstanding += nbytes

    def give(self, nbytes: int, error: _Error) -> None:
        """Account a CREDIT of ``nbytes``; ``error`` if more than is outstanding."""
        if nbytes > self.outstanding:
            raise error(f"CREDIT of {nbytes} bytes, but only {self.outstanding} are "
                        "outstanding")
        self.outstanding -= nbytes


def _count(value: Any, name: str, lo: int, hi: int, error: _Error) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise error(f"HELLO: {name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


class Conversation:
    """Tracks one migration's conversation for the given local role."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.START
        self.iteration = -1
        self.final_sent = False
        self.lanes = 1
        """Connections CHANGE frames are spread over (the source's HELLO)."""
        self.credit = CreditWindow()
        """The window (the destination's HELLO) and what is outstanding against it."""
        self._counts: dict[int, list[int]] = {}
        self._next_lane = 0
        self._preflighted = False

    @property
    def peer(self) -> Role:
        """The other side's role."""
        return Role.DESTINATION if self.role is Role.SOURCE else Role.SOURCE

    def _step(self, sender: Role, event: Event, error: _Error) -> None:
        if isinstance(event, Error):
            self.state = State.FAILED
            return
        nxt = _TABLE.get((self.state, sender, type(event)))
        if nxt is None:
            raise error(
                f"{type(event).__name__} from the {sender.value} is not allowed in state "
                f"{self.state.value}")
        if isinstance(event, Hello):
            if sender is Role.SOURCE:
                self.lanes = _count(event.capabilities.get("lanes", 1), "lanes", 1, MAX_LANES,
                                    error)
            else:
                self.credit = CreditWindow(_count(
                    event.capabilities.get("window", DEFAULT_WINDOW), "window", 1, 1 << 40,
                    error))
        elif isinstance(event, Preflight):
            if self._preflighted:
                raise error("a second PREFLIGHT in one session")
            self._preflighted = True
        elif isinstance(event, Change):
            if event.iteration != self.iteration:
                raise error(f"CHANGE of iteration {event.iteration} inside iteration "
                            f"{self.iteration}")
        elif isinstance(event, Credit):
            self.credit.give(event.bytes, error)
        elif isinstance(event, IterationBegin):
            if event.index != self.iteration + 1:
                raise error(f"iteration {event.index} follows iteration {self.iteration}")
            self.iteration = event.index
            self.final_sent = event.final
        elif isinstance(event, IterationEnd):
            if event.index != self.iteration:
                raise error(f"end of iteration {event.index} inside iteration {self.iteration}")
            if event.final != self.final_sent:
                raise error("IterationEnd.final differs from its IterationBegin")
            if len(event.lane_counts) != self.lanes:
                raise error(f"iteration end names {len(event.lane_counts)} lanes, the session "
                            f"has {self.lanes}")
            if sender is self.role and list(event.lane_counts) != self._counts.get(
                    event.index, [0] * self.lanes):
                raise error("iteration end's lane counts differ from the CHANGE frames sent")
            if event.final:
                nxt = State.AWAIT_READY
        self.state = nxt

    # -- control frames --------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Check that we may send ``event`` now (any frame but CHANGE); return its frame."""
        if isinstance(event, Change):
            raise LocalProtocolError("CHANGE frames are sent with send_change()")
        self._step(self.role, event, LocalProtocolError)
        return encode_frame(event)

    def receive(self, frame: bytes) -> Event:
        """Parse and check a frame from the peer."""
        return self.receive_event(decode_frame(frame))

    def receive_event(self, event: Event) -> Event:
        """Check an already decoded event from the peer, in logical order (CHANGE frames
        after their iteration's BEGIN: :class:`~ctlive.protocol.lanes.LaneMerger`)."""
        self._step(self.peer, event, RemoteProtocolError)
        return event

    # -- CHANGE frames and lanes -----------------------------------------------------------

    def send_change(self, iteration: int, payload: bytes,
                    lane: int | None = None) -> tuple[int, bytes]:
        """Source: check and account one CHANGE payload of ``iteration``; returns the lane
        it goes on (round-robin when ``lane`` is None) and its frame. Check
        ``credit.may_send(len(payload))`` first to wait instead of failing."""
        if self.role is not Role.SOURCE:
            raise LocalProtocolError("only the source sends CHANGE frames")
        if len(payload) > MAX_CHANGE:
            raise LocalProtocolError(f"a CHANGE carries at most {MAX_CHANGE} bytes")
        if lane is None:
            lane = self._next_lane
            self._next_lane = (lane + 1) % self.lanes
        elif not 0 <= lane < self.lanes:
            raise LocalProtocolError(f"no lane {lane} (the session has {self.lanes})")
        counts = self._counts.setdefault(iteration, [0] * self.lanes)
        change = Change(iteration, counts[lane], payload)
        self._step(self.role, change, LocalProtocolError)
        self.credit.take(len(payload), LocalProtocolError)
        counts[lane] += 1
        return lane, encode_frame(change)

    def lane_counts(self, iteration: int) -> tuple[int, ...]:
        """How many CHANGE frames each lane carried in ``iteration`` (sent so far)."""
        return tuple(self._counts.get(iteration, [0] * self.lanes))

    def check_link(self, index: int, event: Event) -> None:
        """A frame from the peer arrived on connection ``index`` (0: control): CHANGE
        only from the source, on any lane; every other frame on the control connection.
        An arriving CHANGE is accounted against the credit here, before it is held."""
        if not 0 <= index < self.lanes:
            raise RemoteProtocolError(f"a frame on lane {index}, the session has {self.lanes}")
        if isinstance(event, Change):
            if self.peer is not Role.SOURCE:
                raise RemoteProtocolError("CHANGE on a connection that carries none")
            if len(event.data) > MAX_CHANGE:
                raise RemoteProtocolError(f"a CHANGE of {len(event.data)} bytes, more than "
                                          f"{MAX_CHANGE}")
            self.credit.take(len(event.data), RemoteProtocolError)
        elif index != 0:
            raise RemoteProtocolError(f"{type(event).__name__} on lane {index}, which carries "
                                      "CHANGE frames only")
