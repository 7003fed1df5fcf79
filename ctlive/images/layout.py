"""Where pages sit: pagemaps of a dump, the segments that match old pages to new ones
by virtual address, windows of old pages laid out in the new order, in-place
rearrangement, and read-only mappings that keep memory bounded."""

from __future__ import annotations

import bisect
import contextlib
import mmap
import pathlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from ctlive.images.criu_format import PAGE_SIZE, Pagemap, read_pagemap

__all__ = [
    "DEFAULT_WINDOW_PAGES",
    "MappedFile",
    "PagemapCache",
    "Segment",
    "base_window",
    "drop",
    "old_span",
    "pagemaps",
    "pages_files",
    "rearrange",
    "rearrangeable",
    "same_layout",
    "segments",
    "take_base_window",
]

DEFAULT_WINDOW_PAGES = 4096
"""Pages per window (16 MiB): the unit of diffing, rebuilding and hashing."""


class PagemapCache:
    """Parsed pagemaps, keyed by file identity and version (device, inode, mtime,
    size); the oldest are forgotten beyond ``limit``. Safe to share between threads."""

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int, int, int], Pagemap] = {}

    def pagemap(self, p: pathlib.Path) -> Pagemap:
        """The pagemap in file ``p``, parsed once per version of the file."""
        st = p.stat()
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            pm = self._maps.get(key)
        if pm is None:
            pm = read_pagemap(p)  # outside the lock: two threads may both parse, harmlessly
            with self._lock:
                while len(self._maps) >= self._limit:
                    self._maps.pop(next(iter(self._maps)))
                self._maps[key] = pm
        return pm

    def pagemaps(self, d: pathlib.Path) -> dict[str, Pagemap]:
        """pagemap file name -> pagemap, for every pagemap of dump directory ``d``."""
        return {p.name: self.pagemap(p) for p in sorted(d.glob("pagemap-*.img"))}


# Each dump's pagemaps are looked up as the new dump of one diff, then as the old dump
# of the next iteration's, and by the rebuilder whenever an item may have brought one:
# one cache for the process keeps that to one parse per file.
_PAGEMAPS = PagemapCache()


def pagemaps(d: pathlib.Path) -> dict[str, Pagemap]:
    """pagemap file name -> pagemap, for every pagemap of dump directory ``d``
    (through the process's :class:`PagemapCache`)."""
    return _PAGEMAPS.pagemaps(d)


class Segment(NamedTuple):
    """A run of ``pages`` pages present in both dumps: new page index ``new`` onwards
    holds what old page index ``old`` onwards held."""

    new: int
    old: int
    pages: int


