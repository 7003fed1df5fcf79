"""Diff two successive CRIU dumps into a stream of change items, and rebuild the new
dump byte for byte from the old one and that stream.

One code path serves the first, full transfer (``old_dir=None``) and every later
iteration. Pages are matched by (pagemap file, virtual address): for each window of
the new pages file, the receiver's copy of the matching old pages is laid out in
the new file's order (zero where there is none), and the native core encodes the
difference in one pass (zero markers, XOR deltas, raw pages), compressed as one
zstd frame per window. Non-page files go whole, as a zstd delta against their old
version (the old file is the dictionary), or as "unchanged". The last item is a
manifest of the new dump; the rebuilder checks its result against it.

Memory is bounded by the window size, independent of the image size. Functions
hold no global state, so they run in worker threads.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import hashlib
import itertools
import json
import mmap
import os
import pathlib
import re
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import zstandard

from ctlive import pagediff
from ctlive.errors import DeltaFormatError, ImageFormatError
from ctlive.images import Pagemap, read_pagemap

__all__ = [
    "Change",
    "DiffStats",
    "Manifest",
    "Rebuilder",
    "decode_change",
    "diff",
    "encode_change",
    "manifest",
]

PAGE = pagediff.PAGE_SIZE
FILE_WHOLE, FILE_ZDELTA, FILE_SAME, PAGES, MANIFEST = 1, 2, 3, 4, 5
_KINDS = {FILE_WHOLE, FILE_ZDELTA, FILE_SAME, PAGES, MANIFEST}
_HDR = struct.Struct("<BHQQI")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
MAX_FILE = 1 << 30
DEFAULT_WINDOW_PAGES = 4096  # 16 MiB of pages per chunk
MAX_DEFERRED = 256 << 20  # compressed pages held while their pagemap is still on its way


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


@attrs.frozen
class Manifest:
    """The expected content of a dump directory: per file, size and digest; for
    pages files the digest is over the per-page XXH64 hashes."""

    files: dict[str, dict[str, Any]]

    def to_json(self) -> bytes:
        """Canonical JSON."""
        return json.dumps(self.files, sort_keys=True, separators=(",", ":")).encode()


@attrs.define
class DiffStats:
    """What a diff found and sent (for the migration report)."""

    files: int = 0
    files_unchanged: int = 0
    file_bytes_in: int = 0
    pages_total: int = 0
    pages_changed: int = 0
    pages_zero: int = 0
    pages_delta: int = 0
    pages_raw: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _safe_name(name: str) -> str:
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
        _safe_name(name)
    return Change(kind, name, a, b, bytes(buf[_HDR.size + nlen :]))


# --- page matching ----------------------------------------------------------------------


_PAGEMAP_CACHE: dict[tuple[int, int, int, int], Pagemap] = {}


def _pagemap(p: pathlib.Path) -> Pagemap:
    # Each dump's pagemaps are parsed twice (as the new, then as the old dump of the
    # next iteration): keep the last few, keyed by file identity and version.
    st = p.stat()
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    pm = _PAGEMAP_CACHE.get(key)
    if pm is None:
        pm = read_pagemap(p)
        if len(_PAGEMAP_CACHE) >= 256:
            _PAGEMAP_CACHE.pop(next(iter(_PAGEMAP_CACHE)))
        _PAGEMAP_CACHE[key] = pm
    return pm


def _pagemaps(d: pathlib.Path) -> dict[str, Pagemap]:
    return {p.name: _pagemap(p) for p in sorted(d.glob("pagemap-*.img"))}


def _segments(old: Pagemap | None, new: Pagemap) -> list[tuple[int, int, int]]:
    """(new page index, old page index, count) for pages present in both, by vaddr."""
    if old is None:
        return []
    old_runs = sorted(old.runs())
    starts = [r[0] for r in old_runs]
    out: list[tuple[int, int, int]] = []
    for vaddr, n, idx in new.runs():
        end = vaddr + n * PAGE
        i = max(bisect.bisect_right(starts, vaddr) - 1, 0)
        while i < len(old_runs) and old_runs[i][0] < end:
            ov, on, oidx = old_runs[i]
            lo, hi = max(vaddr, ov), min(end, ov + on * PAGE)
            if lo < hi:
                seg = (idx + (lo - vaddr) // PAGE, oidx + (lo - ov) // PAGE, (hi - lo) // PAGE)
                last = out[-1] if out else None
                if last is not None and last[0] + last[2] == seg[0] and last[1] + last[2] == seg[1]:
                    # Adjacent mappings that sit next to each other in both files: one
                    # segment, so that whole windows can be read in place.
                    out[-1] = (last[0], last[1], last[2] + seg[2])
                else:
                    out.append(seg)
            i += 1
    return out


def _old_span(segs: list[tuple[int, int, int]], start: int, count: int) -> tuple[int, int]:
    """[lo, hi) old page indices that new pages [start, start+count) read from."""
    lo, hi = 1 << 62, 0
    for new_idx, old_idx, n in segs:
        a, b = max(new_idx, start), min(new_idx + n, start + count)
        if a < b:
            lo, hi = min(lo, old_idx + a - new_idx), max(hi, old_idx + b - new_idx)
    return (lo, hi) if lo < hi else (0, 0)


def _identity(segs: list[tuple[int, int, int]], total: int) -> bool:
    """Every new page sits at the same index in the old file (unchanged layout)."""
    pos = 0
    for new_idx, old_idx, n in segs:
        if new_idx != pos or old_idx != new_idx:
            return False
        pos += n
    return pos == total


def _rearrange(mm: mmap.mmap, segs: list[tuple[int, int, int]], total: int,
               window: int = DEFAULT_WINDOW_PAGES) -> None:
    """Move old pages to their new indices inside one mapping (at least as long as both
    layouts), then zero the new pages no segment fills.

    Both files list pages in vaddr order, so segments keep their order in both: pages
    moving towards the start are moved first, in ascending order, then pages moving
    towards the end, in descending order; no move then overwrites a source that is
    still to be read. Moves go a window at a time, in the same direction, and each
    window is dropped from the mapping once moved: memory stays bounded by the window."""
    w = window

    def move(new_idx: int, old_idx: int, n: int) -> None:
        mm.move(new_idx * PAGE, old_idx * PAGE, n * PAGE)
        drop(mm, old_idx, n)
        drop(mm, new_idx, n)

    for new_idx, old_idx, n in segs:
        if new_idx < old_idx:
            for at in range(0, n, w):
                move(new_idx + at, old_idx + at, min(w, n - at))
    for new_idx, old_idx, n in reversed(segs):
        if new_idx > old_idx:
            for at in reversed(range(0, n, w)):
                move(new_idx + at, old_idx + at, min(w, n - at))
    pos = 0
    for new_idx, _, n in [*segs, (total, 0, 0)]:
        for at in range(pos, new_idx, w):
            k = min(w, new_idx - at)
            mm[at * PAGE : (at + k) * PAGE] = bytes(k * PAGE)
            drop(mm, at, k)
        pos = new_idx + n


def _rearrangeable(segs: list[tuple[int, int, int]], total: int, old_total: int) -> bool:
    """Segments in order, inside both files, covering most of the new file: cheaper to
    rearrange the old file in place than to write a new one."""
    pos_new = pos_old = covered = 0
    for new_idx, old_idx, n in segs:
        if n <= 0 or new_idx < pos_new or old_idx < pos_old:
            return False
        pos_new, pos_old = new_idx + n, old_idx + n
        covered += n
    return pos_new <= total and pos_old <= old_total and covered * 2 >= total


def _contiguous(segs: list[tuple[int, int, int]], start: int, count: int) -> int | None:
    """Old page index where [start, start+count) lies as one contiguous old range."""
    for new_idx, old_idx, n in segs:
        if new_idx <= start and start + count <= new_idx + n:
            return old_idx + start - new_idx
    return None


def _base_window(old_pages: Any, segs: list[tuple[int, int, int]], start: int,
                 count: int, *, readonly: bool = False) -> Any:
    """The receiver's old pages laid out as new pages [start, start+count).

    With ``readonly``, a window that is one contiguous old range is returned as a
    zero-copy view of the old file (the common case: unchanged mappings)."""
    if readonly:
        at = _contiguous(segs, start, count)
        if at is not None:
            return memoryview(old_pages)[at * PAGE : (at + count) * PAGE]
    base = bytearray(count * PAGE)
    for new_idx, old_idx, n in segs:
        lo, hi = max(new_idx, start), min(new_idx + n, start + count)
        if lo < hi:
            src = (old_idx + lo - new_idx) * PAGE
            dst = (lo - start) * PAGE
            base[dst : dst + (hi - lo) * PAGE] = old_pages[src : src + (hi - lo) * PAGE]
    return base


class _Mapped:
    """A read-only mmap of a file (empty files map to b"")."""

    def __init__(self, path: pathlib.Path) -> None:
        self.size = path.stat().st_size
        self._f = open(path, "rb")  # noqa: SIM115
        self.buf: Any = (mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
                         if self.size else b"")

    def drop(self, first_page: int, pages: int) -> None:
        """Forget pages we are done with: the mapping would otherwise keep every page it
        touched resident, making the process's RSS as large as the image."""
        drop(self.buf, first_page, pages)

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        self._f.close()


