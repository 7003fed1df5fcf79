"""Live memory reads (pre-copy without freezing): content, layout, errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

from ctlive import errors
from ctlive.backends import liveread
from ctlive.images import criu_format

PAGE = criu_format.PAGE_SIZE

_CHILD = """
import ctypes, mmap, sys, time
P = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
m = mmap.mmap(-1, 64 * 4096, flags=P)
for i in range(64):
    m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096 if i % 3 else bytes(4096)
m2 = mmap.mmap(-1, 8 * 4096, flags=P)  # mapped, never touched: nothing to dump
print(ctypes.addressof(ctypes.c_char.from_buffer(m)),
      ctypes.addressof(ctypes.c_char.from_buffer(m2)), flush=True)
time.sleep(60)
"""


@pytest.fixture
def child() -> tuple[int, int, int]:
    p = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    addr, untouched = map(int, p.stdout.readline().split())
    yield p.pid, addr, untouched
    p.kill()
    p.wait()


def test_read_lays_out_pages_as_criu_does(child: tuple[int, int, int],
                                          tmp_path: pathlib.Path) -> None:
    pid, addr, untouched = child
    st = liveread.read_tree([pid], tmp_path)
    assert st.processes == 1 and st.pages > 64 and st.unreadable_pages == 0
    # Named by the pid CRIU will use (no PID namespace here: the pid itself).
    pm = criu_format.read_pagemap(tmp_path / f"pagemap-{pid}.img")
    data = (tmp_path / f"pages-{pm.pages_id}.img").read_bytes()
    assert len(data) == pm.present_pages * PAGE
    where = {}
    for vaddr, n, idx in pm.runs():
        for i in range(n):
            where[vaddr + i * PAGE] = idx + i
    # Every written page of the buffer is there, at its address, with its bytes.
    for i in range(64):
        if i % 3:
            at = where[addr + i * PAGE]
            assert data[at * PAGE : (at + 1) * PAGE] == bytes([i + 1]) * PAGE
    # Pages never touched are not present, so they are not read.
    assert not any(untouched + i * PAGE in where for i in range(8))


def test_read_of_a_workload_that_is_gone_is_a_ctlive_error(tmp_path: pathlib.Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    time.sleep(0.05)
    with pytest.raises(errors.CheckpointError):
        liveread.read_tree([p.pid], tmp_path)


def test_a_child_that_ended_is_left_out(child: tuple[int, int, int],
                                        tmp_path: pathlib.Path) -> None:
    """Short-lived processes come and go in a tree: one that ended between listing the
    tree and reading it is not an error, and leaves no stray files."""
    pid, _, _ = child
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    st = liveread.read_tree([pid, gone.pid], tmp_path)
    assert st.processes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pages-1.img", f"pagemap-{pid}.img"])


def _runs_reference(entries: list[int], start: int, zero_pfn: int) -> list[tuple[int, int]]:
    """Entry by entry, the rule CRIU applies (present or swapped, not the file's page,
    not the zero page), as (vaddr, pages) runs."""
    out: list[tuple[int, int]] = []
    for i, e in enumerate(entries):
        keep = bool(e & (1 << 63 | 1 << 62)) and not e & 1 << 61 and not (
            e & 1 << 63 and e & ((1 << 55) - 1) == zero_pfn)
        addr = start + i * PAGE
        if keep and out and out[-1][0] + out[-1][1] * PAGE == addr:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        elif keep:
            out.append((addr, 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_pagemap_scan_matches_the_rule_entry_by_entry(tmp_path: pathlib.Path,
                                                      seed: int) -> None:
    """The chunked, table-driven scan keeps exactly the pages the per-entry rule keeps,
    across chunk boundaries, soft-dirty bits and entries that map the zero page."""
    import os
    import random

    r = random.Random(seed)
    zero_pfn = r.randrange(1, 1 << 40)
    n = r.randint(1, 3 * liveread._CHUNK_PAGES)
    entries = []
    for _ in range(n):
        flags = r.choice([0, 1 << 63, 1 << 62, 1 << 63 | 1 << 61, 1 << 62 | 1 << 61])
        flags |= r.choice([0, 1 << 55, 1 << 56])  # soft-dirty, exclusively mapped
        pfn = zero_pfn if r.random() < 0.2 else r.randrange(1 << 40)
        entries.append(flags | (pfn if flags & 1 << 63 else r.randrange(1 << 20)))
    start = 0x7F0000000000
    f = tmp_path / "pagemap"
    # As /proc/PID/pagemap: the entry of page P at offset P * 8.
    with open(f, "wb") as out:
        out.seek(start // PAGE * 8)
        out.write(b"".join(e.to_bytes(8, "little") for e in entries))
    fd = os.open(f, os.O_RDONLY)
    try:
        got = list(liveread._runs(fd, start, start + n * PAGE, zero_pfn))
    finally:
        os.close(fd)
    assert got == _runs_reference(entries, start, zero_pfn)
