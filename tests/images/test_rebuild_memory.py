"""Whole-file items (FILE_WHOLE, FILE_ZDELTA) are written to disk as they decompress:
the receiver's memory is bounded by its buffers, not by the sizes a peer declares.
Output beyond the declared size is refused, a zdelta needs a small old file, and every
file the rebuilder writes is private (0600)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
import subprocess
import sys
from collections.abc import Iterable

import pytest
import zstandard

from ctlive.errors import DeltaFormatError
from ctlive.images import criu_format, rebuild
from ctlive.images import diff as image_diff
from ctlive.images.changes import MAX_ZDELTA_BASE, ChangeItem, ChangeKind
from ctlive.images.criu_format import PAGE_SIZE
from ctlive.images.manifest import bytes_digest

MiB = 1 << 20

# Loads one whole-file item and its manifest (that memory is the item's, not the
# rebuild's), resets the peak RSS (clear_refs 5), rebuilds, and prints how far the
# peak rose above the RSS at the reset.
_PROBE = """
import gc, json, pathlib, sys
from ctlive.images import criu_format, rebuild
from ctlive.images.changes import ChangeItem, ChangeKind
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) << 10
payload, name, size, digest, out = sys.argv[1:6]
item = ChangeItem(ChangeKind.FILE_WHOLE, name, size=int(size),
                  data=pathlib.Path(payload).read_bytes())
files = {name: json.loads(digest)}
done = ChangeItem(ChangeKind.MANIFEST, "", data=json.dumps(files).encode())
rb = rebuild.Rebuilder(None, out)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
rb.apply(item)
rb.apply(done)
rb.finish()
print(status("VmHWM") - base)
"""


def _whole_item_files(tmp: pathlib.Path, name: str, size: int, pieces: Iterable[bytes]
                      ) -> tuple[pathlib.Path, dict[str, object]]:
    """Stream a file of ``size`` bytes (``pieces``, one after the other) into a zstd
    payload file as the diff would send it (content size in the frame header);
    returns the payload and the file's manifest entry. Bounded memory in the test
    process too."""
    payload = tmp / f"{name}.zst"
    digest = hashlib.blake2b()
    with open(payload, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(
            f, size=size, closefd=False) as w:
        for piece in pieces:
            digest.update(piece)
            w.write(piece)
    return payload, {"size": size, "blake2b": digest.hexdigest()}


def _rebuild_peak(tmp: pathlib.Path, name: str, size: int, pieces: Iterable[bytes]) -> int:
    payload, entry = _whole_item_files(tmp, name, size, pieces)
    out = tmp / "out"
    probe = tmp / "probe.py"
    probe.write_text(_PROBE)
    run = subprocess.run([sys.executable, str(probe), str(payload), name, str(size),
                          json.dumps(entry), str(out)], capture_output=True, text=True,
                         check=True)
    written = out / name
    assert written.stat().st_size == size
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    return int(run.stdout)


@pytest.mark.parametrize(("name", "mib", "random"), [
    ("zeros-256m.img", 256, False),  # a few KB on the wire
    ("random-96m.img", 96, True),    # incompressible
], ids=["zeros-256MiB", "random-96MiB"])
def test_whole_file_rebuild_memory_is_bounded(tmp_path: pathlib.Path, name: str, mib: int,
                                              random: bool) -> None:
    """The rebuild's own addition to peak RSS (the item's payload aside): 256 MiB and
    96 MiB when whole-file items were decompressed in memory, about 3 MiB for either
    now that they stream to disk."""
    pieces = (os.urandom(MiB) if random else bytes(MiB) for _ in range(mib))
    growth = _rebuild_peak(tmp_path, name, mib * MiB, pieces)
    assert growth < 16 * MiB, f"peak RSS rose by {growth / MiB:.1f} MiB for {name}"


def _item(kind: ChangeKind, name: str, data: bytes, size: int,
          dict_data: bytes | None = None) -> ChangeItem:
    if dict_data is None:
        zc = zstandard.ZstdCompressor(level=1)
    else:
        zc = zstandard.ZstdCompressor(level=1, dict_data=zstandard.ZstdCompressionDict(
            dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
    return ChangeItem(kind, name, size=size, data=zc.compress(data))


def test_output_beyond_the_declared_size_is_refused(tmp_path: pathlib.Path) -> None:
    """A 256 MiB zero bomb declared as 4 KiB is refused once 4 KiB + 1 came out, and
    the partial file is removed."""
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 * MiB))
    with pytest.raises(DeltaFormatError, match="more than the 4096 bytes"):
        rb.apply(ChangeItem(ChangeKind.FILE_WHOLE, "core-1.img", size=4096, data=bomb))
    assert not (tmp_path / "out" / "core-1.img").exists()
    with pytest.raises(DeltaFormatError, match="more than the 99 bytes"):
        rb.apply(_item(ChangeKind.FILE_WHOLE, "core-1.img", b"x" * 100, 99))


def test_short_or_corrupt_output_is_refused(tmp_path: pathlib.Path) -> None:
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    with pytest.raises(DeltaFormatError, match="100 bytes, header says 101"):
        rb.apply(_item(ChangeKind.FILE_WHOLE, "core-1.img", b"x" * 100, 101))
    good = _item(ChangeKind.FILE_WHOLE, "core-1.img", os.urandom(5000), 5000).data
    for bad in (good[: len(good) // 2], good + b"trailing garbage", b"not zstd at all"):
        with pytest.raises(DeltaFormatError):
            rb.apply(ChangeItem(ChangeKind.FILE_WHOLE, "core-1.img", size=5000, data=bad))
        assert not (tmp_path / "out" / "core-1.img").exists()


def test_a_frame_needing_a_large_window_is_refused(tmp_path: pathlib.Path) -> None:
    """zstd would allocate the window a frame asks for: above MAX_WINDOW it is refused."""
    size = rebuild.MAX_WINDOW + MiB
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=24)
    data = zstandard.ZstdCompressor(compression_params=params).compress(bytes(size))
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    with pytest.raises(DeltaFormatError, match="too much memory"):
        rb.apply(ChangeItem(ChangeKind.FILE_WHOLE, "tmpfs-dev-1.tar.gz.img", size=size,
                            data=data))


def test_zdelta_needs_a_small_old_file(tmp_path: pathlib.Path) -> None:
    """The receiver refuses a zdelta whose dictionary (the old file) is above the cap,
    and the diff never sends one: a file whose old version is larger goes whole (or in
    parts, when it is larger than PART_SIZE itself)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    base = os.urandom(MAX_ZDELTA_BASE + 1)
    (old / "files.img").write_bytes(base)
    changed = base[:-1] + b"!"
    (new / "files.img").write_bytes(changed)
    items = list(image_diff.diff(old, new))
    assert [c.kind for c in items] == [ChangeKind.FILE_PART] * 3 + [ChangeKind.MANIFEST]
    (new / "files.img").write_bytes(changed[: image_diff.PART_SIZE])
    items = list(image_diff.diff(old, new))
    assert [c.kind for c in items] == [ChangeKind.FILE_WHOLE, ChangeKind.MANIFEST]
    (new / "files.img").write_bytes(changed)
    rb = rebuild.Rebuilder(old, tmp_path / "out")
    with pytest.raises(DeltaFormatError, match="deltas are accepted against old files of "
                                               f"up to {MAX_ZDELTA_BASE} bytes"):
        rb.apply(_item(ChangeKind.FILE_ZDELTA, "files.img", changed, len(changed), base))
    # Below the cap a zdelta is sent (when smaller: at level 1, for old files of up to
    # about the zstd window), and rebuilt.
    (old / "files.img").write_bytes(base[: 64 << 10])
    (new / "files.img").write_bytes(base[: (64 << 10) - 1] + b"!")
    items = list(image_diff.diff(old, new))
    assert items[0].kind == ChangeKind.FILE_ZDELTA
    rb = rebuild.Rebuilder(old, tmp_path / "out2")
    for c in items:
        rb.apply(c)
    rb.finish()
    assert (tmp_path / "out2" / "files.img").read_bytes() == (new / "files.img").read_bytes()


