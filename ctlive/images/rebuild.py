"""Rebuild a dump byte for byte from the previous one and a change stream, and verify
the result against the stream's manifest.

Memory is bounded whatever sizes the stream declares: whole-file items and the parts
of large files are decompressed to disk in ``CHUNK`` pieces (never more than their
declared size; ``ctlive.images.files``), a zdelta's dictionary is an old file of at
most ``MAX_ZDELTA_BASE`` bytes, and zstd frames may not ask for a window above
``MAX_WINDOW``. Every file written is private (0600)."""

from __future__ import annotations

import json
import mmap
import os
import pathlib
from typing import BinaryIO

import attrs
import zstandard

from ctlive.errors import DeltaFormatError, ImageFormatError, StorageError, map_os_errors
from ctlive.images import layout, pagediff
from ctlive.images.changes import MAX_FILE, MAX_ZDELTA_BASE, ChangeItem, ChangeKind, safe_name
from ctlive.images.criu_format import PAGE_SIZE, Pagemap
from ctlive.images.files import (
    CHUNK,
    MAX_WINDOW,
    PartFiles,
    copy_private,
    create_private,
    write_whole,
)
from ctlive.images.layout import MappedFile, Segment
from ctlive.images.manifest import Manifest, manifest

# CHUNK and MAX_WINDOW live in files, MAX_FILE in changes: named here as before.
__all__ = [
    "CHUNK",
    "MAX_DEFERRED",
    "MAX_FILE",
    "MAX_WINDOW",
    "Rebuilder",
]

MAX_DEFERRED = 256 << 20
"""Compressed pages held while their pagemap is still on its way, bytes."""

_PRIVATE = 0o600


@attrs.define(eq=False)
class _Written:
    """A pages file written anew: changed windows as their items arrive, the others
    copied from the old pages file (if any) by :meth:`fill`."""

    f: BinaryIO
    total: int
    """Pages in the new file."""
    old: MappedFile | None
    segs: list[Segment]
    touched: list[tuple[int, int]] = attrs.Factory(list)
    """(first page, count) of the windows written so far."""

    def patch(self, start: int, count: int, stream: bytes) -> None:
        """Write window [start, start+count): its old pages, decoded with ``stream``."""
        with layout.take_base_window(self.old, self.segs, start, count) as base:
            pagediff.decode(base, stream)
            self.f.seek(start * PAGE_SIZE)
            self.f.write(base)
        self.touched.append((start, count))

    def fill(self) -> None:
        """Windows with no changes were not sent: copy them from the old layout."""
        pos = 0
        gaps = []
        for s, n in sorted(self.touched):
            if s > pos:
                gaps.append((pos, s - pos))
            pos = max(pos, s + n)
        if pos < self.total:
            gaps.append((pos, self.total - pos))
        for s, n in gaps:
            for w in range(s, s + n, layout.DEFAULT_WINDOW_PAGES):
                count = min(layout.DEFAULT_WINDOW_PAGES, s + n - w)
                with layout.take_base_window(self.old, self.segs, w, count) as base:
                    self.f.seek(w * PAGE_SIZE)
                    self.f.write(base)

    def close(self) -> None:
        """Close the new file and the old one."""
        self.f.close()
        if self.old is not None:
            self.old.close()


