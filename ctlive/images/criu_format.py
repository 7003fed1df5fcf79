"""CRIU image files: magics, length-prefixed protobuf entries, and the few messages
ctlive needs (pagemap, inventory, stats). Pure and synchronous.

Layout of an image file: ``u32 IMG_COMMON_MAGIC`` (or ``IMG_SERVICE_MAGIC`` for
stats-dump and irmap-cache), ``u32`` type magic, then entries, each a ``u32`` LE
length and a protobuf message. ``inventory.img`` starts with its type magic
alone. ``pages-*.img`` is raw: the PE_PRESENT pages in pagemap order.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Iterator

import attrs

from ctlive.errors import ImageFormatError

__all__ = [
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "INVENTORY_MAGIC",
    "PAGEMAP_MAGIC",
    "PAGE_SIZE",
    "PE_LAZY",
    "PE_PARENT",
    "PE_PRESENT",
    "STATS_MAGIC",
    "DumpStats",
    "Pagemap",
    "PagemapEntry",
    "decode_message",
    "encode_varint",
    "read_entries",
    "read_pagemap",
    "read_stats",
    "write_image",
    "write_pagemap",
]

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
PAGEMAP_MAGIC = 0x56084025
INVENTORY_MAGIC = 0x58313116
STATS_MAGIC = 0x57093306
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
PAGE_SIZE = 4096
"""Size of a page in bytes, as CRIU's images count them (the one definition in ctlive)."""
_MAX_ENTRY = 64 << 20


# --- protobuf wire format (the subset CRIU's images use) -------------------------------


