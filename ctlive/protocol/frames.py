"""The ctlive wire protocol's frame layer, sans-I/O: events, their codec, and the
fragmentation of change items into CHANGE payloads.

Design rules (h11-style):

1. One frame per record. A frame is ``u8 version, u8 type, body``. Control bodies
   are JSON objects; a CHANGE body is ``u32 iteration, u32 lane sequence`` then a
   payload of at most :data:`MAX_CHANGE` bytes.
2. A CHANGE payload is ``u8 fragment flag`` then bytes of one image-change item:
   WHOLE (0) carries a whole item; an item larger than one payload travels as MORE (1)
   fragments and a final LAST (2), all on one lane and in order, so a lane's
   fragments join without looking at other lanes. :class:`Reassembler` joins them
   with a size cap; every fragment rule is checked there.
3. Which frame may follow which, credit, and which connection may carry what are the
   conversation's rules (:mod:`ctlive.protocol.conversation`); lane order is
   :mod:`ctlive.protocol.lanes`'. This module only parses and builds.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from typing import Any

import attrs

from ctlive.errors import RemoteProtocolError

__all__ = [
    "MAX_CHANGE",
    "MAX_ITEM",
    "VERSION",
    "Abort",
    "Change",
    "Commit",
    "CommitAck",
    "Credit",
    "Error",
    "Event",
    "Fragment",
    "Hello",
    "IterationBegin",
    "IterationEnd",
    "MigrationMeta",
    "Outcome",
    "Preflight",
    "PreflightReply",
    "Ready",
    "Reassembler",
    "Resolve",
    "Role",
    "decode_frame",
    "encode_frame",
    "fragment",
]

VERSION = 1
MAX_CONTROL_BODY = 1 << 20
MAX_CHANGE = 1 << 20
"""Largest payload of one CHANGE frame, its fragment flag included."""
MAX_ITEM = 64 << 20
"""Default cap on one reassembled change item. The largest a source emits is a pages
window (4096 pages: about 16.1 MiB) or a file part (4 MiB); large files travel as
parts, so the receiver never holds more than this per lane."""


class Role(enum.Enum):
    """Which side of a migration a peer plays."""

    SOURCE = "source"
    DESTINATION = "destination"


@attrs.frozen
class Hello:
    """Session hello: protocol version and capabilities."""

    version: int = VERSION
    capabilities: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MigrationMeta:
    """What is migrated: workload kind, restore spec, image facts, migration id."""

    data: dict[str, Any]


@attrs.frozen
class IterationBegin:
    """Start of iteration ``index`` (0 = full image)."""

    index: int
    final: bool = False


@attrs.frozen
class Change:
    """One CHANGE payload (a fragment flag and an image-change item, or a fragment of
    one) of an iteration, sent on a lane.

    ``lane`` is filled in by the receiver (it is not on the wire)."""

    iteration: int
    seq: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    lane: int = attrs.field(default=0, eq=False)


@attrs.frozen
class IterationEnd:
    """End of an iteration: CHANGE frames per lane, and the source's figures."""

    index: int
    final: bool
    lane_counts: tuple[int, ...]
    stats: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Credit:
    """Receiver to sender: may send ``bytes`` more CHANGE payload."""

    bytes: int


@attrs.frozen
class Ready:
    """Destination rebuilt, verified and restored the workload stopped."""

    summary: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Commit:
    """Source killed its copy: destination, resume yours. Idempotent."""

    migration_id: str


@attrs.frozen
class CommitAck:
    """Destination resumed the workload."""

    migration_id: str
    summary: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Abort:
    """Source gives up before COMMIT; destination discards."""

    reason: str


@attrs.frozen
class Error:
    """Either side failed; the conversation ends."""

    code: str
    message: str


@attrs.frozen
class Resolve:
    """Source to destination, on a fresh session straight after HELLO: what became of
    ``migration_id``? With ``action`` "abort", discard it unless it was committed."""

    migration_id: str
    action: str = "query"
    """``query`` or ``abort``."""


