"""Live memory reads against CRIU's own dump of the same process."""

from __future__ import annotations

import pathlib

from criu_harness import Mutator, require_criu

from ctlive.backends import liveread
from ctlive.backends.liveread import process_tree
from ctlive.images import diff as image_diff
from ctlive.images import layout


def test_read_matches_criu_dump(tmp_path: pathlib.Path) -> None:
    """The read names and lays out pages as CRIU does, so that the final dump is sent
    as a delta against it: nearly every page CRIU dumps is found, by address, in the
    read, and only what changed in between is sent."""
    require_criu()
    m = Mutator(tmp_path, mib=16, frac=0.02)
    try:
        liveread.read_tree(process_tree(m.pid), tmp_path / "read")
        m.dump(tmp_path / "dump", final=False)
    finally:
        m.kill()
    read, dump = layout.pagemaps(tmp_path / "read"), layout.pagemaps(tmp_path / "dump")
    assert set(read) == set(dump) == {"pagemap-1.img"}  # the tree's own PID namespace
    new, old = dump["pagemap-1.img"], read["pagemap-1.img"]
    matched = sum(seg.pages for seg in layout.segments(old, new))
    assert matched >= 0.98 * new.present_pages
    against_read, from_scratch = image_diff.DiffStats(), image_diff.DiffStats()
    for _ in image_diff.diff(tmp_path / "read", tmp_path / "dump", stats=against_read):
        pass
    for _ in image_diff.diff(None, tmp_path / "dump", stats=from_scratch):
        pass
    assert against_read.bytes_out < from_scratch.bytes_out / 4
