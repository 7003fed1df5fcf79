"""The change items of an image stream (files whole, in parts, as zstd deltas or
unchanged; page windows; the manifest) and their hostile-input-safe codec."""

from __future__ import annotations

import enum
import re
import struct

import attrs
import zstandard

from ctlive.errors import DeltaFormatError

__all__ = [
    "MAX_FILE",
    "MAX_PART",
    "MAX_ZDELTA_BASE",
    "ChangeItem",
    "ChangeKind",
    "check_part",
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
    FILE_PART = 6
    """A part of a large file: one zstd frame, declaring its content size, of the
    bytes at ``offset`` (``size`` = the whole file's uncompressed size). A file's parts
    are independent and may arrive in any order."""
    TREE_BLOB = 7
    """A part of a carried file's data (its data extents, concatenated), named by the
    hex BLAKE2b-256 of all of it: one zstd frame of the bytes at ``offset`` (``size`` =
    the whole blob's length), as FILE_PART (:mod:`ctlive.images.tree`)."""
    TREE_MANIFEST = 8
    """Every entry of one carried tree (``name`` = its label), zstd JSON; one per tree
    per iteration (:mod:`ctlive.images.tree`)."""


# Header fields each kind uses: the first u64, the second.
_USES_A = (ChangeKind.FILE_WHOLE, ChangeKind.FILE_ZDELTA, ChangeKind.PAGES, ChangeKind.FILE_PART,
           ChangeKind.TREE_BLOB)
_USES_B = (ChangeKind.PAGES, ChangeKind.FILE_PART, ChangeKind.TREE_BLOB)

MAX_FILE = 1 << 30
"""Largest non-page file a change stream may declare, bytes."""

MAX_PART = 4 << 20
"""Largest part of a FILE_PART item (uncompressed), bytes; its zstd data may be at
most the compression bound of that (incompressible data, stored raw)."""

_PARTS = (ChangeKind.FILE_PART, ChangeKind.TREE_BLOB)

_MAX_PART_DATA = MAX_PART + (MAX_PART >> 8) + 64

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

    Which of ``size``, ``first_page``, ``page_count`` and ``offset`` mean anything
    depends on ``kind`` (see :class:`ChangeKind`); the others are 0. On the wire the
    header's first u64 is ``first_page`` for PAGES, else ``size``; the second is
    ``page_count`` for PAGES, ``offset`` for FILE_PART, else 0.
    """

    kind: ChangeKind
    name: str
    """The file's name in the dump directory ("" for the manifest)."""
    size: int = 0
    """FILE_WHOLE, FILE_ZDELTA: the file's uncompressed size; FILE_PART: the whole
    file's."""
    first_page: int = 0
    """PAGES: index of the window's first page in the new pages file."""
    page_count: int = 0
    """PAGES: how many pages the window holds."""
    offset: int = 0
    """FILE_PART: where the part's bytes start in the file."""
    data: bytes = attrs.field(default=b"", repr=lambda d: f"<{len(d)} bytes>")


def safe_name(name: str) -> str:
    """``name`` if it is a plain file name (no path, no dot names); else DeltaFormatError."""
    if not _NAME.match(name) or name in (".", ".."):
        raise DeltaFormatError(f"unsafe file name in change stream: {name!r}")
    return name


def check_part(c: ChangeItem) -> int:
    """The length of FILE_PART item ``c``'s part, as its zstd frame header declares
    it, once the part is known to fit: a declared file size of at most ``MAX_FILE``,
    a part of 1 to ``MAX_PART`` bytes (zstd data within its compression bound) that
    ends within the file. Anything else is a DeltaFormatError."""
    where = f"{c.name}: part at {c.offset}"
    if c.size > MAX_FILE:
        raise DeltaFormatError(f"{where}: declared file size {c.size} above {MAX_FILE}")
    if len(c.data) > _MAX_PART_DATA:
        raise DeltaFormatError(f"{where}: {len(c.data)} bytes of zstd data, more than a "
                               f"part of {MAX_PART} bytes needs")
    try:
        length = zstandard.get_frame_parameters(c.data).content_size
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"{where}: not a zstd frame ({exc})", cause=exc) from exc
    if length in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise DeltaFormatError(f"{where}: its zstd frame does not declare its size")
    if not 0 < length <= MAX_PART:
        raise DeltaFormatError(f"{where}: a part of {length} bytes (1 to {MAX_PART} allowed)")
    if c.offset + length > c.size:
        raise DeltaFormatError(
            f"{where}: {length} bytes end past the file's declared {c.size} bytes")
    return int(length)


def encode_change(c: ChangeItem) -> bytes:
    """Serialize one change item."""
    name = c.name.encode()
    pages = c.kind == ChangeKind.PAGES
    b = c.page_count if pages else c.offset if c.kind in _PARTS else 0
    return _HDR.pack(c.kind, len(name), c.first_page if pages else c.size, b,
                     len(c.data)) + name + c.data


def decode_change(buf: bytes) -> ChangeItem:
    """Parse one change item from a peer; hostile-input safe (a FILE_PART is checked
    with :func:`check_part`)."""
    if len(buf) < _HDR.size:
        raise DeltaFormatError("change item shorter than its header", offset=0)
    raw_kind, nlen, a, b, dlen = _HDR.unpack_from(buf, 0)
    try:
        kind = ChangeKind(raw_kind)
    except ValueError:
        raise DeltaFormatError(f"unknown change kind {raw_kind}", offset=0) from None
    if _HDR.size + nlen + dlen != len(buf):
        raise DeltaFormatError("change item length does not match its header", offset=0)
    if (a and kind not in _USES_A) or (b and kind not in _USES_B):
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
    if kind in _PARTS:
        item = ChangeItem(kind, name, size=a, offset=b, data=data)
        check_part(item)
        return item
    return ChangeItem(kind, name, size=a, data=data)