@attrs.frozen
class Outcome:
    """Destination's answer to RESOLVE: its journal's state of the migration
    (``unknown`` when it never heard of it), after carrying out an abort."""

    migration_id: str
    state: str


@attrs.frozen
class Preflight:
    """Source to destination, after attestation and before MIGRATION_META: what a
    restore of this workload depends on (:mod:`ctlive.migration.preflight`)."""

    facts: dict[str, Any]


@attrs.frozen
class PreflightReply:
    """The destination's own facts (extensible: owners add keys) and its verdict,
    ``ok`` or ``refused``, with the differences it found."""

    facts: dict[str, Any]
    verdict: str
    differences: list[dict[str, Any]] = attrs.field(factory=list)


Event = (Hello | MigrationMeta | IterationBegin | Change | IterationEnd | Credit | Ready
         | Commit | CommitAck | Abort | Error | Resolve | Outcome | Preflight | PreflightReply)

_TYPES: dict[type[Any], int] = {
    Hello: 1, MigrationMeta: 2, IterationBegin: 3, Change: 4, IterationEnd: 5, Credit: 6,
    Ready: 7, Commit: 8, CommitAck: 9, Abort: 10, Error: 11, Resolve: 12, Outcome: 13,
    Preflight: 14, PreflightReply: 15,
}
_BY_CODE = {v: k for k, v in _TYPES.items()}
_CHANGE_HDR = struct.Struct(">II")


def encode_frame(event: Event) -> bytes:
    """Serialize one event."""
    code = _TYPES[type(event)]
    if isinstance(event, Change):
        return bytes([VERSION, code]) + _CHANGE_HDR.pack(event.iteration, event.seq) + event.data
    body = attrs.asdict(event)
    if isinstance(event, IterationEnd):
        body["lane_counts"] = list(event.lane_counts)
    return bytes([VERSION, code]) + json.dumps(body, separators=(",", ":")).encode()


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise RemoteProtocolError(f"frame field {name!r} is missing or has the wrong type")
    return value


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], what: str) -> str:
    value: str = _field(body, name, str)
    if value not in allowed:
        raise RemoteProtocolError(f"unknown {what} {value!r}")
    return value


