"""The change items of an image stream (files whole, as zstd deltas or unchanged; page
windows; the manifest) and their hostile-input-safe codec."""

from __future__ import annotations

import enum
import re
import struct

import attrs

from ctlive.errors import DeltaFormatError

__all__ = [
    "MAX_ZDELTA_BASE",
    "ChangeItem",
    "ChangeKind",
    "decode_change",
    "encode_change",
    "safe_name",
]


class ChangeKind(enum.IntEnum):
    """What a change item carries; the values are the wire's kind byte."""

    FILE_WHOLE = 1
    """A file, zstd-compressed (``size`` = its uncompressed size)."""
    FILE_ZDELTA = 2
    """A file, as a zstd delta with its old version as dictionary (``size`` as above)."""
    FILE_SAME = 3
    """A file equal to its old version."""
    PAGES = 4
    """A window of a pages file: zstd of a page-record stream."""
    MANIFEST = 5
    """The manifest of the new dump (JSON); the last item of a stream."""


_SIZED = (ChangeKind.FILE_WHOLE, ChangeKind.FILE_ZDELTA)

MAX_ZDELTA_BASE = 8 << 20
"""Largest old file a FILE_ZDELTA may use as its dictionary, bytes: the receiver holds
the dictionary in memory, so the diff sends larger files whole and the rebuilder
refuses a delta against a larger old file."""


# kind, name length, size or first page, page count, data length
_HDR = struct.Struct("<BHQQI")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


@attrs.frozen
class ChangeItem:
    """One item of a change stream (not to be confused with the wire's ``Change``
    frame, which carries items or fragments of them).

    Which of ``size``, ``first_page`` and ``page_count`` mean anything depends on
    ``kind`` (see :class:`ChangeKind`); the others are 0.
    """

    kind: ChangeKind
    name: str
    """The file's name in the dump directory ("" for the manifest)."""
    size: int = 0
    """FILE_WHOLE, FILE_ZDELTA: the file's uncompressed size."""
    first_page: int = 0
    """PAGES: index of the window's first page in the new pages file."""
    page_count: int = 0
    """PAGES: how many pages the window holds."""
    data: bytes = attrs.field(default=b"", repr=lambda d: f"<{len(d)} bytes>")


def safe_name(name: str) -> str:
    """``name`` if it is a plain file name (no path, no dot names); else DeltaFormatError."""
    if not _NAME.match(name) or name in (".", ".."):
        raise DeltaFormatError(f"unsafe file name in change stream: {name!r}")
    return name


def encode_change(c: ChangeItem) -> bytes:
    """Serialize one change item."""
    name = c.name.encode()
    pages = c.kind == ChangeKind.PAGES
    return _HDR.pack(c.kind, len(name), c.first_page if pages else c.size,
                     c.page_count if pages else 0, len(c.data)) + name + c.data


def decode_change(buf: bytes) -> ChangeItem:
    """Parse one change item from a peer; hostile-input safe."""
    if len(buf) < _HDR.size:
        raise DeltaFormatError("change item shorter than its header", offset=0)
    raw_kind, nlen, a, b, dlen = _HDR.unpack_from(buf, 0)
    try:
        kind = ChangeKind(raw_kind)
    except ValueError:
        raise DeltaFormatError(f"unknown change kind {raw_kind}", offset=0) from None
    if _HDR.size + nlen + dlen != len(buf):
        raise DeltaFormatError("change item length does not match its header", offset=0)
    if kind != ChangeKind.PAGES and (b or (a and kind not in _SIZED)):
        raise DeltaFormatError(f"{kind.name} item with header fields it does not use", offset=0)
    try:
        name = buf[_HDR.size : _HDR.size + nlen].decode()
    except UnicodeDecodeError as exc:
        raise DeltaFormatError("change item name is not UTF-8", cause=exc) from exc
    if kind != ChangeKind.MANIFEST:
        safe_name(name)
    data = bytes(buf[_HDR.size + nlen :])
    if kind == ChangeKind.PAGES:
        return ChangeItem(kind, name, first_page=a, page_count=b, data=data)
    return ChangeItem(kind, name, size=a, data=data)
