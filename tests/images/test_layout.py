"""Page layout: segments, base windows, in-place rearrangement, the pagemap cache."""

from __future__ import annotations

import concurrent.futures
import mmap
import pathlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive.images import criu_format, layout
from ctlive.images.criu_format import PAGE_SIZE
from ctlive.images.layout import Segment


def _pagemap(path: pathlib.Path, runs: list[tuple[int, int]]) -> None:
    criu_format.write_pagemap(path, 1, [
        criu_format.PagemapEntry(v, n, criu_format.PE_PRESENT) for v, n in runs])


def test_segments_match_pages_by_vaddr(tmp_path: pathlib.Path) -> None:
    _pagemap(tmp_path / "old.img", [(0x10000, 4), (0x20000, 2)])
    _pagemap(tmp_path / "new.img", [(0x0F000, 3), (0x20000, 2)])
    old = criu_format.read_pagemap(tmp_path / "old.img")
    new = criu_format.read_pagemap(tmp_path / "new.img")
    # New pages 1-2 are old pages 0-1; new 3-4 are old 4-5.
    assert layout.segments(old, new) == [Segment(1, 0, 2), Segment(3, 4, 2)]
    assert layout.segments(None, new) == []


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), min_size=1, max_size=6),
       st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_rearrange_matches_copying(gaps: list[tuple[int, int]], seed: int) -> None:
    """In-place moves give what copying each segment into a fresh buffer gives."""
    r = random.Random(seed)
    segs, new_pos, old_pos = [], 0, 0
    for gap, n in gaps:
        new_pos += gap if r.random() < 0.5 else 0
        old_pos += gap if r.random() < 0.5 else 0
        segs.append(Segment(new_pos, old_pos, n))
        new_pos += n
        old_pos += n
    total = new_pos + r.randint(0, 3)
    old = r.randbytes(old_pos * PAGE_SIZE)
    want = bytes(layout.base_window(old, segs, 0, total))
    for window in (1, 2, 1 << 12):  # moved a window at a time, in the right direction
        m = mmap.mmap(-1, max(total, old_pos) * PAGE_SIZE)
        m[: len(old)] = old
        layout.rearrange(m, segs, total, window)
        assert m[: total * PAGE_SIZE] == want


class _Old:
    """Stands in for a MappedFile: records what is dropped."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.dropped: list[tuple[int, int]] = []

    def drop(self, first_page: int, pages: int) -> None:
        self.dropped.append((first_page, pages))


def test_take_base_window_drops_the_old_span_after_use() -> None:
    pages = b"".join(bytes([i]) * PAGE_SIZE for i in range(10))
    old = _Old(pages)
    segs = [Segment(0, 2, 3), Segment(5, 6, 4)]
    for readonly in (False, True):
        old.dropped.clear()
        with layout.take_base_window(old, segs, 1, 5, readonly=readonly) as base:
            assert bytes(base) == bytes(layout.base_window(pages, segs, 1, 5))
            assert old.dropped == []  # a view must not lose its pages while in use
        assert old.dropped == [(3, 4)]  # old pages 3-4 (new 1-2) and 6 (new 5)
    with layout.take_base_window(old, segs, 5, 2, readonly=True) as base:
        assert isinstance(base, memoryview)  # one contiguous old range: no copy
        del base
    with layout.take_base_window(None, segs, 0, 2) as base:
        assert base == bytes(2 * PAGE_SIZE)


def test_pagemap_cache_parses_each_version_once(tmp_path: pathlib.Path) -> None:
    cache = layout.PagemapCache(limit=2)
    _pagemap(tmp_path / "pagemap-1.img", [(0x1000, 1)])
    first = cache.pagemaps(tmp_path)["pagemap-1.img"]
    assert cache.pagemaps(tmp_path)["pagemap-1.img"] is first
    _pagemap(tmp_path / "pagemap-1.img", [(0x1000, 1), (0x9000, 2)])  # a new version
    second = cache.pagemaps(tmp_path)["pagemap-1.img"]
    assert second.present_pages == 3
    for pid in (2, 3, 4):  # beyond the limit, the oldest are forgotten
        _pagemap(tmp_path / f"pagemap-{pid}.img", [(0x1000 * pid, pid)])
    assert cache.pagemaps(tmp_path)["pagemap-4.img"].present_pages == 4
    assert len(cache._maps) == 2


def test_pagemap_cache_from_threads(tmp_path: pathlib.Path) -> None:
    cache = layout.PagemapCache(limit=3)
    for pid in range(1, 9):
        _pagemap(tmp_path / f"pagemap-{pid}.img", [(0x1000, pid)])

    def look(i: int) -> int:
        return cache.pagemap(tmp_path / f"pagemap-{i % 8 + 1}.img").present_pages

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(look, range(2000)))
    assert got == [i % 8 + 1 for i in range(2000)]
    assert len(cache._maps) <= 3