def decode_frame(frame: bytes) -> Event:
    """Parse one frame; anything malformed is a RemoteProtocolError."""
    if len(frame) < 2:
        raise RemoteProtocolError("frame shorter than its header")
    version, code = frame[0], frame[1]
    if version != VERSION:
        raise RemoteProtocolError(f"peer speaks wire version {version}, we speak {VERSION}")
    cls = _BY_CODE.get(code)
    if cls is None:
        raise RemoteProtocolError(f"unknown frame type {code}")
    if cls is Change:
        if len(frame) < 2 + _CHANGE_HDR.size:
            raise RemoteProtocolError("CHANGE frame shorter than its header")
        it, seq = _CHANGE_HDR.unpack_from(frame, 2)
        return Change(it, seq, bytes(frame[2 + _CHANGE_HDR.size :]))
    if len(frame) > MAX_CONTROL_BODY:
        raise RemoteProtocolError("control frame too large")
    try:
        body = json.loads(frame[2:].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting bombs too
        raise RemoteProtocolError("control frame body is not JSON", cause=exc) from exc
    if not isinstance(body, dict):
        raise RemoteProtocolError("control frame body is not a JSON object")
    if cls is Hello:
        return Hello(_field(body, "version", int), _field(body, "capabilities", dict))
    if cls is MigrationMeta:
        return MigrationMeta(_field(body, "data", dict))
    if cls is IterationBegin:
        return IterationBegin(nonneg(_field(body, "index", int)), _field(body, "final", bool))
    if cls is IterationEnd:
        counts = _field(body, "lane_counts", list)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise RemoteProtocolError("lane_counts must be non-negative integers")
        return IterationEnd(nonneg(_field(body, "index", int)), _field(body, "final", bool),
                            tuple(counts), _field(body, "stats", dict))
    if cls is Credit:
        return Credit(nonneg(_field(body, "bytes", int)))
    if cls is Ready:
        return Ready(_field(body, "summary", dict))
    if cls is Commit:
        return Commit(_field(body, "migration_id", str))
    if cls is CommitAck:
        return CommitAck(_field(body, "migration_id", str), _field(body, "summary", dict))
    if cls is Abort:
        return Abort(_field(body, "reason", str))
    if cls is Resolve:
        action = _choice(body, "action", ("query", "abort"), "RESOLVE action")
        return Resolve(_field(body, "migration_id", str), action)
    if cls is Outcome:
        return Outcome(_field(body, "migration_id", str), _field(body, "state", str))
    if cls is Preflight:
        return Preflight(_field(body, "facts", dict))
    if cls is PreflightReply:
        verdict = _choice(body, "verdict", ("ok", "refused"), "PREFLIGHT_REPLY verdict")
        return PreflightReply(_field(body, "facts", dict), verdict,
                              _field(body, "differences", list))
    return Error(_field(body, "code", str), _field(body, "message", str))


def nonneg(value: int) -> int:
    """A count or index from the peer, which must not be negative."""
    if value < 0:
        raise RemoteProtocolError(f"negative value {value} in a frame")
    return value


class Fragment(enum.IntEnum):
    """The first byte of every CHANGE payload."""

    WHOLE = 0
    """The payload holds one whole item."""
    MORE = 1
    """A fragment of an item; more follow on the same lane."""
    LAST = 2
    """The item's last fragment."""


def fragment(item: bytes, max_payload: int = MAX_CHANGE) -> Iterator[bytes]:
    """The CHANGE payloads that carry ``item``, each at most ``max_payload`` bytes. The
    caller sends them all on one lane, in order."""
    room = max_payload - 1
    if room < 1:
        raise ValueError("a CHANGE payload needs room for its flag and one byte")
    if len(item) <= room:
        yield bytes([Fragment.WHOLE]) + item
        return
    view = memoryview(item)
    for off in range(0, len(item), room):
        flag = Fragment.LAST if off + room >= len(item) else Fragment.MORE
        yield bytes([flag]) + view[off : off + room]


class Reassembler:
    """Joins each lane's fragments back into items (destination side).

    Rules: an empty payload, an unknown flag, a WHOLE item inside a fragmented one, an
    item larger than ``max_item`` bytes, and an iteration that ends with an item half
    done are each a :class:`~ctlive.errors.RemoteProtocolError`. Memory held is the
    unfinished items, at most ``max_item`` per lane.
    """

    def __init__(self, max_item: int = MAX_ITEM) -> None:
        self.max_item = max_item
        self._partial: dict[int, bytearray] = {}

    @property
    def pending_bytes(self) -> int:
        """Bytes of unfinished items held."""
        return sum(len(b) for b in self._partial.values())

    def feed(self, lane: int, payload: bytes) -> bytes | None:
        """Take one CHANGE payload from ``lane``; returns an item once it is whole."""
        if not payload:
            raise RemoteProtocolError("empty CHANGE payload")
        flag, body = payload[0], payload[1:]
        buf = self._partial.get(lane)
        if flag == Fragment.WHOLE:
            if buf is not None:
                raise RemoteProtocolError(f"lane {lane}: a whole item inside a fragmented one")
            if len(body) > self.max_item:
                raise RemoteProtocolError(f"lane {lane}: item larger than {self.max_item} bytes")
            return body
        if flag not in (Fragment.MORE, Fragment.LAST):
            raise RemoteProtocolError(f"lane {lane}: unknown fragment flag {flag}")
        if buf is None:
            buf = self._partial[lane] = bytearray()
        if len(buf) + len(body) > self.max_item:
            raise RemoteProtocolError(
                f"lane {lane}: fragmented item larger than {self.max_item} bytes")
        buf += body
        if flag == Fragment.LAST:
            del self._partial[lane]
            return bytes(buf)
        return None

    def end_iteration(self) -> None:
        """The iteration ended: no item may be left half done."""
        if self._partial:
            lanes = sorted(self._partial)
            self._partial.clear()
            raise RemoteProtocolError(
                f"the iteration ended inside a fragmented item (lanes {lanes})")
