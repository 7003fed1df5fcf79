"""Lanes: the preambles that open the control and lane connections, the keys and join
tags derived from the handshake, and the destination's merge of many lanes into one
logical order."""

from __future__ import annotations

import collections

import attrs

from ctlive.errors import (
    RemoteProtocolError,
)
from ctlive.protocol.frames import (
    Change,
    Event,
    IterationBegin,
    IterationEnd,
)
from ctlive.protocol.handshake import HandshakeResult

__all__ = [
    "LaneMerger",
    "join_tag",
    "lane_keys",
    "session_id",
]

CONTROL_MAGIC = b"CTL1"


LANE_MAGIC = b"CTLL"


CIPHER_IDS = {"AESGCM": 1, "ChaChaPoly": 2}


PATTERN_IDS = {"XX": 1, "IK": 2}


def lane_keys(hs: HandshakeResult, lane: int, initiator: bool) -> tuple[bytes, bytes]:
    i2r = hs.derive_key(b"ctlive lane %d initiator->responder" % lane)
    r2i = hs.derive_key(b"ctlive lane %d responder->initiator" % lane)
    return (i2r, r2i) if initiator else (r2i, i2r)


def session_id(hs: HandshakeResult) -> bytes:
    return hs.derive_key(b"ctlive session id")[:16]


def join_tag(hs: HandshakeResult, lane: int) -> bytes:
    return hs.derive_key(b"ctlive lane join %d" % lane)


class LaneMerger:
    """Destination side: puts CHANGE frames from many lanes and control frames from
    the control connection into the logical order ITERATION_BEGIN, that iteration's
    changes (any lane, arrival order), ITERATION_END, checking each lane's
    sequence and its count against ITERATION_END."""

    def __init__(self, nlanes: int) -> None:
        self.control: collections.deque[Event] = collections.deque()
        self.lanes: list[collections.deque[Change]] = [collections.deque() for _ in range(nlanes)]
        self.current: int | None = None
        self.counts: tuple[int, ...] | None = None
        self.got = [0] * nlanes
        self.end: IterationEnd | None = None
        self._rr = 0

    def pop(self) -> Event | None:
        while True:
            if self.current is not None:
                n = len(self.lanes)
                for k in range(n):
                    i = (self._rr + k) % n
                    lane = self.lanes[i]
                    if lane and lane[0].iteration == self.current:
                        ch = attrs.evolve(lane.popleft(), lane=i)
                        if ch.seq != self.got[i]:
                            raise RemoteProtocolError(
                                f"lane {i} sent change {ch.seq}, expected {self.got[i]}")
                        if self.counts is not None and self.got[i] >= self.counts[i]:
                            raise RemoteProtocolError(f"lane {i} sent more changes than announced")
                        self.got[i] += 1
                        self._rr = i + 1
                        return ch
                    if lane and lane[0].iteration < self.current:
                        raise RemoteProtocolError(f"lane {i} sent a change of a past iteration")
                if self.counts is not None:
                    if self.got == list(self.counts):
                        end, self.end = self.end, None
                        self.current = self.counts = None
                        assert end is not None
                        return end
                    for i, lane in enumerate(self.lanes):
                        if lane and self.got[i] < self.counts[i]:
                            raise RemoteProtocolError(
                                f"lane {i} moved on before sending its announced changes")
                    return None
            if not self.control:
                return None
            ev = self.control.popleft()
            if isinstance(ev, IterationBegin):
                self.current, self.counts, self.got = ev.index, None, [0] * len(self.lanes)
                return ev
            if isinstance(ev, IterationEnd) and self.current == ev.index:
                if len(ev.lane_counts) != len(self.lanes):
                    raise RemoteProtocolError(
                        f"iteration end names {len(ev.lane_counts)} lanes, the session has "
                        f"{len(self.lanes)}")
                self.counts, self.end = ev.lane_counts, ev
                continue
            return ev
