"""Diff two successive CRIU dumps into a stream of change items (``rebuild`` turns
the old dump and that stream back into the new dump, byte for byte).

One code path serves the first, full transfer (``old_dir=None``) and every later
iteration. Pages are matched by (pagemap file, virtual address): for each window of
the new pages file, the receiver's copy of the matching old pages is laid out in
the new file's order (zero where there is none), and the native core encodes the
difference in one pass (zero markers, XOR deltas, raw pages), compressed as one
zstd frame per window. Non-page files go whole, as a zstd delta against their old
version (the old file is the dictionary), or as "unchanged"; one larger than
``PART_SIZE`` goes in parts of that size, each read, compressed and sent on its own,
or as "unchanged". The last item is a manifest of the new dump; the rebuilder checks
its result against it.

Memory is bounded by the window size (and ``PART_SIZE``), independent of the image
size: no file is read whole but those of at most ``PART_SIZE`` bytes (and the old
version of such a file, when it may be a zdelta's dictionary: at most
``MAX_ZDELTA_BASE``). Functions hold no global state but ``layout``'s thread-safe
cache of parsed pagemaps, so they run in worker threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import os
import pathlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import attrs
import zstandard

from ctlive.errors import ImageFormatError, StorageError, map_os_errors
from ctlive.images import layout, pagediff
from ctlive.images.changes import MAX_PART, MAX_ZDELTA_BASE, ChangeItem, ChangeKind, safe_name
from ctlive.images.criu_format import PAGE_SIZE, Pagemap
from ctlive.images.layout import MappedFile, Segment
from ctlive.images.manifest import Manifest, bytes_digest, pages_digest

__all__ = [
    "PART_SIZE",
    "DiffStats",
    "diff",
]

PART_SIZE = MAX_PART
"""A non-page file larger than this (4 MiB) goes in parts of this size, the last one
shorter (FILE_PART; the largest part a receiver accepts)."""


@attrs.define
class DiffStats:
    """What a diff found and sent (for the migration report)."""

    files: int = 0
    """Non-page files in the new dump (pagemaps among them)."""
    files_unchanged: int = 0
    """Of those, the ones equal to their old version."""
    file_bytes_in: int = 0
    """Bytes of non-page files read."""
    pages_total: int = 0
    """Pages in the new dump's pages files."""
    pages_changed: int = 0
    """Pages that differ from the receiver's base (their old version, else zeros):
    zero + delta + raw."""
    pages_zero: int = 0
    """Changed pages sent as zero markers."""
    pages_delta: int = 0
    """Changed pages sent as XOR deltas against their old version."""
    pages_raw: int = 0
    """Changed pages sent raw."""
    bytes_in: int = 0
    """Bytes read from the new dump, files and pages."""
    bytes_out: int = 0
    """Compressed bytes sent in file and page items (headers and manifest aside)."""


def diff(old_dir: str | os.PathLike[str] | None, new_dir: str | os.PathLike[str], *,
         window_pages: int = layout.DEFAULT_WINDOW_PAGES, level: int = 1,
         stats: DiffStats | None = None, threads: int = 1) -> Iterator[ChangeItem]:
    """Yield the change items that turn ``old_dir`` (None: nothing) into ``new_dir``.

    ``threads`` > 1 diffs that many windows at once (the native core and zstd release
    the GIL): worth it while the workload is frozen and the cores are otherwise idle.
    A failing disk is a :class:`~ctlive.errors.StorageError`."""
    with map_os_errors(StorageError, f"reading the dump {new_dir}"):
        new = pathlib.Path(new_dir)
        old = pathlib.Path(old_dir) if old_dir is not None else None
        st = stats if stats is not None else DiffStats()
        new_maps = layout.pagemaps(new)
        old_maps = layout.pagemaps(old) if old is not None else {}
        new_pages = layout.pages_files(new_maps)
        zc = zstandard.ZstdCompressor(level=level)
        names = sorted(p.name for p in new.iterdir() if p.is_file() and not p.name.endswith(".log"))
        # The manifest is built from what the diff reads anyway: no second pass.
        files: dict[str, dict[str, Any]] = {}
        # Non-page files first (pagemaps among them): the receiver needs them to lay out pages.
        for name in names:
            if name not in new_pages:
                yield from _diff_file(old, new, safe_name(name), zc, level, st, files)
        for name in names:
            if name in new_pages:
                yield from _diff_pages(old, new, name, new_maps[new_pages[name]],
                                       old_maps.get(new_pages[name]), window_pages, zc, st, files,
                                       level, threads)
        yield ChangeItem(ChangeKind.MANIFEST, "", data=Manifest(files).to_json())


