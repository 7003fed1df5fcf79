"""The change items of an image stream (files whole, as zstd deltas or unchanged; page
windows; the manifest) and their hostile-input-safe codec."""

from __future__ import annotations

import re
import struct

import attrs

from ctlive.errors import DeltaFormatError

__all__ = [
    "Change",
    "decode_change",
    "encode_change",
    "safe_name",
]

FILE_WHOLE, FILE_ZDELTA, FILE_SAME, PAGES, MANIFEST = 1, 2, 3, 4, 5


_KINDS = {FILE_WHOLE, FILE_ZDELTA, FILE_SAME, PAGES, MANIFEST}


_HDR = struct.Struct("<BHQQI")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


@attrs.frozen
class Change:
    """One item of a change stream.

    ``kind``: FILE_WHOLE / FILE_ZDELTA (``a`` = uncompressed size, ``data`` = zstd),
    FILE_SAME, PAGES (``a`` = first page, ``b`` = page count, ``data`` = zstd of a
    page-record stream), MANIFEST (``data`` = JSON).
    """

    kind: int
    name: str
    a: int = 0
    b: int = 0
    data: bytes = attrs.field(default=b"", repr=lambda d: f"<{len(d)} bytes>")


def safe_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise DeltaFormatError(f"unsafe file name in change stream: {name!r}")
    return name


def encode_change(c: Change) -> bytes:
    """Serialize one change item."""
    name = c.name.encode()
    return _HDR.pack(c.kind, len(name), c.a, c.b, len(c.data)) + name + c.data


def decode_change(buf: bytes) -> Change:
    """Parse one change item from a peer; hostile-input safe."""
    if len(buf) < _HDR.size:
        raise DeltaFormatError("change item shorter than its header", offset=0)
    kind, nlen, a, b, dlen = _HDR.unpack_from(buf, 0)
    if kind not in _KINDS:
        raise DeltaFormatError(f"unknown change kind {kind}", offset=0)
    if _HDR.size + nlen + dlen != len(buf):
        raise DeltaFormatError("change item length does not match its header", offset=0)
    try:
        name = buf[_HDR.size : _HDR.size + nlen].decode()
    except UnicodeDecodeError as exc:
        raise DeltaFormatError("change item name is not UTF-8", cause=exc) from exc
    if kind != MANIFEST:
        safe_name(name)
    return Change(kind, name, a, b, bytes(buf[_HDR.size + nlen :]))
