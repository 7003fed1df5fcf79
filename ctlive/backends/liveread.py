"""Pre-copy without freezing the workload: read a running process tree's memory.

Without soft-dirty tracking CRIU cannot pre-dump, and ``dump --leave-running`` freezes
the workload for as long as it takes to write all of its memory: every pre-copy
iteration would be an outage as long as a stop-and-copy dump. A pre-copy iteration only
has to give the destination a *base* that the final dump is delta-encoded against, and a
base need not be consistent. So ctlive reads the memory of the running tree itself
(``/proc/PID/pagemap`` for which pages CRIU would dump, ``/proc/PID/mem`` for their
bytes) and lays it out as CRIU would: one ``pagemap-<pid>.img`` and ``pages-<n>.img`` per
process, named by the pid CRIU will use. The final dump, taken by CRIU with the workload
frozen, is diffed against it page by page, by address; the destination rebuilds and
verifies every iteration as usual, and restores only from the final CRIU image.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import re
import struct
import time
from collections.abc import Iterable, Iterator

import anyio
import attrs

from ctlive.backends.workload import DumpMethod, DumpResult, process_tree
from ctlive.errors import CheckpointError, Phase
from ctlive.images.criu_format import PAGE_SIZE, PE_PRESENT, PagemapEntry, write_pagemap

__all__ = [
    "ReadStats",
    "live_read_dump",
    "read_tree",
]

_PM_PRESENT = 1 << 63
_PM_SWAP = 1 << 62
_PM_FILE = 1 << 61  # a page of the file (not yet written privately), or shared anon
_PFN_MASK = (1 << 55) - 1
_CHUNK_PAGES = 1024  # 4 MiB per read: bounded memory
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


@attrs.frozen
class ReadStats:
    """What one read of a tree took."""

    processes: int
    pages: int
    unreadable_pages: int
    """Pages that vanished between the pagemap and the read (written as zeros: the
    base need not be consistent, the final dump decides)."""


def _zero_pfn() -> int | None:
    """The PFN of the kernel's shared zero page (CRIU does not dump pages mapped to
    it); None where PFNs are hidden (not root)."""
    import ctypes

    with mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        _ = m[0]  # a read fault maps the zero page
        view = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(view)
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // PAGE_SIZE * 8)
            (e,) = struct.unpack("<Q", f.read(8))
        del view  # the mapping cannot close while exported
    pfn = e & _PFN_MASK
    return pfn if e & _PM_PRESENT and pfn else None


def _vpid(pid: int) -> int:
    """The pid CRIU names the process's images by: its pid in the innermost PID
    namespace (the tree's own, when it runs in one)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def _private_vmas(pid: int) -> Iterator[tuple[int, int]]:
    """Private, readable mappings CRIU dumps pages of (not vvar/vsyscall)."""
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = _MAPS_LINE.match(line)
        if m is None:
            continue
        start, end, perms, name = int(m[1], 16), int(m[2], 16), m[3], m[4].strip()
        if perms[3] != "p" or perms[0] != "r" or name in ("[vvar]", "[vsyscall]",
                                                          "[vvar_vclock]"):
            continue
        yield start, end


# The top byte of a pagemap entry holds present (0x80), swapped (0x40) and file/shared
# (0x20): a page to dump is present or swapped and not the file's page. As a table for
# bytes.translate, so that a chunk is classified in one C call, not a Python loop.
_KEEP = bytes(1 if b & 0xC0 and not b & 0x20 else 0 for b in range(256))
_RUN = re.compile(rb"\x01+")


def _runs(pagemap: int, start: int, end: int, zero_pfn: int | None
          ) -> Iterator[tuple[int, int]]:
    """(vaddr, pages) runs of the pages CRIU would dump in [start, end): present or
    swapped, written privately (not still the file's page), not the zero page."""
    run_start, run_len = 0, 0
    zero = zero_pfn.to_bytes(7, "little") if zero_pfn is not None else None
    for base in range(start, end, _CHUNK_PAGES * PAGE_SIZE):
        n = min(_CHUNK_PAGES, (end - base) // PAGE_SIZE)
        raw = os.pread(pagemap, n * 8, base // PAGE_SIZE * 8)
        got = len(raw) // 8
        mask = bytearray(raw[7 : got * 8 : 8].translate(_KEEP))
        if zero is not None:
            # Entries mapping the shared zero page: PFN (bits 0-54) equal to its PFN.
            at = raw.find(zero[:6])
            while at >= 0:
                i = at // 8
                if at % 8 == 0 and raw[at + 6] & 0x7F == zero[6] and raw[at + 7] & 0x80:
                    mask[i] = 0
                at = raw.find(zero[:6], at + 1)
        for m in _RUN.finditer(mask):
            addr, count = base + m.start() * PAGE_SIZE, m.end() - m.start()
            if run_len and run_start + run_len * PAGE_SIZE == addr:
                run_len += count  # continues the run that ended the previous chunk
                continue
            if run_len:
                yield run_start, run_len
            run_start, run_len = addr, count
        if got < n:
            break
    if run_len:
        yield run_start, run_len


def _read_process(pid: int, out: pathlib.Path, pages_id: int, zero_pfn: int | None
                  ) -> tuple[int, int]:
    """Write this process's pagemap and pages files; (pages, unreadable pages)."""
    entries: list[PagemapEntry] = []
    pages = unreadable = 0
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        with open(out / f"pages-{pages_id}.img", "wb") as f:
            for start, end in _private_vmas(pid):
                for vaddr, n in _runs(pm, start, end, zero_pfn):
                    entries.append(PagemapEntry(vaddr, n, PE_PRESENT))
                    pages += n
                    for at in range(0, n, _CHUNK_PAGES):
                        k = min(_CHUNK_PAGES, n - at)
                        try:
                            data = os.pread(mem, k * PAGE_SIZE, vaddr + at * PAGE_SIZE)
                        except OSError:
                            data = b""
                        if len(data) < k * PAGE_SIZE:
                            whole = len(data) // PAGE_SIZE
                            unreadable += k - whole
                            data = data[: whole * PAGE_SIZE].ljust(k * PAGE_SIZE, b"\0")
                        f.write(data)
    finally:
        os.close(pm)
        os.close(mem)
    write_pagemap(out / f"pagemap-{_vpid(pid)}.img", pages_id, entries)
    return pages, unreadable


def read_tree(pids: Iterable[int], out: str | os.PathLike[str]) -> ReadStats:
    """Read the memory of the running processes ``pids`` (the tree's root first) into
    ``out`` as CRIU-style pagemap and pages files. Processes that end meanwhile are
    left out; raises :class:`~ctlive.errors.CheckpointError` when the root is gone or a
    process cannot be read (no permission)."""
    d = pathlib.Path(out)
    d.mkdir(parents=True, exist_ok=True)
    zero_pfn = None
    with contextlib.suppress(OSError):
        zero_pfn = _zero_pfn()
    total = unreadable = done = 0
    for n, pid in enumerate(pids, 1):
        try:
            p, u = _read_process(pid, d, n, zero_pfn)
        except (FileNotFoundError, ProcessLookupError) as exc:
            # A process of the tree that ended meanwhile (a short-lived child) is simply
            # not in this base; the workload itself gone is an error.
            (d / f"pages-{n}.img").unlink(missing_ok=True)
            if n == 1:
                raise CheckpointError(f"the workload (pid {pid}) is gone: {exc}",
                                      phase=Phase.ITERATE, cause=exc) from exc
            continue
        except OSError as exc:
            raise CheckpointError(f"cannot read the memory of pid {pid}: {exc}",
                                  phase=Phase.ITERATE, cause=exc) from exc
        total += p
        unreadable += u
        done += 1
    return ReadStats(done, total, unreadable)


async def live_read_dump(pid: int, images_dir: pathlib.Path) -> DumpResult:
    """A pre-copy iteration that does not freeze the workload (this module)."""
    t = time.monotonic()
    await anyio.to_thread.run_sync(read_tree, process_tree(pid), images_dir)
    return DumpResult(time.monotonic() - t, False, False, None, DumpMethod.LIVE_READ)


