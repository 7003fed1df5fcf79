"""Large non-page files travel as FILE_PART items of at most PART_SIZE bytes each,
independent of each other: the source reads, and the receiver holds, one part at a
time, whatever the file's size, and the parts may arrive in any order."""

from __future__ import annotations

import filecmp
import math
import os
import pathlib
import random
import stat
import struct
import subprocess
import sys

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ctlive.errors import DeltaFormatError, ImageFormatError
from ctlive.images import criu_format, files, manifest, rebuild
from ctlive.images import diff as image_diff
from ctlive.images.changes import (
    MAX_FILE,
    MAX_PART,
    ChangeItem,
    ChangeKind,
    decode_change,
    encode_change,
)
from ctlive.images.criu_format import PAGE_SIZE

MiB = 1 << 20
PART = image_diff.PART_SIZE
# The most a part's item may take: the part, zstd's bound for incompressible data, the
# item header and name.
ITEM_MAX = PART + (PART >> 8) + 512
_HDR = struct.Struct("<BHQQI")


def _dump(d: pathlib.Path, contents: dict[str, bytes], pages: int = 5) -> None:
    """A dump with one pagemap (one run of ``pages`` random pages) and ``contents``."""
    d.mkdir()
    entry = criu_format.PagemapEntry(0x10000, pages, criu_format.PE_PRESENT)
    criu_format.write_pagemap(d / "pagemap-1.img", 1, [entry])
    (d / "pages-1.img").write_bytes(os.urandom(pages * PAGE_SIZE))
    for name, data in contents.items():
        (d / name).write_bytes(data)


