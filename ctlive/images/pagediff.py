"""The page-diff core: thin, checked wrappers over the C kernels in ``native/``.

Every function takes whole buffers (``bytes``, ``bytearray``, ``memoryview``,
``mmap`` — anything C-contiguous) and makes one C call, during which the GIL is
released, so worker threads can run these on both cores.

Stage order for a transfer, cheapest first: zero check, change detection,
delta encode, zstd, encryption. :func:`encode` with ``indices=None`` does the
first three in one pass over the pages.

The record-stream format is specified in ``docs/pagediff.md``.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import zstandard
from typing_extensions import Buffer

from ctlive._native import ffi, lib
from ctlive.errors import DeltaFormatError, PageBufferError
from ctlive.images.criu_format import PAGE_SIZE

__all__ = [
    "MAX_RECORD",
    "PAGE_SIZE",  # re-exported: criu_format defines it
    "DecodeStats",
    "EncodeResult",
    "StreamCompressor",
    "StreamDecompressor",
    "changed_pages",
    "compress",
    "decode",
    "decompress",
    "encode",
    "page_hashes",
    "xxh64",
    "zero_pages",
]

if lib.CTL_PAGE_SIZE != PAGE_SIZE:  # the C kernels are built for CRIU's page size
    raise ImportError(f"native core built for {lib.CTL_PAGE_SIZE}-byte pages, not {PAGE_SIZE}")

# Output buffers are sized for the worst case but mostly left unused: skip the
# zero fill, so untouched pages of a large allocation are never faulted in.
_alloc_uncleared = ffi.new_allocator(should_clear_after_alloc=False)

# One reusable scratch output per thread (up to this size), so steady-state
# encoding does not pay page faults on a fresh buffer every call.
_SCRATCH_MAX = 64 << 20
_scratch = threading.local()


def _out_buffer(size: int) -> Any:
    if size > _SCRATCH_MAX:
        return _alloc_uncleared("unsigned char[]", size)
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size:
        buf = _alloc_uncleared("unsigned char[]", max(size, 1 << 20))
        _scratch.buf = buf
    return buf

MAX_RECORD: int = lib.CTL_MAX_RECORD
"""Worst-case size of one record in a stream; ``encode(limit=...)`` needs at least this."""

_DECODE_ERRORS = {
    lib.CTL_E_TRUNCATED: "stream ends inside a record",
    lib.CTL_E_TYPE: "invalid record kind",
    lib.CTL_E_INDEX: "page index outside the page array",
    lib.CTL_E_ULEB: "overlong or overflowing ULEB128 length",
    lib.CTL_E_RUN: "run goes past the end of the page",
    lib.CTL_E_EMPTY_RUN: "empty literal run, or empty zero run after offset 0",
    lib.CTL_E_LENGTH: "delta payload length is invalid",
}


@attrs.frozen
class EncodeResult:
    """The record stream for a batch of pages and what it contains."""

    data: bytes
    """The packed record stream (not compressed)."""
    consumed: int
    """How many of the indices (or pages, when scanning all) were processed.
    Less than requested only when ``limit`` was reached; continue from there."""
    pages_zero: int
    pages_delta: int
    pages_raw: int
    pages_unchanged: int


@attrs.frozen
class DecodeStats:
    """What a decoded stream held."""

    records: int
    pages_zero: int
    pages_delta: int
    pages_raw: int


def _pages(buf: Buffer, what: str, *, writable: bool = False) -> tuple[object, int]:
    try:
        cbuf = ffi.from_buffer(buf, require_writable=writable)
    except (TypeError, BufferError) as exc:
        need = "a writable" if writable else "a contiguous"
        raise PageBufferError(f"{what} must be {need} buffer", cause=exc) from exc
    n = len(cbuf)
    if n % PAGE_SIZE:
        raise PageBufferError(f"{what} is {n} bytes, not a multiple of {PAGE_SIZE}")
    return cbuf, n // PAGE_SIZE


def _u32_array(values: Sequence[int] | array.array[int]) -> array.array[int]:
    if isinstance(values, array.array) and values.typecode == "I":
        return values
    try:
        return array.array("I", values)
    except (OverflowError, TypeError) as exc:
        raise PageBufferError("page indices must be integers in 0..2**32-1", cause=exc) from exc


def xxh64(data: Buffer, seed: int = 0) -> int:
    """XXH64 of ``data`` (the hash used per page)."""
    cbuf = ffi.from_buffer(data)
    return int(lib.ctl_xxh64(cbuf, len(cbuf), seed))


def page_hashes(pages: Buffer) -> array.array[int]:
    """One XXH64 (seed 0) per page, as an ``array('Q')``."""
    cbuf, n = _pages(pages, "pages")
    out = array.array("Q", bytes(8 * n))
    lib.ctl_hash_pages(cbuf, n, ffi.from_buffer("unsigned long long[]", out))
    return out


def zero_pages(pages: Buffer) -> array.array[int]:
    """Indices of the all-zero pages, as an ``array('I')``."""
    cbuf, n = _pages(pages, "pages")
    out = array.array("I", bytes(4 * n))
    count = lib.ctl_zero_pages(cbuf, n, ffi.from_buffer("unsigned int[]", out))
    del out[count:]
    return out


def changed_pages(old: Buffer, new: Buffer) -> array.array[int]:
    """Indices of the pages that differ between two equally long page arrays."""
    cold, n = _pages(old, "old pages")
    cnew, m = _pages(new, "new pages")
    if n != m:
        raise PageBufferError(f"old has {n} pages, new has {m}")
    out = array.array("I", bytes(4 * n))
    count = lib.ctl_changed_pages(cold, cnew, n, ffi.from_buffer("unsigned int[]", out))
    del out[count:]
    return out


def encode(
    old: Buffer,
    new: Buffer,
    indices: Sequence[int] | array.array[int] | None = None,
    *,
    limit: int | None = None,
) -> EncodeResult:
    """Encode pages of ``new`` against ``old`` into one record stream.

    ``indices=None`` encodes every page that differs (zero check, change
    detection and delta in one C pass). Otherwise only the listed pages are
    considered; listed pages equal to their old version produce no record.
    ``limit`` bounds the output size: encoding stops before a record that might
    not fit, and :attr:`EncodeResult.consumed` tells where to resume.
    """
    cold, n = _pages(old, "old pages")
    cnew, m = _pages(new, "new pages")
    if n != m:
        raise PageBufferError(f"old has {n} pages, new has {m}")
    if indices is None:
        cidx, nidx = ffi.NULL, n
    else:
        arr = _u32_array(indices)
        cidx, nidx = ffi.from_buffer("unsigned int[]", arr), len(arr)
    worst = nidx * MAX_RECORD
    cap = worst if limit is None else min(worst, limit)
    if limit is not None and limit < MAX_RECORD and nidx:
        raise PageBufferError(f"limit must be at least {MAX_RECORD} bytes")
    out = _out_buffer(max(cap, 1))
    st = ffi.new("ctl_encode_stats *")
    rc = lib.ctl_encode(cold, cnew, n, cidx, nidx, out, cap, st)
    if rc == lib.CTL_E_ORDER:
        # Records carry index gaps, so the stream needs increasing indices.
        arr = array.array("I", sorted(set(arr)))
        cidx, nidx = ffi.from_buffer("unsigned int[]", arr), len(arr)
        rc = lib.ctl_encode(cold, cnew, n, cidx, nidx, out, cap, st)
    if rc == lib.CTL_E_INDEX:
        raise PageBufferError(f"page index {arr[st.consumed]} is outside {n} pages")
    return EncodeResult(
        data=ffi.buffer(out, st.out_len)[:],
        consumed=int(st.consumed),
        pages_zero=int(st.zero),
        pages_delta=int(st.delta),
        pages_raw=int(st.raw),
        pages_unchanged=int(st.unchanged),
    )


def decode(pages: Buffer, stream: Buffer) -> DecodeStats:
    """Apply a record stream in place to a writable page array.

    The stream is treated as hostile: anything malformed raises
    :class:`~ctlive.errors.DeltaFormatError` with the offset of the bad record.
    Each record is validated before its page is touched, so on error the failing
    page is unchanged; records before it remain applied (decode into a scratch
    copy when all-or-nothing matters).
    """
    cpages, n = _pages(pages, "pages", writable=True)
    cin = ffi.from_buffer(stream)
    st = ffi.new("ctl_decode_stats *")
    rc = lib.ctl_decode(cpages, n, cin, len(cin), st)
    if rc != lib.CTL_OK:
        off = int(st.error_offset)
        raise DeltaFormatError(
            f"corrupt page-record stream at byte {off}: {_DECODE_ERRORS.get(rc, rc)}",
            offset=off,
        )
    return DecodeStats(
        records=int(st.records),
        pages_zero=int(st.zero),
        pages_delta=int(st.delta),
        pages_raw=int(st.raw),
    )


# --- zstd -------------------------------------------------------------------

_ZBuf = bytes | bytearray | memoryview


def compress(data: _ZBuf, level: int = 1) -> bytes:
    """One zstd frame holding ``data`` (with its size in the header)."""
    return zstandard.ZstdCompressor(level=level).compress(data)


def decompress(data: _ZBuf, max_output: int) -> bytes:
    """Decompress one zstd frame, refusing output larger than ``max_output``.

    The bound defends against decompression bombs from a hostile peer.
    """
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"not a zstd frame: {exc}", cause=exc) from exc
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise DeltaFormatError("zstd frame does not declare its size")
    if size > max_output:
        raise DeltaFormatError(f"zstd frame declares {size} bytes, limit is {max_output}")
    try:
        out: bytes = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_output)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"corrupt zstd frame: {exc}", cause=exc) from exc
    if len(out) != size:
        raise DeltaFormatError("zstd frame size does not match its header")
    return out


class StreamCompressor:
    """A zstd streaming context for one lane: each :meth:`chunk` is flushed so
    the peer can decode it at once, while the window spans earlier chunks."""

    def __init__(self, level: int = 1) -> None:
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def chunk(self, data: _ZBuf) -> bytes:
        """Compress ``data`` and flush a block boundary."""
        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class StreamDecompressor:
    """The receiving end of a :class:`StreamCompressor`."""

    def __init__(self, max_chunk: int) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._max = max_chunk

    def chunk(self, data: _ZBuf) -> bytes:
        """Decompress one flushed chunk; output above ``max_chunk`` is refused."""
        try:
            out: bytes = self._d.decompress(data)
        except zstandard.ZstdError as exc:
            raise DeltaFormatError(f"corrupt zstd stream: {exc}", cause=exc) from exc
        if len(out) > self._max:
            raise DeltaFormatError(f"zstd chunk expands to {len(out)} bytes > {self._max}")
        return out