def segments(old: Pagemap | None, new: Pagemap) -> list[Segment]:
    """The pages present in both pagemaps, matched by vaddr, in new-index order."""
    if old is None:
        return []
    old_runs = sorted(old.runs())
    starts = [r[0] for r in old_runs]
    out: list[Segment] = []
    for vaddr, n, idx in new.runs():
        end = vaddr + n * PAGE_SIZE
        i = max(bisect.bisect_right(starts, vaddr) - 1, 0)
        while i < len(old_runs) and old_runs[i][0] < end:
            ov, on, oidx = old_runs[i]
            lo, hi = max(vaddr, ov), min(end, ov + on * PAGE_SIZE)
            if lo < hi:
                seg = Segment(idx + (lo - vaddr) // PAGE_SIZE, oidx + (lo - ov) // PAGE_SIZE,
                              (hi - lo) // PAGE_SIZE)
                last = out[-1] if out else None
                if (last is not None and last.new + last.pages == seg.new
                        and last.old + last.pages == seg.old):
                    # Adjacent mappings that sit next to each other in both files: one
                    # segment, so that whole windows can be read in place.
                    out[-1] = last._replace(pages=last.pages + seg.pages)
                else:
                    out.append(seg)
            i += 1
    return out


def old_span(segs: list[Segment], start: int, count: int) -> tuple[int, int]:
    """[lo, hi) old page indices that new pages [start, start+count) read from."""
    lo, hi = 1 << 62, 0
    for new_idx, old_idx, n in segs:
        a, b = max(new_idx, start), min(new_idx + n, start + count)
        if a < b:
            lo, hi = min(lo, old_idx + a - new_idx), max(hi, old_idx + b - new_idx)
    return (lo, hi) if lo < hi else (0, 0)


def same_layout(segs: list[Segment], total: int) -> bool:
    """Every new page sits at the same index in the old file (unchanged layout)."""
    pos = 0
    for new_idx, old_idx, n in segs:
        if new_idx != pos or old_idx != new_idx:
            return False
        pos += n
    return pos == total


def rearrange(mm: mmap.mmap, segs: list[Segment], total: int,
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
        mm.move(new_idx * PAGE_SIZE, old_idx * PAGE_SIZE, n * PAGE_SIZE)
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
    for new_idx, _, n in [*segs, Segment(total, 0, 0)]:
        for at in range(pos, new_idx, w):
            k = min(w, new_idx - at)
            mm[at * PAGE_SIZE : (at + k) * PAGE_SIZE] = bytes(k * PAGE_SIZE)
            drop(mm, at, k)
        pos = new_idx + n


def rearrangeable(segs: list[Segment], total: int, old_total: int) -> bool:
    """Segments in order, inside both files, covering most of the new file: cheaper to
    rearrange the old file in place than to write a new one."""
    pos_new = pos_old = covered = 0
    for new_idx, old_idx, n in segs:
        if n <= 0 or new_idx < pos_new or old_idx < pos_old:
            return False
        pos_new, pos_old = new_idx + n, old_idx + n
        covered += n
    return pos_new <= total and pos_old <= old_total and covered * 2 >= total


def _contiguous(segs: list[Segment], start: int, count: int) -> int | None:
    """Old page index where [start, start+count) lies as one contiguous old range."""
    for new_idx, old_idx, n in segs:
        if new_idx <= start and start + count <= new_idx + n:
            return old_idx + start - new_idx
    return None


def base_window(old_pages: Any, segs: list[Segment], start: int,
                count: int, *, readonly: bool = False) -> Any:
    """The receiver's old pages laid out as new pages [start, start+count).

    With ``readonly``, a window that is one contiguous old range is returned as a
    zero-copy view of the old file (the common case: unchanged mappings)."""
    if readonly:
        at = _contiguous(segs, start, count)
        if at is not None:
            return memoryview(old_pages)[at * PAGE_SIZE : (at + count) * PAGE_SIZE]
    base = bytearray(count * PAGE_SIZE)
    for new_idx, old_idx, n in segs:
        lo, hi = max(new_idx, start), min(new_idx + n, start + count)
        if lo < hi:
            src, dst = (old_idx + lo - new_idx) * PAGE_SIZE, (lo - start) * PAGE_SIZE
            size = (hi - lo) * PAGE_SIZE
            base[dst : dst + size] = old_pages[src : src + size]
    return base


@contextlib.contextmanager
def take_base_window(old: MappedFile | None, segs: list[Segment], start: int, count: int,
                     *, readonly: bool = False) -> Iterator[Any]:
    """:func:`base_window` of the old pages file (zeros without one), for the ``with``
    block; then the old pages it read are dropped from their mapping.

    The drop waits for the end of the block because a ``readonly`` window may be a
    view of the old mapping: dropping first would leave the pages its user reads
    resident, and memory no longer bounded by the window."""
    if old is None:
        yield bytearray(count * PAGE_SIZE)
        return
    window = base_window(old.buf, segs, start, count, readonly=readonly)
    try:
        yield window
    finally:
        del window  # this frame's reference to a view of the mapping
        lo, hi = old_span(segs, start, count)
        old.drop(lo, hi - lo)


class MappedFile:
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
        """Unmap and close (no views of the mapping may be left)."""
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        self._f.close()


def drop(m: Any, first_page: int, pages: int) -> None:
    """MADV_DONTNEED on pages of a shared file mapping: their data stays in the file."""
    if isinstance(m, mmap.mmap) and pages > 0:
        length = min(pages * PAGE_SIZE, len(m) - first_page * PAGE_SIZE)
        if length > 0:
            m.madvise(mmap.MADV_DONTNEED, first_page * PAGE_SIZE, length)


def pages_files(maps: dict[str, Pagemap]) -> dict[str, str]:
    """pages file name -> pagemap file name."""
    return {f"pages-{pm.pages_id}.img": name for name, pm in maps.items()}
