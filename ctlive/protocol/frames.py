"""The ctlive wire protocol: frames and the conversation's state machine, sans-I/O.

Design rules (h11-style):

1. One frame per record. A frame is ``u8 version, u8 type, body``. Control bodies
   are JSON objects; a CHANGE body is ``u32 iteration, u32 lane sequence`` then the
   opaque bytes of one image-change item.
2. Both peers run the same :class:`Conversation`, which tracks the whole exchange,
   not one side of it. Every frame is checked against the transition table
   before it is sent (a violation is our bug: LocalProtocolError) and when it is
   received (the peer's: RemoteProtocolError).
3. The control connection carries every frame but CHANGE. CHANGE frames travel on
   lanes; ITERATION_END tells the receiver how many CHANGE frames each lane
   carried for that iteration, so lanes need no ordering against the control
   connection, only within themselves.
4. ERROR may be sent by either side at any time and ends the conversation.
   ABORT ends it from the source before COMMIT; after COMMIT there is no abort,
   only a retried COMMIT (see the two-phase commit section of docs/protocol.md).
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

import attrs

from ctlive.errors import RemoteProtocolError

__all__ = [
    "VERSION",
    "Abort",
    "Change",
    "Commit",
    "CommitAck",
    "Credit",
    "Error",
    "Event",
    "Hello",
    "IterationBegin",
    "IterationEnd",
    "MigrationMeta",
    "Ready",
    "Role",
    "decode_frame",
    "encode_frame",
]

VERSION = 1
MAX_CONTROL_BODY = 1 << 20


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
    """One image-change item (or a fragment of one) of an iteration, sent on a lane.

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


Event = (Hello | MigrationMeta | IterationBegin | Change | IterationEnd | Credit | Ready
         | Commit | CommitAck | Abort | Error)

_TYPES: dict[type[Any], int] = {
    Hello: 1, MigrationMeta: 2, IterationBegin: 3, Change: 4, IterationEnd: 5, Credit: 6,
    Ready: 7, Commit: 8, CommitAck: 9, Abort: 10, Error: 11,
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
    except (UnicodeDecodeError, ValueError) as exc:
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
    return Error(_field(body, "code", str), _field(body, "message", str))


def nonneg(value: int) -> int:
    """A count or index from the peer, which must not be negative."""
    if value < 0:
        raise RemoteProtocolError(f"negative value {value} in a frame")
    return value


