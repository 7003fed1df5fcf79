"""Pre-dump chains: incremental images (PE_PARENT runs) flattened through three levels,
and the final diff computed against what the destination really holds."""

from __future__ import annotations

import os
import pathlib
import random

import pytest
import zstandard

from ctlive import errors
from ctlive.images import chain
from ctlive.images import diff as image_diff
from ctlive.images.criu_format import (
    PAGE_SIZE,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    read_pagemap,
    write_pagemap,
)

P = PAGE_SIZE
A, B = 0x7F0000000000, 0x7F0001000000


def dump(d: pathlib.Path, entries: list[tuple[int, int, int]], pages: bytes) -> pathlib.Path:
    d.mkdir(parents=True)
    write_pagemap(d / "pagemap-1.img", 1, [PagemapEntry(v, n, f) for v, n, f in entries])
    (d / "pages-1.img").write_bytes(pages)
    (d / "core-1.img").write_bytes(b"core " + d.name.encode())
    return d


def test_three_levels_resolve_to_the_full_memory(tmp_path: pathlib.Path) -> None:
    r = random.Random(3)
    mem = {A + i * P: r.randbytes(P) for i in range(8)}  # level 0: a full dump
    d0 = dump(tmp_path / "d0", [(A, 8, PE_PRESENT)], b"".join(mem[A + i * P] for i in range(8)))
    # level 1: pages 0-1 changed, 2-7 in the parent
    for i in (0, 1):
        mem[A + i * P] = r.randbytes(P)
    d1 = dump(tmp_path / "d1", [(A, 2, PE_PRESENT), (A + 2 * P, 6, PE_PARENT)],
              mem[A] + mem[A + P])
    # level 2: page 1 and 7 changed, a new run at B; page 0 comes from level 1, 2-6 from 0
    for i in (1, 7):
        mem[A + i * P] = r.randbytes(P)
    mem[B], mem[B + P] = r.randbytes(P), r.randbytes(P)
    d2 = dump(tmp_path / "d2", [(A, 1, PE_PARENT), (A + P, 1, PE_PRESENT),
                                (A + 2 * P, 5, PE_PARENT), (A + 7 * P, 1, PE_PRESENT),
                                (B, 2, PE_PRESENT)],
              mem[A + P] + mem[A + 7 * P] + mem[B] + mem[B + P])
    f0 = tmp_path / "f0"
    chain.flatten(d0, None, f0)
    chain.flatten(d1, f0, tmp_path / "f1")
    st = chain.flatten(d2, tmp_path / "f1", tmp_path / "f2")
    assert (st.pages_own, st.pages_from_parent) == (4, 6)
    pm = read_pagemap(tmp_path / "f2" / "pagemap-1.img")
    assert all(e.flags == PE_PRESENT for e in pm.entries)
    want = b"".join(mem[v + i * P] for v, n, _ in pm.runs() for i in range(n))
    assert (tmp_path / "f2" / "pages-1.img").read_bytes() == want
    assert (tmp_path / "f2" / "core-1.img").read_bytes() == b"core d2"
    assert chain.has_parent_pages(d2) and not chain.has_parent_pages(tmp_path / "f2")


def test_final_diff_sends_only_the_changed_pages(tmp_path: pathlib.Path) -> None:
    """The final (full) dump diffed against the flat chain is within 1.1x of the changed
    pages' XOR+zstd; against the incremental image it resends the pages only a parent
    holds."""
    r = random.Random(5)
    n = 256
    mem = [r.randbytes(P) for _ in range(n)]
    d0 = dump(tmp_path / "d0", [(A, n, PE_PRESENT)], b"".join(mem))
    changed = list(range(0, n, 32))  # 8 pages dirtied between the pre-dumps
    for i in changed:
        mem[i] = mem[i][:100] + r.randbytes(16) + mem[i][116:]
    entries: list[tuple[int, int, int]] = []
    for i in range(n):
        entries.append((A + i * P, 1, PE_PRESENT if i in changed else PE_PARENT))
    d1 = dump(tmp_path / "d1", entries, b"".join(mem[i] for i in changed))
    chain.flatten(d0, None, tmp_path / "f0")
    chain.flatten(d1, tmp_path / "f0", tmp_path / "f1")
    final_changed = list(range(5, n, 40))
    old = list(mem)
    for i in final_changed:
        mem[i] = mem[i][:2000] + r.randbytes(8) + mem[i][2008:]
    final = dump(tmp_path / "final", [(A, n, PE_PRESENT)], b"".join(mem))

    def wire(prev: pathlib.Path) -> tuple[int, int]:
        st = image_diff.DiffStats()
        items = list(image_diff.diff(prev, final, stats=st))
        pages = sum(len(c.data) for c in items if c.kind.name == "PAGES")
        return pages, st.pages_raw

    floor = len(zstandard.ZstdCompressor(level=1).compress(b"".join(
        bytes(a ^ b for a, b in zip(old[i], mem[i], strict=True)) for i in final_changed)))
    flat_bytes, flat_raw = wire(tmp_path / "f1")
    inc_bytes, inc_raw = wire(d1)
    assert flat_raw == 0
    assert flat_bytes <= 1.1 * floor + 512, (flat_bytes, floor)  # + the records' headers
    assert inc_raw > n // 2 and inc_bytes > 50 * flat_bytes


