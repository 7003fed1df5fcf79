"""The conversation's state machine: every rule on which frame may follow which lives
in the transition table here."""

from __future__ import annotations

import enum
from typing import Any

from ctlive.errors import LocalProtocolError, RemoteProtocolError
from ctlive.protocol.frames import (
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
    Ready,
    Role,
    decode_frame,
    encode_frame,
)

__all__ = [
    "Conversation",
    "State",
]


class State(enum.Enum):
    """Where the conversation is."""

    START = "start"
    HELLO_SENT = "hello-sent"
    AWAIT_META = "await-meta"
    BETWEEN_ITERATIONS = "between-iterations"
    IN_ITERATION = "in-iteration"
    AWAIT_READY = "await-ready"
    READY = "ready"
    COMMITTING = "committing"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


S, D = Role.SOURCE, Role.DESTINATION


_FLOW = (State.BETWEEN_ITERATIONS, State.IN_ITERATION, State.AWAIT_READY)


# (state, sender, event type) -> next state. CREDIT keeps the state.
_TABLE: dict[tuple[State, Role, type[Any]], State] = {
    (State.START, S, Hello): State.HELLO_SENT,
    (State.HELLO_SENT, D, Hello): State.AWAIT_META,
    (State.AWAIT_META, S, MigrationMeta): State.BETWEEN_ITERATIONS,
    (State.BETWEEN_ITERATIONS, S, IterationBegin): State.IN_ITERATION,
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
}


for _st in _FLOW:
    _TABLE[(_st, D, Credit)] = _st


for _st in (State.HELLO_SENT, State.AWAIT_META, *_FLOW, State.READY):
    _TABLE[(_st, S, Abort)] = State.ABORTED


class Conversation:
    """Tracks one migration's control conversation for the given local role."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.START
        self.iteration = -1
        self.final_sent = False

    def _step(self, sender: Role, event: Event, error: type[Exception]) -> None:
        if isinstance(event, Error):
            self.state = State.FAILED
            return
        if isinstance(event, Change):
            # CHANGE frames are checked per lane by the receiver against lane_counts.
            if self.state not in (State.IN_ITERATION, State.BETWEEN_ITERATIONS,
                                  State.AWAIT_READY) or sender is not Role.SOURCE:
                raise error(f"CHANGE from the {sender.value} in state {self.state.value}")
            return
        nxt = _TABLE.get((self.state, sender, type(event)))
        if nxt is None:
            raise error(
                f"{type(event).__name__} from the {sender.value} is not allowed in state "
                f"{self.state.value}")
        if isinstance(event, IterationBegin):
            if event.index != self.iteration + 1:
                raise error(f"iteration {event.index} follows iteration {self.iteration}")
            self.iteration = event.index
            self.final_sent = event.final
        if isinstance(event, IterationEnd):
            if event.index != self.iteration:
                raise error(f"end of iteration {event.index} inside iteration {self.iteration}")
            if event.final != self.final_sent:
                raise error("IterationEnd.final differs from its IterationBegin")
            if event.final:
                nxt = State.AWAIT_READY
        self.state = nxt

    def send(self, event: Event) -> bytes:
        """Check that we may send ``event`` now; return its frame."""
        self._step(self.role, event, LocalProtocolError)
        return encode_frame(event)

    def receive(self, frame: bytes) -> Event:
        """Parse and check a frame from the peer."""
        return self.receive_event(decode_frame(frame))

    def receive_event(self, event: Event) -> Event:
        """Check an already decoded event from the peer."""
        peer = Role.DESTINATION if self.role is Role.SOURCE else Role.SOURCE
        self._step(peer, event, RemoteProtocolError)
        return event