def _read_exact(f: BinaryIO, n: int, path: pathlib.Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise StorageError(f"{path} changed while it was read", path=str(path))
    return data


def _small_old(prev: pathlib.Path | None, limit: int) -> bytes | None:
    """The old version of a file; None when there is none or it is larger than
    ``limit`` (then it is not read)."""
    if prev is None or not prev.is_file():
        return None
    with open(prev, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _read_exact(f, size, prev) if size <= limit else None


def _diff_file(old: pathlib.Path | None, new: pathlib.Path, name: str,
               zc: zstandard.ZstdCompressor, level: int, st: DiffStats,
               files: dict[str, dict[str, Any]]) -> Iterator[ChangeItem]:
    """The items of one non-page file: unchanged, a zstd delta with its old version as
    dictionary when that is smaller (and the old version no larger than
    ``MAX_ZDELTA_BASE``, which the receiver holds in memory), or whole; a file larger
    than ``PART_SIZE`` in parts (or unchanged)."""
    path = new / name
    prev = old / name if old is not None else None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        st.files += 1
        st.file_bytes_in += size
        st.bytes_in += size
        if size > PART_SIZE:
            yield from _diff_parts(f, path, size, prev, name, zc, st, files)
            return
        data = _read_exact(f, size, path)
        if f.read(1):
            raise StorageError(f"{path} changed while it was read", path=str(path))
    files[name] = bytes_digest(data)
    old_data = _small_old(prev, MAX_ZDELTA_BASE)  # size <= PART_SIZE <= MAX_ZDELTA_BASE
    if old_data == data:
        st.files_unchanged += 1
        yield ChangeItem(ChangeKind.FILE_SAME, name)
        return
    kind, payload = ChangeKind.FILE_WHOLE, zc.compress(data)
    if old_data:
        dictionary = zstandard.ZstdCompressionDict(
            old_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        delta = zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(data)
        if len(delta) < len(payload):
            kind, payload = ChangeKind.FILE_ZDELTA, delta
    st.bytes_out += len(payload)
    yield ChangeItem(kind, name, size=size, data=payload)


def _diff_parts(f: BinaryIO, path: pathlib.Path, size: int, prev: pathlib.Path | None,
                name: str, zc: zstandard.ZstdCompressor, st: DiffStats,
                files: dict[str, dict[str, Any]]) -> Iterator[ChangeItem]:
    """The items of a file larger than ``PART_SIZE`` (open as ``f``), part by part:
    while its parts equal the old version's (same size), nothing is sent; at the first
    difference the parts before it are read again and sent, then the rest as read.
    Its manifest entry is hashed from the parts as they are read."""
    digest = hashlib.blake2b()

    def part(off: int, data: bytes) -> ChangeItem:
        payload = zc.compress(data)
        st.bytes_out += len(payload)
        return ChangeItem(ChangeKind.FILE_PART, name, size=size, offset=off, data=payload)

    same = prev is not None and prev.is_file() and prev.stat().st_size == size
    with open(prev, "rb") if same and prev is not None else contextlib.nullcontext() as g:
        for off in range(0, size, PART_SIZE):
            data = _read_exact(f, min(PART_SIZE, size - off), path)
            digest.update(data)
            if same:
                assert g is not None
                if g.read(len(data)) == data:
                    continue
                same = False
                for earlier in range(0, off, PART_SIZE):  # equal so far: not sent yet
                    f.seek(earlier)
                    yield part(earlier, _read_exact(f, PART_SIZE, path))
                f.seek(off + len(data))
            # Let go of the part before the next is read: one part in memory at a time.
            item, data = part(off, data), b""
            yield item
            del item
        if f.read(1):
            raise StorageError(f"{path} changed while it was read", path=str(path))
    files[name] = {"size": size, "blake2b": digest.hexdigest()}
    if same:
        st.files_unchanged += 1
        yield ChangeItem(ChangeKind.FILE_SAME, name)


def _diff_window(old_m: MappedFile | None, segs: list[Segment], new_m: MappedFile,
                 start: int, count: int, level: int) -> tuple[Any, bytes | None, bytes]:
    """(encode result, zstd payload or None when nothing changed, page hashes) of one
    window; touches nothing shared, so windows run in parallel threads."""
    cur = memoryview(new_m.buf)[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
    with layout.take_base_window(old_m, segs, start, count, readonly=True) as base:
        enc = pagediff.encode(base, cur)
        del base  # release the view before the mmap closes
    hashes = pagediff.page_hashes(cur).tobytes()  # while the window is hot
    del cur
    new_m.drop(start, count)
    changed = enc.pages_zero + enc.pages_delta + enc.pages_raw
    payload = zstandard.ZstdCompressor(level=level).compress(enc.data) if changed else None
    return enc, payload, hashes


def _in_order(fn: Any, jobs: list[tuple[int, int]], threads: int) -> Iterator[Any]:
    """``fn(*job)`` for each job, results in order; with ``threads`` > 1 run ahead on a
    pool, at most two jobs per thread in flight (bounded memory)."""
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job)
        return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        it = iter(jobs)
        for job in itertools.islice(it, 2 * threads):
            pending.append(pool.submit(fn, *job))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, *nxt))
            yield result


def _diff_pages(old: pathlib.Path | None, new: pathlib.Path, name: str, new_map: Pagemap,
                old_map: Pagemap | None, window: int, zc: zstandard.ZstdCompressor,
                st: DiffStats, files: dict[str, dict[str, Any]], level: int,
                threads: int) -> Iterator[ChangeItem]:
    """The items of pages file ``name`` (``old_map``: its pagemap in the old dump, if
    any), window by window; its manifest entry goes to ``files``."""
    new_m = MappedFile(new / name)
    old_path = (old / f"pages-{old_map.pages_id}.img"
                if old is not None and old_map is not None else None)
    old_m = MappedFile(old_path) if old_path is not None and old_path.is_file() else None
    try:
        total = new_m.size // PAGE_SIZE
        if new_m.size % PAGE_SIZE or total != new_map.present_pages:
            raise ImageFormatError(
                f"pages file holds {new_m.size} bytes, its pagemap says {new_map.present_pages} "
                "pages", path=str(new / name))
        segs = layout.segments(old_map, new_map) if old_m is not None else []
        st.pages_total += total
        hashes = bytearray()
        jobs = [(start, min(window, total - start)) for start in range(0, total, window)]

        def work(start: int, count: int) -> tuple[int, int, Any, bytes | None, bytes]:
            return (start, count, *_diff_window(old_m, segs, new_m, start, count, level))

        for start, count, enc, payload, h in _in_order(work, jobs, threads):
            hashes += h
            st.bytes_in += count * PAGE_SIZE
            st.pages_changed += enc.pages_zero + enc.pages_delta + enc.pages_raw
            st.pages_zero += enc.pages_zero
            st.pages_delta += enc.pages_delta
            st.pages_raw += enc.pages_raw
            if payload is not None:
                st.bytes_out += len(payload)
                yield ChangeItem(ChangeKind.PAGES, name, first_page=start, page_count=count,
                                 data=payload)
        files[name] = pages_digest(new_m.size, bytes(hashes)) if total else bytes_digest(b"")
        if total == 0:
            yield ChangeItem(ChangeKind.FILE_WHOLE, name, data=zc.compress(b""))
    finally:
        new_m.close()
        if old_m is not None:
            old_m.close()