def _make_dump(d: pathlib.Path, pages: bytes, files: dict[str, bytes]) -> None:
    """A dump with one pagemap (one run at 0x10000) and ``files``."""
    d.mkdir()
    entry = criu_format.PagemapEntry(0x10000, len(pages) // PAGE_SIZE, criu_format.PE_PRESENT)
    criu_format.write_pagemap(d / "pagemap-1.img", 1, [entry])
    (d / "pages-1.img").write_bytes(pages)
    for name, data in files.items():
        (d / name).write_bytes(data)


def test_written_files_are_private_whatever_the_umask(tmp_path: pathlib.Path) -> None:
    """Whole, zdelta, unchanged and pages files alike: 0600, even under umask 0 (and
    not fewer bits under a stricter one)."""
    core = os.urandom(3000)
    _make_dump(tmp_path / "d0", os.urandom(8 * PAGE_SIZE),
               {"core-1.img": core, "mm-1.img": b"m" * 50, "fs-1.img": b"f"})
    _make_dump(tmp_path / "d1", os.urandom(9 * PAGE_SIZE),
               {"core-1.img": core[:-1] + b"!", "mm-1.img": b"m" * 50, "fs-1.img": b"g" * 9})
    for umask in (0o000, 0o277):
        prev = os.umask(umask)
        try:
            for old, new, out in ((None, "d0", f"r0-{umask}"), ("d0", "d1", f"r1-{umask}")):
                rb = rebuild.Rebuilder(tmp_path / old if old else None, tmp_path / out)
                items = list(image_diff.diff(tmp_path / old if old else None, tmp_path / new))
                for c in items:
                    rb.apply(c)
                rb.finish()
                kinds = {c.kind for c in items}
                modes = {p.name: stat.S_IMODE(p.stat().st_mode)
                         for p in (tmp_path / out).iterdir()}
                assert set(modes.values()) == {0o600}, (umask, modes)
        finally:
            os.umask(prev)
    assert {ChangeKind.FILE_SAME, ChangeKind.FILE_ZDELTA, ChangeKind.PAGES} <= kinds


def test_a_manifest_entry_matches_the_streamed_file(tmp_path: pathlib.Path) -> None:
    """The probe's manifest entry is the one the diff would write."""
    data = os.urandom(3 * MiB + 17)
    pieces = [data[i : i + MiB] for i in range(0, len(data), MiB)]
    payload, entry = _whole_item_files(tmp_path, "x.img", len(data), pieces)
    assert entry == bytes_digest(data)
    assert zstandard.ZstdDecompressor().decompress(payload.read_bytes()) == data
