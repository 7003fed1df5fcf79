"""Pre-dump chains, resolved.

``criu pre-dump --prev-images-dir`` writes incremental images: a pagemap run flagged
``PE_PARENT`` says its pages did not change since the parent image, and they are not in
this image's pages file. Diffing such an image as it is would treat those pages as
missing, and the final dump would resend them while the workload is frozen. So each
incremental image is *flattened* first: every run becomes present, the parent's pages
copied in by virtual address from the parent's own flattened image, which is what the
destination holds. The diff then sees the pages the destination really has, through any
depth of chain (each flat image resolves its parent's, recursively).

Memory is bounded: pages are copied by the kernel (``sendfile``), never through a
buffer of ours.
"""

from __future__ import annotations

import bisect
import os
import pathlib
import shutil

import attrs

from ctlive.errors import ImageFormatError, StorageError, map_os_errors
from ctlive.images import layout
from ctlive.images.criu_format import (
    PAGE_SIZE,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    read_pagemap,
    write_pagemap,
)

__all__ = ["FlattenStats", "flatten", "has_parent_pages"]

@attrs.define
class FlattenStats:
    """What :func:`flatten` did."""

    pages_own: int = 0
    """Pages the incremental image held itself."""
    pages_from_parent: int = 0
    """Pages copied from the parent's flat image (``PE_PARENT`` runs)."""


def has_parent_pages(d: pathlib.Path) -> bool:
    """Whether any pagemap of dump ``d`` has a ``PE_PARENT`` run."""
    return any(e.flags & PE_PARENT for pm in layout.pagemaps(d).values() for e in pm.entries)


def _parent_spans(runs: list[tuple[int, int, int]], starts: list[int], vaddr: int, n: int,
                  where: str) -> list[tuple[int, int]]:
    """(parent page index, count) spans that hold pages [vaddr, vaddr + n pages) in the
    parent's pages file (``runs``: its present runs, ``starts`` their addresses);
    ImageFormatError if the parent lacks one of them."""
    out: list[tuple[int, int]] = []
    addr, end = vaddr, vaddr + n * PAGE_SIZE
    i = max(bisect.bisect_right(starts, addr) - 1, 0)
    while addr < end:
        if i >= len(runs) or not runs[i][0] <= addr < runs[i][0] + runs[i][1] * PAGE_SIZE:
            raise ImageFormatError(f"page {addr:#x} is marked in the parent, which lacks it",
                                   path=where)
        rv, rn, ridx = runs[i]
        take = min(end, rv + rn * PAGE_SIZE) - addr
        out.append((ridx + (addr - rv) // PAGE_SIZE, take // PAGE_SIZE))
        addr += take
        i += 1
    return out


def _copy(dst: int, src: int, first: int, count: int, where: str) -> None:
    """Append pages [first, first + count) of pages file ``src`` to ``dst``."""
    pos, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
    while pos < end:
        n = os.sendfile(dst, src, pos, end - pos)
        if not n:
            raise ImageFormatError("pages file shorter than its pagemap", path=where)
        pos += n


def flatten(dump_dir: str | os.PathLike[str], parent_flat: str | os.PathLike[str] | None,
            out_dir: str | os.PathLike[str]) -> FlattenStats:
    """Write ``out_dir``: ``dump_dir`` with every ``PE_PARENT`` run resolved from
    ``parent_flat`` (a flat image of the parent dump); the other files are copied."""
    src, out = pathlib.Path(dump_dir), pathlib.Path(out_dir)
    parent = pathlib.Path(parent_flat) if parent_flat is not None else None
    st = FlattenStats()
    with map_os_errors(StorageError, f"flattening {src}"):
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        maps = {p.name: read_pagemap(p) for p in sorted(src.glob("pagemap-*.img"))}
        pages_names = {f"pages-{pm.pages_id}.img" for pm in maps.values()}
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in maps and p.name not in pages_names:
                shutil.copyfile(p, out / p.name)
        for name, pm in maps.items():
            _flatten_one(src, parent, out, name, pm, st)
    return st


def _flatten_one(src: pathlib.Path, parent: pathlib.Path | None, out: pathlib.Path,
                 name: str, pm: Pagemap, st: FlattenStats) -> None:
    pages = f"pages-{pm.pages_id}.img"
    parent_pm = None
    if parent is not None and (parent / name).is_file():
        parent_pm = read_pagemap(parent / name)
    own = os.open(src / pages, os.O_RDONLY | os.O_CLOEXEC) if (src / pages).is_file() else None
    up = (os.open(parent / f"pages-{parent_pm.pages_id}.img", os.O_RDONLY | os.O_CLOEXEC)
          if parent_pm is not None and parent is not None else None)
    # The parent's runs once per pagemap, not once per PE_PARENT entry.
    parent_runs = list(parent_pm.runs()) if parent_pm is not None else []
    parent_starts = [r[0] for r in parent_runs]
    fd = os.open(out / pages, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        entries: list[PagemapEntry] = []
        idx = 0
        for e in pm.entries:
            if e.present:
                if own is None:
                    raise ImageFormatError("present pages but no pages file", path=str(src))
                _copy(fd, own, idx, e.nr_pages, str(src / pages))
                idx += e.nr_pages
                st.pages_own += e.nr_pages
            elif e.flags & PE_PARENT:
                if parent_pm is None or up is None:
                    raise ImageFormatError(f"{name} has pages in its parent, and there is no "
                                           "parent image", path=str(src))
                for first, count in _parent_spans(parent_runs, parent_starts, e.vaddr,
                                                  e.nr_pages, str(src)):
                    _copy(fd, up, first, count, str(parent))
                st.pages_from_parent += e.nr_pages
            else:
                entries.append(e)  # neither here nor in a parent: keep it as it is
                continue
            entries.append(PagemapEntry(e.vaddr, e.nr_pages, PE_PRESENT))
    finally:
        os.close(fd)
        for m in (own, up):
            if m is not None:
                os.close(m)
    write_pagemap(out / name, pm.pages_id, entries)
