"""Lanes, sans-I/O: the preambles that open the control and lane connections, the keys
and join tags derived from the handshake, and the destination's merge of many lanes into
one logical order.

Connection preambles (the first bytes of a TCP connection, before any record)::

    control connection:  b"CTL1" cipher-id(u8) pattern-id(u8)
    lane connection i:   b"CTLL" session-id(16) lane(u8) join-tag(32)

Lane keys, the session id and the join tag come from the handshake's chaining key
(``HandshakeResult.derive_key``), so a lane can be neither joined nor read without the
session. Lane 0 is the control connection itself.
"""

from __future__ import annotations

import collections
import hmac

import attrs

from ctlive.errors import HandshakeError, RemoteProtocolError
from ctlive.protocol.frames import Change, Event, IterationBegin, IterationEnd
from ctlive.protocol.handshake import Cipher, HandshakeResult

__all__ = [
    "CIPHER_IDS",
    "CONTROL_MAGIC",
    "LANE_MAGIC",
    "LANE_PREAMBLE_SIZE",
    "PATTERN_IDS",
    "PREAMBLE_PREFIX",
    "LaneMerger",
    "check_join",
    "control_preamble",
    "join_tag",
    "lane_keys",
    "lane_preamble",
    "parse_control_preamble",
    "parse_lane_preamble",
    "session_id",
]

CONTROL_MAGIC = b"CTL1"
LANE_MAGIC = b"CTLL"
CIPHER_IDS: dict[Cipher, int] = {"AESGCM": 1, "ChaChaPoly": 2}
PATTERN_IDS = {"XX": 1}
PREAMBLE_PREFIX = 6
"""Bytes a server reads first: enough for a control preamble, and to tell a lane's."""
LANE_PREAMBLE_SIZE = 4 + 16 + 1 + 32


def control_preamble(cipher: Cipher) -> bytes:
    """The first bytes of a control connection."""
    return CONTROL_MAGIC + bytes([CIPHER_IDS[cipher], PATTERN_IDS["XX"]])


def parse_control_preamble(data: bytes) -> Cipher:
    """The cipher a control preamble asks for; HandshakeError if unsupported."""
    ids = {v: k for k, v in CIPHER_IDS.items()}
    if len(data) != PREAMBLE_PREFIX or data[:4] != CONTROL_MAGIC:
        raise HandshakeError("not a ctlive control connection")
    if data[4] not in ids or data[5] != PATTERN_IDS["XX"]:
        raise HandshakeError("unsupported cipher or pattern requested")
    return ids[data[4]]


def lane_keys(hs: HandshakeResult, lane: int, initiator: bool) -> tuple[bytes, bytes]:
    """(send key, receive key) of lane ``lane`` for the initiator or the responder."""
    i2r = hs.derive_key(b"ctlive lane %d initiator->responder" % lane)
    r2i = hs.derive_key(b"ctlive lane %d responder->initiator" % lane)
    return (i2r, r2i) if initiator else (r2i, i2r)


def session_id(hs: HandshakeResult) -> bytes:
    """The 16-byte id a lane preamble names its session by."""
    return hs.derive_key(b"ctlive session id")[:16]


def join_tag(hs: HandshakeResult, lane: int) -> bytes:
    """The 32-byte tag that proves a lane belongs to the session."""
    return hs.derive_key(b"ctlive lane join %d" % lane)


def lane_preamble(hs: HandshakeResult, lane: int) -> bytes:
    """The first bytes of lane connection ``lane`` (1..N-1)."""
    return LANE_MAGIC + session_id(hs) + bytes([lane]) + join_tag(hs, lane)


def parse_lane_preamble(data: bytes) -> tuple[bytes, int, bytes]:
    """(session id, lane, join tag) of a lane preamble."""
    if len(data) != LANE_PREAMBLE_SIZE or data[:4] != LANE_MAGIC:
        raise RemoteProtocolError("malformed lane preamble")
    return bytes(data[4:20]), data[20], bytes(data[21:53])


def check_join(hs: HandshakeResult, lane: int, tag: bytes, lanes: int,
               joined: set[int]) -> None:
    """A lane may join its session once, with an index inside the session's lane count
    (0 is the control connection) and the tag only the session can compute."""
    if not 1 <= lane < lanes or lane in joined or not hmac.compare_digest(
            tag, join_tag(hs, lane)):
        raise RemoteProtocolError("invalid lane join")


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
        """The next event in logical order, or None until more frames arrive; raises
        :class:`~ctlive.errors.RemoteProtocolError` when a lane breaks its order."""
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
                        for i, lane in enumerate(self.lanes):
                            if lane and lane[0].iteration == self.current:
                                raise RemoteProtocolError(
                                    f"lane {i} sent more changes than announced")
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
                for i, (got, want) in enumerate(zip(self.got, ev.lane_counts, strict=True)):
                    if got > want:
                        raise RemoteProtocolError(f"lane {i} sent more changes than announced")
                self.counts, self.end = ev.lane_counts, ev
                continue
            return ev