def drop(m: Any, first_page: int, pages: int) -> None:
    """MADV_DONTNEED on pages of a shared file mapping: their data stays in the file."""
    if isinstance(m, mmap.mmap) and pages > 0:
        length = min(pages * PAGE, len(m) - first_page * PAGE)
        if length > 0:
            m.madvise(mmap.MADV_DONTNEED, first_page * PAGE, length)


def _pages_files(maps: dict[str, Pagemap]) -> dict[str, str]:
    """pages file name -> pagemap file name."""
    return {f"pages-{pm.pages_id}.img": name for name, pm in maps.items()}


def _hash_file_pages(path: pathlib.Path) -> bytes:
    """Per-page XXH64 hashes of a pages file, window by window (bounded RSS)."""
    m = _Mapped(path)
    try:
        total = m.size // PAGE
        out = bytearray()
        for start in range(0, total, DEFAULT_WINDOW_PAGES):
            count = min(DEFAULT_WINDOW_PAGES, total - start)
            view = memoryview(m.buf)[start * PAGE : (start + count) * PAGE]
            out += pagediff.page_hashes(view).tobytes()
            view.release()
            m.drop(start, count)
        return bytes(out)
    finally:
        m.close()


def _pages_digest(size: int, hashes: bytes) -> dict[str, Any]:
    return {"size": size, "page_hashes": hashlib.blake2b(hashes).hexdigest()}