def _rebuild(old: pathlib.Path | None, new: pathlib.Path, out: pathlib.Path,
             seed: int) -> list[ChangeItem]:
    """Diff, shuffle the items (lanes interleave them), send them through the codec,
    rebuild and compare byte for byte; returns the items as the diff made them."""
    items = list(image_diff.diff(old, new))
    wire = [encode_change(c) for c in items]
    random.Random(seed).shuffle(wire)
    rb = rebuild.Rebuilder(old, out)
    for blob in wire:
        rb.apply(decode_change(blob))
    rb.finish()
    names = sorted(p.name for p in new.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no hidden part file left
    for n in names:
        assert filecmp.cmp(new / n, out / n, shallow=False), n
        assert stat.S_IMODE((out / n).stat().st_mode) == 0o600
    return items


def _compressible(size: int) -> bytes:
    block = os.urandom(64 << 10)
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("make", [os.urandom, _compressible], ids=["random", "compressible"])
def test_a_40mib_file_roundtrips_in_parts_in_any_order(tmp_path: pathlib.Path, make: object
                                                       ) -> None:
    """A 40 MiB file (plus a short last part) goes in parts of at most PART_SIZE, every
    item of the stream stays within about PART_SIZE, and any arrival order rebuilds
    it. Next iteration: an unchanged large file is FILE_SAME (compared part by part),
    one changed in its middle is sent in parts again, whole."""
    assert callable(make)
    size = 40 * MiB + 12345
    big = make(size)
    other = make(5 * MiB)
    _dump(tmp_path / "d0", {"big.img": big, "other.img": other, "core-1.img": b"c" * 300})
    items = _rebuild(None, tmp_path / "d0", tmp_path / "r0", seed=1)
    parts = [c for c in items if c.name == "big.img"]
    assert [c.kind for c in parts] == [ChangeKind.FILE_PART] * math.ceil(size / PART)
    assert [c.offset for c in parts] == list(range(0, size, PART))
    assert {c.size for c in parts} == {size}
    assert max(len(encode_change(c)) for c in items) <= ITEM_MAX
    if make is _compressible:
        assert sum(len(c.data) for c in parts) < size // 10
    # The manifest entry, hashed from the parts as they were read, is the file's.
    want = manifest.manifest(tmp_path / "d0").files
    assert decode_change(encode_change(items[-1])).data == manifest.Manifest(want).to_json()

    changed = bytearray(big)
    changed[21 * MiB + 7] ^= 0xFF
    _dump(tmp_path / "d1", {"big.img": bytes(changed), "other.img": other,
                            "core-1.img": b"c" * 301})
    items = _rebuild(tmp_path / "r0", tmp_path / "d1", tmp_path / "r1", seed=2)
    kinds: dict[str, list[ChangeKind]] = {}
    for c in items:
        kinds.setdefault(c.name, []).append(c.kind)
    assert kinds["other.img"] == [ChangeKind.FILE_SAME]
    assert kinds["big.img"] == [ChangeKind.FILE_PART] * math.ceil(size / PART)
    assert sorted(c.offset for c in items if c.name == "big.img") == list(range(0, size, PART))


def test_a_pagemap_in_parts_stays_hidden_until_complete(tmp_path: pathlib.Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny parts even the pagemap goes in parts: pages arriving before its last
    part wait for it, as they do before a whole pagemap, and never see half of it."""
    monkeypatch.setattr(image_diff, "PART_SIZE", 7)
    _dump(tmp_path / "d0", {"core-1.img": b"core" * 20}, pages=9)
    for seed in range(20):
        items = _rebuild(None, tmp_path / "d0", tmp_path / f"r{seed}", seed=seed)
        assert sum(c.kind == ChangeKind.FILE_PART for c in items) > 10


def _part(name: str, size: int, offset: int, data: bytes, **kw: object) -> ChangeItem:
    payload = zstandard.ZstdCompressor(level=1, **kw).compress(data)  # type: ignore[arg-type]
    return ChangeItem(ChangeKind.FILE_PART, name, size=size, offset=offset, data=payload)


def _both(rb: rebuild.Rebuilder, c: ChangeItem, match: str) -> None:
    """Refused by the codec (when the item itself is malformed) or by the rebuilder."""
    with pytest.raises(DeltaFormatError, match=match):
        rb.apply(c)
    with pytest.raises(DeltaFormatError, match=match):
        rb.apply(decode_change(encode_change(c)))


def test_malformed_parts_are_refused(tmp_path: pathlib.Path) -> None:
    """Each a DeltaFormatError, from the codec and from the rebuilder alike: a part
    past the end, an empty one, one above MAX_PART, a file above MAX_FILE, zstd data
    that is not zstd, does not declare its size or is corrupt."""
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    data = os.urandom(4096)
    for c, match in [
        (_part("x.img", 10_000, 8000, data), "end past the file's declared 10000"),
        (_part("x.img", 10_000, 0, b""), "a part of 0 bytes"),
        (_part("x.img", 2 * MAX_PART, 0, bytes(MAX_PART + 1)), f"1 to {MAX_PART} allowed"),
        (_part("x.img", MAX_FILE + 1, 0, data), "above"),
        (ChangeItem(ChangeKind.FILE_PART, "x.img", size=10_000, data=b"not zstd"),
         "not a zstd frame"),
        (_part("x.img", 10_000, 0, data, write_content_size=False), "does not declare"),
        (ChangeItem(ChangeKind.FILE_PART, "x.img", size=10_000,
                    data=b"\0" * (MAX_PART + MAX_PART // 128)), "more than a part"),
    ]:
        _both(rb, c, match)
    good = _part("x.img", 10_000, 0, data).data
    for bad, match in [(good[:-100], "bytes, header says 4096|corrupt"),
                       (good[:8] + bytes([good[8] ^ 0x40]) + good[9:], "corrupt"),  # block
                       (good + zstandard.ZstdCompressor().compress(b"more"), "more than the"),
                       (good + b"trailing garbage", "corrupt")]:
        with pytest.raises(DeltaFormatError, match=match):
            rb.apply(ChangeItem(ChangeKind.FILE_PART, "x.img", size=10_000, offset=4096,
                                data=bad))
    rb.apply(ChangeItem(ChangeKind.MANIFEST, "", data=b"{}"))
    with pytest.raises(DeltaFormatError, match="do not cover"):
        rb.finish()
    assert list((tmp_path / "out").iterdir()) == []


def test_overlapping_repeated_or_inconsistent_parts_are_refused(tmp_path: pathlib.Path
                                                                 ) -> None:
    data = os.urandom(3 * 4096)
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    assert not rb._parts.apply(_part("x.img", len(data), 4096, data[4096:8192]))
    for c, match in [
        (_part("x.img", len(data), 4096, data[4096:8192]), "overlaps"),      # repeated
        (_part("x.img", len(data), 0, data[:4097]), "overlaps"),             # into it
        (_part("x.img", len(data), 8191, data[8191:]), "overlaps"),          # from inside
        (_part("x.img", len(data), 0, data), "overlaps"),                    # around it
        (_part("x.img", len(data) + 1, 0, data[:4096]), "an earlier part said 12288"),
    ]:
        with pytest.raises(DeltaFormatError, match=match):
            rb.apply(c)
    assert not (tmp_path / "out" / "x.img").exists()  # hidden until complete
    rb.apply(_part("x.img", len(data), 8192, data[8192:]))
    rb.apply(_part("x.img", len(data), 0, data[:4096]))
    assert (tmp_path / "out" / "x.img").read_bytes() == data
    # Complete: any further part overlaps.
    with pytest.raises(DeltaFormatError, match="overlaps"):
        rb.apply(_part("x.img", len(data), 0, data[:10]))


def test_a_missing_part_is_refused(tmp_path: pathlib.Path) -> None:
    """finish() names the file its parts do not cover; its hidden file is removed. Had
    the manifest check run, it would have refused the rebuild too."""
    size = 2 * PART + 10
    _dump(tmp_path / "d0", {"big.img": os.urandom(size)})
    items = list(image_diff.diff(None, tmp_path / "d0"))
    assert sum(c.kind == ChangeKind.FILE_PART for c in items) == 3
    for skip in (0, 1, 2):
        out = tmp_path / f"out{skip}"
        rb = rebuild.Rebuilder(None, out)
        for c in [c for c in items if c.kind == ChangeKind.FILE_PART][:skip] + [
                c for c in items if c.kind == ChangeKind.FILE_PART][skip + 1:]:
            rb.apply(c)
        for c in items:
            if c.kind != ChangeKind.FILE_PART:
                rb.apply(c)
        with pytest.raises(DeltaFormatError, match=r"big.img \(\d+ of \d+ bytes\)"):
            rb.finish()
        assert not (out / "big.img").exists() and not (out / ".big.img.part").exists()
    # The manifest check alone catches it too: without the parts check, the file is
    # missing from the result.
    rb = rebuild.Rebuilder(None, tmp_path / "out-m")
    for c in items[1:]:
        rb.apply(c)
    rb._parts.check_complete = lambda: None  # type: ignore[method-assign]
    with pytest.raises(ImageFormatError, match=r"missing \['big.img'\]"):
        rb.finish()


def test_disjoint_ranges_are_bounded(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    """A peer scattering tiny parts cannot grow the bookkeeping without bound; parts
    that extend a range cost nothing."""
    monkeypatch.setattr(files, "MAX_PART_RANGES", 3)
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    for off in (0, 10, 20):
        rb.apply(_part("x.img", 100, off, b"a"))
    rb.apply(_part("x.img", 100, 1, b"b"))  # extends [0, 1)
    with pytest.raises(DeltaFormatError, match="more than 3 disjoint ranges"):
        rb.apply(_part("x.img", 100, 30, b"c"))


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_part_headers_fuzz(size: int, offset: int, content: bytes) -> None:
    """Whatever the header says, the codec returns a part that fits its file or
    refuses it."""
    blob = encode_change(_part("x.img", size, offset, content))
    try:
        c = decode_change(blob)
    except DeltaFormatError:
        return
    assert 0 < len(content) <= MAX_PART and c.offset + len(content) <= c.size <= MAX_FILE
    assert c == _part("x.img", size, offset, content)


# The source side: diffs the dump and writes the encoded items to a file (one u32
# length each); the receiver side: reads them back one at a time, rebuilds and
# verifies. Each resets its peak RSS (clear_refs 5) once imports are done and prints
# how far the peak rose above the RSS at the reset.
_PROBE = """
import gc, pathlib, struct, sys
from ctlive.images import rebuild
from ctlive.images import diff as image_diff
from ctlive.images.changes import decode_change, encode_change
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) << 10
side, dump, stream, out = sys.argv[1:5]
rb = rebuild.Rebuilder(None, out) if side == "receiver" else None
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
largest = 0
if side == "source":
    with open(stream, "wb") as f:
        for c in image_diff.diff(None, dump):
            blob = encode_change(c)
            largest = max(largest, len(blob))
            f.write(struct.pack("<I", len(blob)))
            f.write(blob)
            del c, blob
else:
    with open(stream, "rb") as f:
        while head := f.read(4):
            blob = f.read(struct.unpack("<I", head)[0])
            largest = max(largest, len(blob))
            rb.apply(decode_change(blob))
            del blob
    rb.finish()
print(status("VmHWM") - base, largest)
"""


def _peak(tmp: pathlib.Path, side: str) -> tuple[int, int]:
    probe = tmp / "probe.py"
    probe.write_text(_PROBE)
    run = subprocess.run([sys.executable, str(probe), side, str(tmp / "d0"),
                          str(tmp / "stream"), str(tmp / "out")],
                         capture_output=True, text=True, check=True)
    growth, largest = map(int, run.stdout.split())
    return growth, largest


def test_a_96mib_file_needs_little_memory_on_either_side(tmp_path: pathlib.Path) -> None:
    """An incompressible 96 MiB file went as one 96 MiB item: the source's peak RSS
    rose by 193 MiB (the file read whole, and its compressed copy), the receiver's by
    195 MiB (the item, and its decoded copy). In parts, each side holds a few parts at
    a time: about 12 and 11 MiB."""
    d = tmp_path / "d0"
    d.mkdir()
    with open(d / "tmpfs-dev-1.tar.gz.img", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    source, largest = _peak(tmp_path, "source")
    receiver, received = _peak(tmp_path, "receiver")
    assert largest == received <= ITEM_MAX
    assert (tmp_path / "out" / "tmpfs-dev-1.tar.gz.img").stat().st_size == 96 * MiB
    assert source < 32 * MiB, f"the source's peak RSS rose by {source / MiB:.1f} MiB"
    assert receiver < 32 * MiB, f"the receiver's peak RSS rose by {receiver / MiB:.1f} MiB"
