"""Rebuild a dump byte for byte from the previous one and a change stream, and verify
the result against the stream's manifest."""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import shutil
from typing import Any

import zstandard

from ctlive.errors import DeltaFormatError, ImageFormatError
from ctlive.images import pagediff
from ctlive.images.changes import (
    FILE_SAME,
    FILE_WHOLE,
    FILE_ZDELTA,
    MANIFEST,
    PAGES,
    Change,
    safe_name,
)
from ctlive.images.criu_format import Pagemap
from ctlive.images.layout import (
    DEFAULT_WINDOW_PAGES,
    PAGE,
    MappedFile,
    base_window,
    drop,
    old_span,
    pagemaps,
    pages_files,
    rearrange,
    rearrangeable,
    same_layout,
    segments,
)
from ctlive.images.manifest import Manifest, manifest

__all__ = [
    "Rebuilder",
]

MAX_FILE = 1 << 30


MAX_DEFERRED = 256 << 20  # compressed pages held while their pagemap is still on its way


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
        name = safe_name(c.name)
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
        return name in pages_files(pagemaps(self.out))

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
        if not same_layout(segs, total) or old_total != total:
            size = max(total, old_total) * PAGE
            f.truncate(size)
            with mmap.mmap(f.fileno(), size) as work:
                rearrange(work, segs, total)
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
        new_maps = pagemaps(self.out)
        owner = pages_files(new_maps).get(name)
        if owner is None:
            raise DeltaFormatError(f"pages for {name} arrived before its pagemap")
        new_map = new_maps[owner]
        if self._old_maps is None:
            self._old_maps = pagemaps(self.old) if self.old is not None else {}
        old_map = self._old_maps.get(owner)
        old_m = None
        segs: list[tuple[int, int, int]] = []
        if old_map is not None and self.old is not None:
            p = self.old / f"pages-{old_map.pages_id}.img"
            if p.is_file():
                old_m = MappedFile(p)
                segs = segments(old_map, new_map)
        total = new_map.present_pages
        old_total = old_map.present_pages if old_map is not None else 0
        if (old_m is not None and total > 0 and old_m.size == old_total * PAGE
                and rearrangeable(segs, total, old_total)):
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
        base = (base_window(old_m.buf, segs, start, count) if old_m is not None
                else bytearray(count * PAGE))
        if old_m is not None:
            lo, hi = old_span(segs, start, count)
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
                    base = (base_window(old_m.buf, segs, w, cnt) if old_m is not None
                            else bytearray(cnt * PAGE))
                    if old_m is not None:
                        lo, hi = old_span(segs, w, cnt)
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
            for name in pages_files(pagemaps(self.out)):
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