def _bytes_digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "blake2b": hashlib.blake2b(data).hexdigest()}


def _file_digest(path: pathlib.Path, pages: bool,
                 hashes: dict[str, bytes] | None = None) -> dict[str, Any]:
    size = path.stat().st_size
    if pages and size % PAGE == 0 and size:
        h = hashes.get(path.name) if hashes is not None else None
        if h is None:
            h = _hash_file_pages(path)
            if hashes is not None:
                hashes[path.name] = h
        return _pages_digest(size, h)
    d = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            d.update(chunk)
    return {"size": size, "blake2b": d.hexdigest()}


def manifest(d: str | os.PathLike[str], hashes: dict[str, bytes] | None = None) -> Manifest:
    """The manifest of a dump directory. ``hashes`` (pages file -> per-page hashes)
    supplies hashes known to be current and receives the ones computed."""
    root = pathlib.Path(d)
    pages = _pages_files(_pagemaps(root))
    files = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.endswith(".log"):
            files[p.name] = _file_digest(p, p.name in pages, hashes)
    return Manifest(files)


# --- diff ---------------------------------------------------------------------------------


def diff(old_dir: str | os.PathLike[str] | None, new_dir: str | os.PathLike[str], *,
         window_pages: int = DEFAULT_WINDOW_PAGES, level: int = 1,
         stats: DiffStats | None = None, threads: int = 1) -> Iterator[Change]:
    """Yield the change items that turn ``old_dir`` (None: nothing) into ``new_dir``.

    ``threads`` > 1 diffs that many windows at once (the native core and zstd release
    the GIL): worth it while the workload is frozen and the cores are otherwise idle."""
    new = pathlib.Path(new_dir)
    old = pathlib.Path(old_dir) if old_dir is not None else None
    st = stats if stats is not None else DiffStats()
    new_maps = _pagemaps(new)
    old_maps = _pagemaps(old) if old is not None else {}
    old_pages = _pages_files(old_maps)
    new_pages = _pages_files(new_maps)
    zc = zstandard.ZstdCompressor(level=level)
    names = sorted(p.name for p in new.iterdir() if p.is_file() and not p.name.endswith(".log"))
    # The manifest is built from what the diff reads anyway: no second pass.
    files: dict[str, dict[str, Any]] = {}
    # Non-page files first (pagemaps among them): the receiver needs them to lay out pages.
    for name in names:
        if name in new_pages:
            continue
        _safe_name(name)
        data = (new / name).read_bytes()
        files[name] = _bytes_digest(data)
        st.files += 1
        st.file_bytes_in += len(data)
        st.bytes_in += len(data)
        prev = old / name if old is not None else None
        if prev is not None and prev.is_file():
            old_data = prev.read_bytes()
            if old_data == data:
                st.files_unchanged += 1
                yield Change(FILE_SAME, name)
                continue
            whole = zc.compress(data)
            if old_data:
                dictionary = zstandard.ZstdCompressionDict(
                    old_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                delta = zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(data)
                if len(delta) < len(whole):
                    st.bytes_out += len(delta)
                    yield Change(FILE_ZDELTA, name, len(data), 0, delta)
                    continue
            st.bytes_out += len(whole)
            yield Change(FILE_WHOLE, name, len(data), 0, whole)
        else:
            whole = zc.compress(data)
            st.bytes_out += len(whole)
            yield Change(FILE_WHOLE, name, len(data), 0, whole)
    for name in names:
        if name not in new_pages:
            continue
        yield from _diff_pages(old, new, name, new_maps[new_pages[name]],
                               old_maps.get(new_pages[name]), old_pages, window_pages, zc, st,
                               files, level, threads)
    yield Change(MANIFEST, "", data=Manifest(files).to_json())


def _diff_window(old_m: _Mapped | None, segs: list[tuple[int, int, int]], new_m: _Mapped,
                 start: int, count: int, level: int) -> tuple[Any, bytes | None, bytes]:
    """(encode result, zstd payload or None when nothing changed, page hashes) of one
    window; touches nothing shared, so windows run in parallel threads."""
    base = (_base_window(old_m.buf, segs, start, count, readonly=True)
            if old_m is not None else bytearray(count * PAGE))
    cur = memoryview(new_m.buf)[start * PAGE : (start + count) * PAGE]
    enc = pagediff.encode(base, cur)
    hashes = pagediff.page_hashes(cur).tobytes()  # while the window is hot
    del base, cur  # release the views before the mmaps close
    new_m.drop(start, count)
    if old_m is not None:
        lo, hi = _old_span(segs, start, count)
        old_m.drop(lo, hi - lo)
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
                old_map: Pagemap | None, old_pages: dict[str, str], window: int,
                zc: zstandard.ZstdCompressor, st: DiffStats,
                files: dict[str, dict[str, Any]], level: int, threads: int) -> Iterator[Change]:
    new_m = _Mapped(new / name)
    old_name = f"pages-{old_map.pages_id}.img" if old_map is not None else None
    old_m = (_Mapped(old / old_name) if old is not None and old_name in old_pages
             and (old / old_name).is_file() else None)
    try:
        total = new_m.size // PAGE
        if new_m.size % PAGE or total != new_map.present_pages:
            raise ImageFormatError(
                f"pages file holds {new_m.size} bytes, its pagemap says {new_map.present_pages} "
                "pages", path=str(new / name))
        segs = _segments(old_map, new_map) if old_m is not None else []
        st.pages_total += total
        hashes = bytearray()
        jobs = [(start, min(window, total - start)) for start in range(0, total, window)]

        def work(start: int, count: int) -> tuple[int, int, Any, bytes | None, bytes]:
            return (start, count, *_diff_window(old_m, segs, new_m, start, count, level))

        for start, count, enc, payload, h in _in_order(work, jobs, threads):
            hashes += h
            st.bytes_in += count * PAGE
            st.pages_changed += enc.pages_zero + enc.pages_delta + enc.pages_raw
            st.pages_zero += enc.pages_zero
            st.pages_delta += enc.pages_delta
            st.pages_raw += enc.pages_raw
            if payload is not None:
                st.bytes_out += len(payload)
                yield Change(PAGES, name, start, count, payload)
        files[name] = _pages_digest(new_m.size, bytes(hashes)) if total else _bytes_digest(b"")
        if total == 0:
            yield Change(FILE_WHOLE, name, 0, 0, zc.compress(b""))
    finally:
        new_m.close()
        if old_m is not None:
            old_m.close()