def test_a_broken_chain_is_refused(tmp_path: pathlib.Path) -> None:
    d0 = dump(tmp_path / "d0", [(A, 2, PE_PRESENT)], os.urandom(2 * P))
    d1 = dump(tmp_path / "d1", [(A, 4, PE_PARENT)], b"")  # pages 2-3 are in no parent
    chain.flatten(d0, None, tmp_path / "f0")
    with pytest.raises(errors.ImageFormatError, match="lacks"):
        chain.flatten(d1, tmp_path / "f0", tmp_path / "f1")
    with pytest.raises(errors.ImageFormatError, match="no parent"):
        chain.flatten(d1, None, tmp_path / "f1b")
    short = dump(tmp_path / "short", [(A, 4, PE_PRESENT)], os.urandom(P))
    with pytest.raises(errors.ImageFormatError, match="shorter"):
        chain.flatten(short, None, tmp_path / "f2")


def test_final_iteration_of_a_three_level_chain(tmp_path: pathlib.Path) -> None:
    """Pre-dumps d0 (full), d1, d2 and the final dump d3, each incremental on the one
    before (PE_PARENT), as CRIU writes them with --prev-images-dir; region B is written
    once, before d0, so its pages are only ever in d0. Each is flattened from the image
    the destination holds and the final one is diffed against it, as the source does:
    the final iteration's wire bytes (its encoded change items) stay within 1.1x of the
    changed pages' XOR+zstd, no page goes raw and no page that only a parent holds is
    sent again; the same final state as a full dump costs the same, and diffing the
    unflattened d3 instead resends the parent-only pages."""
    from ctlive.images.changes import encode_change

    r = random.Random(14)
    na, nb = 384, 128
    mem = {A + i * P: r.randbytes(P) for i in range(na)}
    mem.update({B + i * P: r.randbytes(P) for i in range(nb)})
    order = [A + i * P for i in range(na)] + [B + i * P for i in range(nb)]

    def incremental(name: str, dirty: set[int]) -> pathlib.Path:
        entries = [(v, 1, PE_PRESENT if v in dirty else PE_PARENT) for v in order]
        return dump(tmp_path / name, entries, b"".join(mem[v] for v in order if v in dirty))

    def dirty(pages: list[int], width: int) -> set[int]:
        for v in pages:
            at = r.randrange(P - width)
            mem[v] = mem[v][:at] + r.randbytes(width) + mem[v][at + width:]
        return set(pages)

    d0 = dump(tmp_path / "d0", [(A, na, PE_PRESENT), (B, nb, PE_PRESENT)],
              b"".join(mem[v] for v in order))
    d1 = incremental("d1", dirty([A + i * P for i in range(0, na, 3)], 64))
    d2 = incremental("d2", dirty([A + i * P for i in range(1, na, 5)], 64))
    chain.flatten(d1, d0, tmp_path / "flat-1")
    chain.flatten(d2, tmp_path / "flat-1", tmp_path / "flat-2")
    held = tmp_path / "flat-2"  # what the destination holds before the final iteration
    before = dict(mem)
    final_pages = [A + i * P for i in range(2, na, 3)]
    d3 = incremental("d3", dirty(final_pages, 96))
    st3 = chain.flatten(d3, held, tmp_path / "flat-3")
    assert st3.pages_from_parent == na + nb - len(final_pages)

    def wire(prev: pathlib.Path, image: pathlib.Path) -> tuple[int, image_diff.DiffStats]:
        st = image_diff.DiffStats()
        return sum(len(encode_change(c)) for c in image_diff.diff(prev, image, stats=st)), st

    floor = len(zstandard.ZstdCompressor(level=1).compress(b"".join(
        bytes(a ^ b for a, b in zip(before[v], mem[v], strict=True)) for v in final_pages)))
    flat_bytes, flat_st = wire(held, tmp_path / "flat-3")
    assert (flat_st.pages_changed, flat_st.pages_raw) == (len(final_pages), 0)
    assert flat_bytes <= 1.1 * floor, (flat_bytes, floor)
    # The same memory as one full dump (what a kernel without soft-dirty would give).
    full = dump(tmp_path / "full", [(A, na, PE_PRESENT), (B, nb, PE_PRESENT)],
                b"".join(mem[v] for v in order))
    (full / "core-1.img").write_bytes(b"core d3")
    full_bytes, full_st = wire(held, full)
    assert full_st.pages_changed == len(final_pages) and full_st.pages_raw == 0
    assert abs(flat_bytes - full_bytes) <= 64, (flat_bytes, full_bytes)
    # Unflattened, d3 alone describes only its own pages: an image rebuilt from its diff
    # would lack every page only the parents hold (region B among them).
    _, inc_st = wire(held, d3)
    assert inc_st.pages_total == len(final_pages) < na