@attrs.define(eq=False)
class _Patched:
    """A pages file taken over from the old dump (already in the new layout) and
    patched in place, window by window."""

    f: BinaryIO
    total: int
    """Pages in the new file."""
    mm: mmap.mmap | None
    """The file, mapped (None when it is empty)."""
    known: bytes | None
    """Per-page hashes of the file before any patch, when the previous rebuild gave them."""
    patched: list[tuple[int, bytes]] = attrs.Factory(list)
    """(first page, page hashes) of each window patched, in arrival order."""

    def patch(self, start: int, count: int, stream: bytes) -> None:
        """Decode ``stream`` onto window [start, start+count) and hash the result while
        the window is hot."""
        assert self.mm is not None
        view = memoryview(self.mm)[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
        try:
            pagediff.decode(view, stream)
            hashes = pagediff.page_hashes(view).tobytes()
        finally:
            view.release()
        layout.drop(self.mm, start, count)
        self.patched.append((start, hashes))

    def hashes(self) -> bytes | None:
        """Per-page hashes of the patched file: the known ones wherever no window was
        patched (None when they are not known)."""
        if self.mm is None or self.known is None or len(self.known) != self.total * 8:
            return None
        h = bytearray(self.known)
        for start, hashes in self.patched:
            h[start * 8 : start * 8 + len(hashes)] = hashes
        return bytes(h)

    def close(self) -> None:
        """Flush and close the file."""
        if self.mm is not None:
            self.mm.flush()
            self.mm.close()
        self.f.close()


def _moved_hashes(known: bytes | None, segs: list[Segment], total: int,
                  old_total: int) -> bytes | None:
    """Per-page hashes of the old file, moved with their pages to the new layout; pages
    no old page fills are zero for now (None when the old hashes are not known)."""
    if known is None or len(known) != old_total * 8:
        return None
    h = bytearray(pagediff.page_hashes(bytes(PAGE_SIZE)).tobytes() * total)
    for new_idx, old_idx, n in segs:
        h[new_idx * 8 : (new_idx + n) * 8] = known[old_idx * 8 : (old_idx + n) * 8]
    return bytes(h)


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
        self.old = pathlib.Path(old_dir) if old_dir is not None else None
        self.out = pathlib.Path(out_dir)
        with map_os_errors(StorageError, f"creating {self.out}"):
            self.out.mkdir(parents=True, exist_ok=True)
        self._old_maps: dict[str, Pagemap] | None = None
        self._pages: dict[str, _Written | _Patched] = {}
        self._manifest: Manifest | None = None
        self._zd = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._parts = PartFiles(self.out, self._zd)
        self._deferred: list[ChangeItem] = []
        self._deferred_bytes = 0

    def apply(self, c: ChangeItem) -> None:
        """Apply one item. Items may arrive in any order (lanes interleave them): the
        manifest is kept for ``finish()``, and pages that arrive before their pagemap
        wait for it. A failing disk is a :class:`~ctlive.errors.StorageError`."""
        with map_os_errors(StorageError, f"rebuilding {self.out}"):
            self._apply(c)

    def _apply(self, c: ChangeItem) -> None:
        if c.kind == ChangeKind.MANIFEST:
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
        if c.kind == ChangeKind.FILE_SAME:
            if self.old is None or not (self.old / name).is_file():
                raise DeltaFormatError(f"{name} marked unchanged but there is no old copy")
            copy_private(self.old / name, self.out / name)
        elif c.kind in (ChangeKind.FILE_WHOLE, ChangeKind.FILE_ZDELTA):
            zd = self._delta_decompressor(name) if c.kind == ChangeKind.FILE_ZDELTA else self._zd
            write_whole(self.out / name, zd, c)
        elif c.kind == ChangeKind.FILE_PART:
            if not self._parts.apply(c):
                return  # the file is not complete yet: no pagemap for the pages waiting
        elif name not in self._pages and not self._has_pagemap(name):
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
                self._apply(d)

    def _delta_decompressor(self, name: str) -> zstandard.ZstdDecompressor:
        """A decompressor whose dictionary is the old version of ``name``, read whole:
        refused when that file is larger than ``MAX_ZDELTA_BASE`` (the diff sends such
        files whole)."""
        old = self.old / name if self.old is not None else None
        if old is None or not old.is_file():
            raise DeltaFormatError(f"{name}: delta against a file we do not have")
        with open(old, "rb") as f:
            base = f.read(MAX_ZDELTA_BASE + 1)
        if len(base) > MAX_ZDELTA_BASE:
            raise DeltaFormatError(
                f"{name}: a zstd delta against an old file of {old.stat().st_size} bytes; "
                f"deltas are accepted against old files of up to {MAX_ZDELTA_BASE} bytes")
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW)

    def _has_pagemap(self, name: str) -> bool:
        return name in layout.pages_files(layout.pagemaps(self.out))

    def _take_over(self, name: str, old_path: pathlib.Path, total: int,
                   segs: list[Segment], old_total: int) -> _Patched:
        """Start from the old file itself and patch in place. A changed layout (a
        mapping grew, a page appeared) is first rearranged inside the file: far less
        work, and no fresh memory, compared with writing the whole file anew."""
        target = self.out / name
        if self.consume_old:
            os.rename(old_path, target)
            os.chmod(target, _PRIVATE)
        else:
            copy_private(old_path, target)
        f = open(target, "r+b")  # noqa: SIM115
        try:
            known = self._old_hashes.get(old_path.name)
            if not layout.same_layout(segs, total) or old_total != total:
                size = max(total, old_total) * PAGE_SIZE
                f.truncate(size)
                with mmap.mmap(f.fileno(), size) as work:
                    layout.rearrange(work, segs, total)
                f.truncate(total * PAGE_SIZE)
                known = _moved_hashes(known, segs, total, old_total)
            mm = mmap.mmap(f.fileno(), 0) if total else None
        except BaseException:
            f.close()
            raise
        return _Patched(f, total, mm, known)

    def _pages_file(self, name: str) -> _Written | _Patched:
        state = self._pages.get(name)
        if state is not None:
            return state
        new_maps = layout.pagemaps(self.out)
        owner = layout.pages_files(new_maps).get(name)
        if owner is None:
            raise DeltaFormatError(f"pages for {name} arrived before its pagemap")
        new_map = new_maps[owner]
        if self._old_maps is None:
            self._old_maps = layout.pagemaps(self.old) if self.old is not None else {}
        old_map = self._old_maps.get(owner)
        old_path = (self.old / f"pages-{old_map.pages_id}.img"
                    if self.old is not None and old_map is not None else None)
        old_m = MappedFile(old_path) if old_path is not None and old_path.is_file() else None
        segs = layout.segments(old_map, new_map) if old_m is not None else []
        total = new_map.present_pages
        old_total = old_map.present_pages if old_map is not None else 0
        if (old_m is not None and old_path is not None and total > 0
                and old_m.size == old_total * PAGE_SIZE
                and layout.rearrangeable(segs, total, old_total)):
            old_m.close()
            state = self._take_over(name, old_path, total, segs, old_total)
        else:
            f = create_private(self.out / name)
            f.truncate(total * PAGE_SIZE)
            # Windows no item touches are filled from the old pages in finish().
            state = _Written(f, total, old_m, segs)
        self._pages[name] = state
        return state

    def _apply_pages(self, name: str, c: ChangeItem) -> None:
        state = self._pages_file(name)
        start, count = c.first_page, c.page_count
        if count <= 0 or start + count > state.total:
            raise DeltaFormatError(f"{name}: pages {start}+{count} outside {state.total}")
        state.patch(start, count, pagediff.decompress(c.data, count * pagediff.MAX_RECORD))

    def close(self) -> None:
        """Release files (also on failure); remove those whose parts did not all come."""
        for state in self._pages.values():
            state.close()
        self._pages.clear()
        self._parts.close()

    def finish(self) -> Manifest:
        """Complete the pages files and verify the result against the manifest."""
        with map_os_errors(StorageError, f"rebuilding {self.out}"):
            return self._finish()

    def _finish(self) -> Manifest:
        try:
            if self._manifest is None:
                raise DeltaFormatError("the change stream ended without a manifest")
            if self._deferred:
                raise DeltaFormatError(
                    f"pages for {sorted({c.name for c in self._deferred})} arrived but their "
                    "pagemap never did")
            self._parts.check_complete()
            # Pages files whose every window was unchanged got no item at all.
            for name in layout.pages_files(layout.pagemaps(self.out)):
                if name in self._manifest.files and name not in self._pages:
                    self._pages_file(name)
            for name, state in self._pages.items():
                if isinstance(state, _Written):
                    state.fill()
                elif (hashes := state.hashes()) is not None:
                    # Patched in place: the old hashes hold wherever no window was patched.
                    self.page_hashes[name] = hashes
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