# --- rebuild ------------------------------------------------------------------------------


class Rebuilder:
    """Applies a change stream to ``old_dir`` (None: nothing), writing ``out_dir``.

    With ``consume_old=True`` (the receiver, which discards the previous image
    anyway) a pages file whose layout did not change is moved, not copied, and
    patched in place; the old directory is unusable afterwards.
    """

    def __init__(self, old_dir: str | os.PathLike[str] | None,
                 out_dir: str | os.PathLike[str], *, consume_old: bool = False,
                 old_hashes: dict[str, bytes] | None = None) -> None:
        self.consume_old = consume_old
        # Per-page hashes of the old dump's pages files, from the previous verified
        # rebuild: a file patched in place is then re-hashed only where it was patched.
        self._old_hashes = old_hashes or {}
        self.page_hashes: dict[str, bytes] = {}
        """After ``finish()``: per-page hashes of the verified result (pass them as
        ``old_hashes`` to the next iteration's rebuilder)."""
        # Windows patched in place, in arrival order, with their pages' hashes taken
        # right after the patch (while the window is hot, and before the last item).
        self._patched: dict[str, list[tuple[int, bytes]]] = {}
        self._base_hashes: dict[str, bytes] = {}
        self._inplace: dict[str, tuple[Any, mmap.mmap | None]] = {}
        self.old = pathlib.Path(old_dir) if old_dir is not None else None
        self.out = pathlib.Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._old_maps: dict[str, Pagemap] | None = None
        self._pages_state: dict[str, tuple[Any, list[tuple[int, int, int]], Any, int]] = {}
        self._manifest: Manifest | None = None
        self._zd = zstandard.ZstdDecompressor()
        self._touched: dict[str, list[tuple[int, int]]] = {}
        self._deferred: list[Change] = []
        self._deferred_bytes = 0

    def apply(self, c: Change) -> None:
        """Apply one item. Items may arrive in any order (lanes interleave them): the
        manifest is kept for ``finish()``, and pages that arrive before their pagemap
        wait for it."""
        if c.kind == MANIFEST:
            if self._manifest is not None:
                raise DeltaFormatError("a second manifest")
            try:
                files = json.loads(c.data)
            except ValueError as exc:
                raise DeltaFormatError("manifest is not JSON", cause=exc) from exc
            if not isinstance(files, dict):
                raise DeltaFormatError("manifest is not an object")
            self._manifest = Manifest(files)
            return
        name = _safe_name(c.name)
        if c.kind == FILE_SAME:
            if self.old is None or not (self.old / name).is_file():
                raise DeltaFormatError(f"{name} marked unchanged but there is no old copy")
            shutil.copyfile(self.old / name, self.out / name)
        elif c.kind in (FILE_WHOLE, FILE_ZDELTA):
            if c.a > MAX_FILE:
                raise DeltaFormatError(f"{name}: declared size {c.a} too large")
            if c.kind == FILE_ZDELTA:
                if self.old is None or not (self.old / name).is_file():
                    raise DeltaFormatError(f"{name}: delta against a file we do not have")
                dictionary = zstandard.ZstdCompressionDict(
                    (self.old / name).read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                zd = zstandard.ZstdDecompressor(dict_data=dictionary)
            else:
                zd = self._zd
            try:
                data = zd.decompress(c.data, max_output_size=c.a)
            except zstandard.ZstdError as exc:
                raise DeltaFormatError(f"{name}: corrupt zstd data", cause=exc) from exc
            if len(data) != c.a:
                raise DeltaFormatError(f"{name}: {len(data)} bytes, header says {c.a}")
            (self.out / name).write_bytes(data)
        elif c.kind == PAGES and name not in self._pages_state and not self._has_pagemap(name):
            self._deferred_bytes += len(c.data)
            if self._deferred_bytes > MAX_DEFERRED:
                raise DeltaFormatError(f"too many pages arrived before their pagemap ({name})")
            self._deferred.append(c)
            return
        else:
            self._apply_pages(name, c)
            return
        if self._deferred:  # a file arrived: it may be the pagemap some pages wait for
            waiting, self._deferred, self._deferred_bytes = self._deferred, [], 0
            for d in waiting:
                self.apply(d)

    def _has_pagemap(self, name: str) -> bool:
        return name in _pages_files(_pagemaps(self.out))

    def _take_over(self, name: str, old_path: pathlib.Path, total: int,
                   segs: list[tuple[int, int, int]], old_total: int) -> None:
        """Start from the old file itself and patch in place. A changed layout (a
        mapping grew, a page appeared) is first rearranged inside the file: far less
        work, and no fresh memory, compared with writing the whole file anew."""
        target = self.out / name
        if self.consume_old:
            os.rename(old_path, target)
        else:
            shutil.copyfile(old_path, target)
        f = open(target, "r+b")  # noqa: SIM115
        known = self._old_hashes.get(old_path.name)
        if not _identity(segs, total) or old_total != total:
            size = max(total, old_total) * PAGE
            f.truncate(size)
            with mmap.mmap(f.fileno(), size) as work:
                _rearrange(work, segs, total)
            f.truncate(total * PAGE)
            if known is not None and len(known) == old_total * 8:
                # The carried hashes move with their pages; new pages are zero for now.
                h = bytearray(pagediff.page_hashes(bytes(PAGE)).tobytes() * total)
                for new_idx, old_idx, n in segs:
                    h[new_idx * 8 : (new_idx + n) * 8] = known[old_idx * 8 : (old_idx + n) * 8]
                known = bytes(h)
            else:
                known = None
        if known is not None:
            self._base_hashes[name] = known
        mm = mmap.mmap(f.fileno(), 0) if total else None
        self._inplace[name] = (f, mm)

    def _page_state(self, name: str) -> tuple[Any, list[tuple[int, int, int]], Any, int]:
        if name in self._pages_state:
            return self._pages_state[name]
        new_maps = _pagemaps(self.out)
        owner = _pages_files(new_maps).get(name)
        if owner is None:
            raise DeltaFormatError(f"pages for {name} arrived before its pagemap")
        new_map = new_maps[owner]
        if self._old_maps is None:
            self._old_maps = _pagemaps(self.old) if self.old is not None else {}
        old_map = self._old_maps.get(owner)
        old_m = None
        segs: list[tuple[int, int, int]] = []
        if old_map is not None and self.old is not None:
            p = self.old / f"pages-{old_map.pages_id}.img"
            if p.is_file():
                old_m = _Mapped(p)
                segs = _segments(old_map, new_map)
        total = new_map.present_pages
        old_total = old_map.present_pages if old_map is not None else 0
        if (old_m is not None and total > 0 and old_m.size == old_total * PAGE
                and _rearrangeable(segs, total, old_total)):
            old_m.close()
            assert self.old is not None and old_map is not None
            self._take_over(name, self.old / f"pages-{old_map.pages_id}.img", total, segs,
                            old_total)
            taken: tuple[Any, list[tuple[int, int, int]], Any, int] = (None, [], None, total)
            self._pages_state[name] = taken
            return taken
        f = open(self.out / name, "wb")  # noqa: SIM115
        f.truncate(total * PAGE)
        # Windows no chunk touches are filled from the old pages in finish().
        state = (old_m, segs, f, total)
        self._pages_state[name] = state
        return state

    def _apply_pages(self, name: str, c: Change) -> None:
        old_m, segs, f, total = self._page_state(name)
        start, count = c.a, c.b
        if count <= 0 or start + count > total:
            raise DeltaFormatError(f"{name}: pages {start}+{count} outside {total}")
        stream = pagediff.decompress(c.data, count * pagediff.MAX_RECORD)
        if name in self._inplace:
            _, mm = self._inplace[name]
            assert mm is not None
            view = memoryview(mm)[start * PAGE : (start + count) * PAGE]
            try:
                pagediff.decode(view, stream)
                hashes = pagediff.page_hashes(view).tobytes()
            finally:
                view.release()
            drop(mm, start, count)
            self._patched.setdefault(name, []).append((start, hashes))
            return
        base = (_base_window(old_m.buf, segs, start, count) if old_m is not None
                else bytearray(count * PAGE))
        if old_m is not None:
            lo, hi = _old_span(segs, start, count)
            old_m.drop(lo, hi - lo)
        pagediff.decode(base, stream)
        f.seek(start * PAGE)
        f.write(base)
        self._touched.setdefault(name, []).append((start, count))

    def _fill_untouched(self) -> None:
        # Windows with no changes were not sent: copy them from the old layout.
        for name, (old_m, segs, f, total) in self._pages_state.items():
            if name in self._inplace:
                continue  # started from the old pages: untouched windows are right already
            done = sorted(self._touched.get(name, []))
            pos = 0
            gaps = []
            for s, n in done:
                if s > pos:
                    gaps.append((pos, s - pos))
                pos = max(pos, s + n)
            if pos < total:
                gaps.append((pos, total - pos))
            for s, n in gaps:
                for w in range(s, s + n, DEFAULT_WINDOW_PAGES):
                    cnt = min(DEFAULT_WINDOW_PAGES, s + n - w)
                    base = (_base_window(old_m.buf, segs, w, cnt) if old_m is not None
                            else bytearray(cnt * PAGE))
                    if old_m is not None:
                        lo, hi = _old_span(segs, w, cnt)
                        old_m.drop(lo, hi - lo)
                    f.seek(w * PAGE)
                    f.write(base)

    def _carry_hashes(self) -> None:
        # Files patched in place: the old hashes hold wherever no chunk wrote.
        for name, (_, mm) in self._inplace.items():
            known = self._base_hashes.get(name)
            if mm is None or known is None or len(known) != len(mm) // PAGE * 8:
                continue
            h = bytearray(known)
            for start, hashes in self._patched.get(name, []):
                h[start * 8 : start * 8 + len(hashes)] = hashes
            self.page_hashes[name] = bytes(h)

    def close(self) -> None:
        """Release files (also on failure)."""
        for old_m, _, f, _ in self._pages_state.values():
            if f is not None:
                f.close()
            if old_m is not None:
                old_m.close()
        self._pages_state.clear()
        for f, mm in self._inplace.values():
            if mm is not None:
                mm.flush()
                mm.close()
            f.close()
        self._inplace.clear()

    def finish(self) -> Manifest:
        """Complete the pages files and verify the result against the manifest."""
        try:
            if self._manifest is None:
                raise DeltaFormatError("the change stream ended without a manifest")
            if self._deferred:
                raise DeltaFormatError(
                    f"pages for {sorted({c.name for c in self._deferred})} arrived but their "
                    "pagemap never did")
            # Pages files whose every window was unchanged got no item at all.
            for name in _pages_files(_pagemaps(self.out)):
                if name in self._manifest.files and name not in self._pages_state:
                    self._page_state(name)
            self._fill_untouched()
            self._carry_hashes()
        finally:
            self.close()
        got = manifest(self.out, self.page_hashes)
        want = self._manifest
        if got.files != want.files:
            missing = sorted(set(want.files) - set(got.files))
            extra = sorted(set(got.files) - set(want.files))
            differ = sorted(k for k in set(want.files) & set(got.files)
                            if want.files[k] != got.files[k])
            raise ImageFormatError(
                f"rebuilt image differs from the source: missing {missing}, extra {extra}, "
                f"different {differ}", path=str(self.out))
        return got