def encode_varint(v: int) -> bytes:
    """Protobuf base-128 varint."""
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint(buf: bytes, off: int, path: str, base: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if off >= len(buf):
            raise ImageFormatError("truncated varint", path=path, offset=base + off)
        b = buf[off]
        off += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, off
        shift += 7
        if shift > 63:
            raise ImageFormatError("varint longer than 64 bits", path=path, offset=base + off)


def decode_message(buf: bytes, path: str = "?", base: int = 0) -> dict[int, list[int | bytes]]:
    """Field number -> values. Varints become ints; length-delimited fields bytes."""
    fields: dict[int, list[int | bytes]] = {}
    off = 0
    while off < len(buf):
        key, off = _varint(buf, off, path, base)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ImageFormatError("protobuf field number 0", path=path, offset=base + off)
        value: int | bytes
        if wt == 0:
            value, off = _varint(buf, off, path, base)
        elif wt == 1:
            if off + 8 > len(buf):
                raise ImageFormatError("truncated fixed64", path=path, offset=base + off)
            value = struct.unpack_from("<Q", buf, off)[0]
            off += 8
        elif wt == 5:
            if off + 4 > len(buf):
                raise ImageFormatError("truncated fixed32", path=path, offset=base + off)
            value = struct.unpack_from("<I", buf, off)[0]
            off += 4
        elif wt == 2:
            n, off = _varint(buf, off, path, base)
            if n > len(buf) - off:
                raise ImageFormatError("length-delimited field past the end", path=path,
                                       offset=base + off)
            value = buf[off : off + n]
            off += n
        else:
            raise ImageFormatError(f"unsupported protobuf wire type {wt}", path=path,
                                   offset=base + off)
        fields.setdefault(num, []).append(value)
    return fields


def _int(fields: dict[int, list[int | bytes]], num: int, default: int = 0) -> int:
    vals = fields.get(num)
    if not vals:
        return default
    v = vals[-1]
    if not isinstance(v, int):
        raise ImageFormatError(f"field {num} is not an integer")
    return v


# --- files and entries --------------------------------------------------------------------


def read_entries(path: str | os.PathLike[str], type_magic: int, *,
                 service: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, message bytes) of every entry after checking the magics."""
    p = str(path)
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ImageFormatError(f"cannot read: {exc}", path=p, cause=exc) from exc
    off = 0
    if type_magic != INVENTORY_MAGIC:
        if len(data) < 4:
            raise ImageFormatError("file shorter than its magic", path=p, offset=0)
        want = IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC
        (m,) = struct.unpack_from("<I", data, 0)
        if m != want:
            raise ImageFormatError(f"bad image magic 0x{m:08x} (want 0x{want:08x})",
                                   path=p, offset=0)
        off = 4
    if len(data) < off + 4:
        raise ImageFormatError("file shorter than its type magic", path=p, offset=off)
    (m,) = struct.unpack_from("<I", data, off)
    if m != type_magic:
        raise ImageFormatError(f"bad type magic 0x{m:08x} (want 0x{type_magic:08x})",
                               path=p, offset=off)
    off += 4
    while off < len(data):
        if len(data) - off < 4:
            raise ImageFormatError("truncated entry length", path=p, offset=off)
        (n,) = struct.unpack_from("<I", data, off)
        if n > _MAX_ENTRY or n > len(data) - off - 4:
            raise ImageFormatError(f"entry of {n} bytes runs past the end", path=p, offset=off)
        yield off + 4, data[off + 4 : off + 4 + n]
        off += 4 + n


@attrs.frozen
class PagemapEntry:
    """A run of pages of one process."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        """Whether the run's pages are in this dump's pages file."""
        return bool(self.flags & PE_PRESENT)


@attrs.frozen
class Pagemap:
    """``pagemap-<pid>.img``: which pages of the process the pages file holds."""

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    @property
    def present_pages(self) -> int:
        """Number of pages in the pages file."""
        return sum(e.nr_pages for e in self.entries if e.present)

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """(vaddr, nr_pages, first page index in the pages file) for present runs."""
        idx = 0
        for e in self.entries:
            if e.present:
                yield e.vaddr, e.nr_pages, idx
                idx += e.nr_pages

    def offset_of(self, vaddr: int) -> int | None:
        """Byte offset of the page at ``vaddr`` in the pages file, or None."""
        for start, n, idx in self.runs():
            if start <= vaddr < start + n * PAGE_SIZE:
                return (idx + (vaddr - start) // PAGE_SIZE) * PAGE_SIZE
        return None


def read_pagemap(path: str | os.PathLike[str]) -> Pagemap:
    """Parse a pagemap image (CRIU 4: nr_pages in field 5; older: field 2)."""
    p = str(path)
    entries = list(read_entries(path, PAGEMAP_MAGIC))
    if not entries:
        raise ImageFormatError("pagemap has no head entry", path=p, offset=8)
    off, head = entries[0]
    pages_id = _int(decode_message(head, p, off), 1)
    out = []
    for off, msg in entries[1:]:
        f = decode_message(msg, p, off)
        if 1 not in f:
            raise ImageFormatError("pagemap entry without vaddr", path=p, offset=off)
        nr = _int(f, 5) or _int(f, 2)
        if 3 in f or 4 in f:
            flags = _int(f, 4) if 4 in f else (PE_PARENT if _int(f, 3) else PE_PRESENT)
        else:
            flags = PE_PRESENT
        vaddr = _int(f, 1)
        if vaddr % PAGE_SIZE or nr <= 0 or nr > 1 << 40:
            raise ImageFormatError(f"bad pagemap run vaddr={vaddr:#x} nr_pages={nr}", path=p,
                                   offset=off)
        out.append(PagemapEntry(vaddr, nr, flags))
    return Pagemap(pages_id, tuple(out))


@attrs.frozen
class DumpStats:
    """CRIU's ``stats-dump`` (times in microseconds)."""

    freezing_time: int
    frozen_time: int
    memdump_time: int
    memwrite_time: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int = 0


def read_stats(path: str | os.PathLike[str]) -> DumpStats:
    """Parse ``stats-dump``."""
    p = str(path)
    entries = list(read_entries(path, STATS_MAGIC, service=True))
    if not entries:
        raise ImageFormatError("stats image has no entry", path=p, offset=8)
    off, msg = entries[0]
    top = decode_message(msg, p, off)
    dump = top.get(1)
    if not dump or not isinstance(dump[0], bytes):
        raise ImageFormatError("stats image has no dump statistics", path=p, offset=off)
    f = decode_message(dump[0], p, off)
    return DumpStats(
        freezing_time=_int(f, 1), frozen_time=_int(f, 2), memdump_time=_int(f, 3),
        memwrite_time=_int(f, 4), pages_scanned=_int(f, 5), pages_skipped_parent=_int(f, 6),
        pages_written=_int(f, 7), pages_lazy=_int(f, 9))


def _field_varint(num: int, v: int) -> bytes:
    return encode_varint(num << 3) + encode_varint(v)


def write_image(path: str | os.PathLike[str], type_magic: int, messages: list[bytes], *,
                service: bool = False) -> None:
    """Write an image file: magics, then length-prefixed messages."""
    out = bytearray()
    if type_magic != INVENTORY_MAGIC:
        out += struct.pack("<I", IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC)
    out += struct.pack("<I", type_magic)
    for m in messages:
        out += struct.pack("<I", len(m)) + m
    pathlib.Path(path).write_bytes(bytes(out))


def write_pagemap(path: str | os.PathLike[str], pages_id: int,
                  entries: list[PagemapEntry]) -> None:
    """Write a pagemap image the way CRIU 4 does (nr_pages in field 5)."""
    msgs = [_field_varint(1, pages_id)]
    for e in entries:
        msgs.append(_field_varint(1, e.vaddr) + _field_varint(2, 0) + _field_varint(4, e.flags)
                    + _field_varint(5, e.nr_pages))
    write_image(path, PAGEMAP_MAGIC, msgs)
