"""Where pages sit: pagemaps of a dump, the segments that match old pages to new ones
by virtual address, windows of old pages laid out in the new order, in-place
rearrangement, and read-only mappings that keep memory bounded."""

from __future__ import annotations

import bisect
import mmap
import pathlib
from typing import Any

from ctlive.images import pagediff
from ctlive.images.criu_format import Pagemap, read_pagemap

__all__ = [
    "PAGE",
    "MappedFile",
    "base_window",
    "drop",
    "old_span",
    "pagemaps",
    "pages_files",
    "rearrange",
    "rearrangeable",
    "same_layout",
    "segments",
]

PAGE = pagediff.PAGE_SIZE

DEFAULT_WINDOW_PAGES = 4096  # 16 MiB of pages per chunk


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


def pagemaps(d: pathlib.Path) -> dict[str, Pagemap]:
    return {p.name: _pagemap(p) for p in sorted(d.glob("pagemap-*.img"))}


def segments(old: Pagemap | None, new: Pagemap) -> list[tuple[int, int, int]]:
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


def old_span(segs: list[tuple[int, int, int]], start: int, count: int) -> tuple[int, int]:
    """[lo, hi) old page indices that new pages [start, start+count) read from."""
    lo, hi = 1 << 62, 0
    for new_idx, old_idx, n in segs:
        a, b = max(new_idx, start), min(new_idx + n, start + count)
        if a < b:
            lo, hi = min(lo, old_idx + a - new_idx), max(hi, old_idx + b - new_idx)
    return (lo, hi) if lo < hi else (0, 0)


def same_layout(segs: list[tuple[int, int, int]], total: int) -> bool:
    """Every new page sits at the same index in the old file (unchanged layout)."""
    pos = 0
    for new_idx, old_idx, n in segs:
        if new_idx != pos or old_idx != new_idx:
            return False
        pos += n
    return pos == total


def rearrange(mm: mmap.mmap, segs: list[tuple[int, int, int]], total: int,
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


def rearrangeable(segs: list[tuple[int, int, int]], total: int, old_total: int) -> bool:
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


def base_window(old_pages: Any, segs: list[tuple[int, int, int]], start: int,
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
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        self._f.close()


def drop(m: Any, first_page: int, pages: int) -> None:
    """MADV_DONTNEED on pages of a shared file mapping: their data stays in the file."""
    if isinstance(m, mmap.mmap) and pages > 0:
        length = min(pages * PAGE, len(m) - first_page * PAGE)
        if length > 0:
            m.madvise(mmap.MADV_DONTNEED, first_page * PAGE, length)


def pages_files(maps: dict[str, Pagemap]) -> dict[str, str]:
    """pages file name -> pagemap file name."""
    return {f"pages-{pm.pages_id}.img": name for name, pm in maps.items()}
