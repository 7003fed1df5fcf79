"""The non-page files of a rebuild, written with bounded memory: whole files
(FILE_WHOLE, FILE_ZDELTA) decompressed to disk as they stream, unchanged files copied
by the kernel, and large files (FILE_PART) part by part at their offsets, in whatever
order the parts arrive. Every file written is private (0600) and created without
following symlinks."""

from __future__ import annotations

import bisect
import os
import pathlib
import shutil
from typing import BinaryIO

import attrs
import zstandard

from ctlive.errors import DeltaFormatError
from ctlive.images.changes import MAX_FILE, ChangeItem, check_part

__all__ = [
    "CHUNK",
    "MAX_PART_RANGES",
    "MAX_WINDOW",
    "PartFiles",
    "copy_private",
    "create_private",
    "stream_out",
    "write_whole",
]

CHUNK = 1 << 20
"""Whole files and parts are decompressed and written this many bytes at a time."""

MAX_WINDOW = 1 << 23
"""Largest zstd window a whole-file item or a part may need, bytes (what zstd levels up
to 19 use; ctlive's diff uses level 1, 512 KiB)."""

MAX_PART_RANGES = 1 << 14
"""Disjoint byte ranges the parts received so far may form, all files together
(adjacent parts merge into one range, a complete file is one): bounds the
bookkeeping whatever a peer sends. A 1 GiB file in 4 MiB parts, arriving in the worst
order, forms 128."""

_PRIVATE = 0o600


def create_private(path: pathlib.Path) -> BinaryIO:
    """Create (or truncate) ``path`` for writing, mode 0600 whatever the umask, never
    through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _PRIVATE)
    try:
        os.fchmod(fd, _PRIVATE)  # the umask may have taken bits; an old file kept its mode
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def copy_private(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy ``src`` to a private ``dst`` (the kernel's copy: no buffer of ours)."""
    create_private(dst).close()
    shutil.copyfile(src, dst)  # truncates and writes dst; its mode stays 0600


def stream_out(f: BinaryIO, zd: zstandard.ZstdDecompressor, data: bytes, size: int,
               what: str) -> None:
    """Decompress ``data`` into ``f`` at its position, ``CHUNK`` bytes at a time: exactly
    ``size`` bytes, more being refused as soon as the first extra byte appears. Less
    output, trailing data and corrupt zstd are refused too (DeltaFormatError naming
    ``what``)."""
    written = 0
    try:
        with zd.stream_reader(data, read_across_frames=True) as r:
            # Ask for one byte beyond what is left: output past the size shows at once.
            while chunk := r.read(min(CHUNK, size - written + 1)):
                written += len(chunk)
                if written > size:
                    raise DeltaFormatError(
                        f"{what}: more than the {size} bytes its header declares")
                f.write(chunk)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"{what}: corrupt zstd data ({exc})", cause=exc) from exc
    if written != size:
        raise DeltaFormatError(f"{what}: {written} bytes, header says {size}")


def write_whole(target: pathlib.Path, zd: zstandard.ZstdDecompressor, c: ChangeItem) -> None:
    """Write whole-file item ``c`` to ``target`` as it decompresses (see
    :func:`stream_out`); a file whose item fails is removed."""
    if c.size > MAX_FILE:
        raise DeltaFormatError(f"{c.name}: declared size {c.size} too large")
    try:
        with create_private(target) as f:
            stream_out(f, zd, c.data, c.size, c.name)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


@attrs.define(eq=False)
class _PartFile:
    total: int
    """The file's size, as its first part declared it."""
    ranges: list[tuple[int, int]] = attrs.Factory(list)
    """The byte ranges [start, end) written so far: sorted, disjoint, adjacent ones merged."""

    def complete(self) -> bool:
        return self.ranges == [(0, self.total)]


class PartFiles:
    """The files of a rebuild that arrive in parts. Each is written to a hidden file of
    its final size (``.NAME.part``: no dump file name starts with a dot), part by part,
    and renamed to its name once its parts cover it: until then the rebuild never sees
    half a file (half a pagemap, say)."""

    def __init__(self, out: pathlib.Path, zd: zstandard.ZstdDecompressor) -> None:
        self.out = out
        self._zd = zd
        self._files: dict[str, _PartFile] = {}
        self._ranges = 0

    def _temp(self, name: str) -> pathlib.Path:
        return self.out / f".{name}.part"

    def apply(self, c: ChangeItem) -> bool:
        """Write part ``c`` (whose name the caller checked) at its offset; True when it
        completed its file. Refused (DeltaFormatError): what :func:`check_part`
        refuses, a file size other than the first part's, a part overlapping one
        received before (a repeat, or a part of a file already complete)."""
        length = check_part(c)
        name, start, end = c.name, c.offset, c.offset + length
        state = self._files.get(name)
        if state is not None and state.total != c.size:
            raise DeltaFormatError(f"{name}: part at {start} says the file has {c.size} bytes, "
                                   f"an earlier part said {state.total}")
        ranges = state.ranges if state is not None else []
        i = bisect.bisect_right(ranges, start, key=lambda r: r[0])
        if (i and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
            raise DeltaFormatError(f"{name}: part [{start}, {end}) overlaps a part received "
                                   "before")
        left = i > 0 and ranges[i - 1][1] == start
        right = i < len(ranges) and ranges[i][0] == end
        if not (left or right) and self._ranges >= MAX_PART_RANGES:
            raise DeltaFormatError(f"parts form more than {MAX_PART_RANGES} disjoint ranges")
        tmp = self._temp(name)
        if state is None:
            with create_private(tmp) as f:
                f.truncate(c.size)
            state = self._files[name] = _PartFile(c.size)
            ranges = state.ranges
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as f:  # no O_TRUNC: the other parts stay
            f.seek(start)
            stream_out(f, self._zd, c.data, length, f"{name}: part at {start}")
        if left and right:
            ranges[i - 1] = (ranges[i - 1][0], ranges[i][1])
            del ranges[i]
            self._ranges -= 1
        elif left:
            ranges[i - 1] = (ranges[i - 1][0], end)
        elif right:
            ranges[i] = (start, ranges[i][1])
        else:
            ranges.insert(i, (start, end))
            self._ranges += 1
        if state.complete():
            os.rename(tmp, self.out / name)
            return True
        return False

    def check_complete(self) -> None:
        """Refuse (DeltaFormatError) files whose parts do not cover them."""
        short = {name: (sum(e - s for s, e in st.ranges), st.total)
                 for name, st in sorted(self._files.items()) if not st.complete()}
        if short:
            raise DeltaFormatError("files whose parts do not cover them: " + ", ".join(
                f"{name} ({got} of {total} bytes)" for name, (got, total) in short.items()))

    def close(self) -> None:
        """Remove the hidden files of incomplete files (also on failure)."""
        for name, st in self._files.items():
            if not st.complete():
                self._temp(name).unlink(missing_ok=True)
