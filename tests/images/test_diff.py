"""Image model and image diff/rebuild: synthetic dumps, real CRIU dumps, fuzzing."""

from __future__ import annotations

import filecmp
import os
import pathlib
import random
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive import errors
from ctlive.cli import main as cli_main
from ctlive.images import changes, criu_format, layout, manifest, pagediff, rebuild
from ctlive.images import diff as image_diff

PAGE = 4096


def make_dump(d: pathlib.Path, maps: dict[int, list[tuple[int, bytes]]],
              files: dict[str, bytes]) -> None:
    """maps: pid -> [(vaddr, pages bytes)]; one pagemap and pages file per pid."""
    d.mkdir(parents=True, exist_ok=True)
    for pages_id, (pid, runs) in enumerate(sorted(maps.items()), 1):
        entries = [criu_format.PagemapEntry(v, len(data) // PAGE, criu_format.PE_PRESENT)
                   for v, data in runs]
        criu_format.write_pagemap(d / f"pagemap-{pid}.img", pages_id, entries)
        (d / f"pages-{pages_id}.img").write_bytes(b"".join(data for _, data in runs))
    for name, data in files.items():
        (d / name).write_bytes(data)


def roundtrip(old: pathlib.Path | None, new: pathlib.Path, out: pathlib.Path,
              window: int = 3, shuffle: int | None = None) -> image_diff.DiffStats:
    st = image_diff.DiffStats()
    items = [changes.encode_change(c)
             for c in image_diff.diff(old, new, window_pages=window, stats=st)]
    if shuffle is not None:  # lanes deliver items in any order
        random.Random(shuffle).shuffle(items)
    rb = rebuild.Rebuilder(old, out)
    for item in items:
        rb.apply(changes.decode_change(item))
    rb.finish()
    names = sorted(p.name for p in new.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for n in names:
        assert filecmp.cmp(new / n, out / n, shallow=False), n
    return st


def rnd_pages(r: random.Random, n: int) -> bytes:
    return b"".join(r.randbytes(PAGE) if r.random() < 0.7 else bytes(PAGE) for _ in range(n))


def test_synthetic_sequence(tmp_path: pathlib.Path) -> None:
    r = random.Random(3)
    a = rnd_pages(r, 10)
    b = rnd_pages(r, 4)
    make_dump(tmp_path / "d0", {7: [(0x10000, a), (0x80000, b)]},
              {"core-7.img": b"core" * 100, "files.img": b"x" * 50})
    # Next dump: run a changed in place; run b moved; a new mapping; a new process;
    # one file changed slightly, one removed, one added.
    a2 = bytearray(a)
    a2[5 * PAGE + 17] ^= 0xFF
    a2[2 * PAGE : 3 * PAGE] = bytes(PAGE)
    make_dump(tmp_path / "d1",
              {7: [(0x10000, bytes(a2)), (0x90000, b), (0x200000, rnd_pages(r, 3))],
               9: [(0x40000, rnd_pages(r, 2))]},
              {"core-7.img": b"core" * 99 + b"CORE", "inventory.img": b"inv"})
    full = roundtrip(None, tmp_path / "d0", tmp_path / "r0")
    assert full.pages_total == 14
    inc = roundtrip(tmp_path / "r0", tmp_path / "d1", tmp_path / "r1")
    assert inc.pages_total == 19
    # The moved run is found by vaddr: only in-place changes and new pages are sent.
    assert inc.pages_changed < inc.pages_total


@pytest.mark.parametrize("seed", range(6))
def test_items_in_any_order(tmp_path: pathlib.Path, seed: int) -> None:
    """With several lanes, the manifest can come first and pages before their pagemap."""
    r = random.Random(seed)
    make_dump(tmp_path / "d0", {3: [(0x10000, rnd_pages(r, 9))], 4: [(0x1000, rnd_pages(r, 5))]},
              {"core-3.img": b"core" * 30})
    make_dump(tmp_path / "d1", {3: [(0x10000, rnd_pages(r, 9)), (0x90000, rnd_pages(r, 2))],
                                4: [(0x1000, rnd_pages(r, 5))]}, {"core-3.img": b"core" * 31})
    roundtrip(None, tmp_path / "d0", tmp_path / "r0", shuffle=seed)
    roundtrip(tmp_path / "r0", tmp_path / "d1", tmp_path / "r1", shuffle=seed + 100)


def test_pages_without_pagemap_refused(tmp_path: pathlib.Path) -> None:
    r = random.Random(6)
    make_dump(tmp_path / "d0", {1: [(0x1000, rnd_pages(r, 4))]}, {})
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    for c in image_diff.diff(None, tmp_path / "d0"):
        if not c.name.startswith("pagemap"):
            rb.apply(c)
    with pytest.raises(errors.DeltaFormatError, match="pagemap never did"):
        rb.finish()


def test_unchanged_dump_sends_only_markers(tmp_path: pathlib.Path) -> None:
    r = random.Random(4)
    make_dump(tmp_path / "d0", {1: [(0x1000, rnd_pages(r, 8))]}, {"mm-1.img": b"mm"})
    roundtrip(None, tmp_path / "d0", tmp_path / "r0")
    st = roundtrip(tmp_path / "r0", tmp_path / "d0", tmp_path / "r1")
    assert st.pages_changed == 0
    assert st.files_unchanged == 2  # mm-1.img and the pagemap


def test_tampered_item_fails_verification(tmp_path: pathlib.Path) -> None:
    r = random.Random(5)
    make_dump(tmp_path / "d0", {1: [(0x1000, rnd_pages(r, 4))]}, {"mm-1.img": b"mm" * 10})
    items = list(image_diff.diff(None, tmp_path / "d0"))
    rb = rebuild.Rebuilder(None, tmp_path / "out")
    for c in items:
        if c.kind == changes.ChangeKind.MANIFEST:
            c = changes.ChangeItem(c.kind, c.name, data=c.data.replace(b'"size":20', b'"size":21'))
        rb.apply(c)
    with pytest.raises(errors.ImageFormatError, match="differs"):
        rb.finish()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 255))
def test_rebuilder_fuzz(tmp_path_factory: pytest.TempPathFactory, pos: int, val: int) -> None:
    tmp = tmp_path_factory.mktemp("fz")
    r = random.Random(6)
    make_dump(tmp / "d0", {1: [(0x1000, rnd_pages(r, 3))]}, {"mm-1.img": b"mm" * 10})
    items = [changes.encode_change(c) for c in image_diff.diff(None, tmp / "d0")]
    k = pos % len(items)
    mutated = bytearray(items[k])
    mutated[pos % len(mutated)] = val
    items[k] = bytes(mutated)
    rb = rebuild.Rebuilder(None, tmp / "out")
    try:
        for item in items:
            rb.apply(changes.decode_change(item))
        rb.finish()
    except (errors.DeltaFormatError, errors.ImageFormatError):
        pass
    finally:
        rb.close()


def test_pagemap_errors(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "pagemap-1.img"
    criu_format.write_pagemap(good, 1,
                              [criu_format.PagemapEntry(0x1000, 2, criu_format.PE_PRESENT)])
    data = good.read_bytes()
    for bad, where in ((data[:3], "magic"), (b"\0" * 8 + data[8:], "magic"),
                       (data[:-2], "past the end"), (data[:8] + b"\xff\xff\xff\x7f", "past")):
        p = tmp_path / "bad.img"
        p.write_bytes(bad)
        with pytest.raises(errors.ImageFormatError, match=where) as info:
            criu_format.read_pagemap(p)
        assert "bad.img" in str(info.value)


# --- real CRIU ----------------------------------------------------------------------------


real_dumps_marker: list[str] = []
real_dumps_count: list[int] = []
real_dumps_counter: list[pathlib.Path] = []


@pytest.fixture(scope="module")
def real_dumps(tmp_path_factory: pytest.TempPathFactory) -> list[pathlib.Path]:
    from criu_harness import Mutator, require_criu

    require_criu()
    tmp = tmp_path_factory.mktemp("criu")
    m = Mutator(tmp, mib=16, frac=0.2)
    try:
        dumps = []
        for k in range(3):
            d = tmp / f"dump{k}"
            m.dump(d, final=k == 2)
            dumps.append(d)
            time.sleep(0.5)
        real_dumps_marker.append(str(m.script))
        real_dumps_count.append(m.count())  # frozen by the final dump
        m.kill()
        real_dumps_counter.append(m.counter)
        return dumps
    finally:
        m.kill()


def test_real_image_roundtrip(real_dumps: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    d0 = real_dumps[0]
    pm = criu_format.read_pagemap(next(d0.glob("pagemap-*.img")))
    pages = d0 / f"pages-{pm.pages_id}.img"
    assert pm.present_pages * PAGE == pages.stat().st_size
    out = tmp_path / "pagemap.img"
    criu_format.write_pagemap(out, pm.pages_id, list(pm.entries))
    assert out.read_bytes() == next(d0.glob("pagemap-*.img")).read_bytes()
    s = criu_format.read_stats(d0 / "stats-dump")
    assert s.pages_written == pm.present_pages
    assert s.frozen_time > 0


def test_real_dumps_rebuild_and_restore(real_dumps: list[pathlib.Path],
                                        tmp_path: pathlib.Path) -> None:
    from criu_harness import _python_pid, read_counter, restore_stopped, state

    prev = None
    sizes = []
    for k, d in enumerate(real_dumps[:3]):
        for log in d.glob("*.log"):
            log.unlink()
        out = tmp_path / f"r{k}"
        st = roundtrip(prev, d, out, window=layout.DEFAULT_WINDOW_PAGES)
        sizes.append((st.bytes_in, st.bytes_out))
        prev = out
    assert sizes[1][1] < sizes[0][1] / 5  # an iteration is far smaller than the full image
    # CRIU restores the rebuilt final dump, stopped; SIGCONT resumes it.
    restore_stopped(prev)
    pid = _python_pid(pathlib.Path(real_dumps_marker[-1]), states=("T",))
    try:
        assert state(pid) == "T"
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)
        assert state(pid) in ("S", "R")
        # The restored workload goes on from its state: the counter continues.
        after = read_counter(real_dumps_counter[-1])
        assert after > real_dumps_count[-1]
    finally:
        os.kill(pid, signal.SIGKILL)


def test_image_cli_roundtrip(real_dumps: list[pathlib.Path], tmp_path: pathlib.Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    d0, d1 = real_dumps[0], real_dumps[1]
    assert cli_main(["image", "diff", "-", str(d0), "-o", str(tmp_path / "full")]) == 0
    assert cli_main(["image", "patch", "-", str(tmp_path / "full"), "-o",
                     str(tmp_path / "p0")]) == 0
    assert cli_main(["image", "diff", str(d0), str(d1), "-o", str(tmp_path / "inc")]) == 0
    assert cli_main(["image", "patch", str(tmp_path / "p0"), str(tmp_path / "inc"), "-o",
                     str(tmp_path / "p1")]) == 0
    assert "verified" in capsys.readouterr().out
    for p in d1.iterdir():
        if not p.name.endswith(".log"):
            assert filecmp.cmp(p, tmp_path / "p1" / p.name, shallow=False)
    assert (tmp_path / "inc").stat().st_size < (tmp_path / "full").stat().st_size / 5


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 255), st.booleans())
def test_mutated_real_images(real_dumps: list[pathlib.Path],
                             tmp_path_factory: pytest.TempPathFactory,
                             pos: int, val: int, truncate: bool) -> None:
    d0 = real_dumps[0]
    files = sorted(p for p in d0.glob("*.img") if p.name.startswith(("pagemap", "stats")))
    files.append(d0 / "stats-dump")
    src = files[pos % len(files)]
    data = bytearray(src.read_bytes())
    if truncate:
        del data[pos % len(data):]
    else:
        data[pos % len(data)] = val
    p = tmp_path_factory.mktemp("mut") / src.name
    p.write_bytes(bytes(data))
    try:
        if src.name.startswith("pagemap"):
            criu_format.read_pagemap(p)
        else:
            criu_format.read_stats(p)
    except errors.ImageFormatError:
        pass


def test_carried_hashes_match_fresh_ones(tmp_path: pathlib.Path) -> None:
    """The receiver re-hashes only patched windows; the result equals hashing anew,
    and a bad item in a patched window is still caught."""
    r = random.Random(8)
    pages = bytearray(rnd_pages(r, 40))
    make_dump(tmp_path / "d0", {1: [(0x10000, bytes(pages))]}, {"core-1.img": b"c"})
    rb = rebuild.Rebuilder(None, tmp_path / "r0", consume_old=True)
    for c in image_diff.diff(None, tmp_path / "d0", window_pages=8):
        rb.apply(c)
    rb.finish()
    hashes, prev = rb.page_hashes, tmp_path / "r0"
    for k in (1, 2, 3):
        pages[r.randrange(40) * PAGE + 9] ^= 0x5A
        make_dump(tmp_path / f"d{k}", {1: [(0x10000, bytes(pages))]}, {"core-1.img": b"c"})
        items = list(image_diff.diff(tmp_path / f"d{k - 1}", tmp_path / f"d{k}", window_pages=8))
        rb = rebuild.Rebuilder(prev, tmp_path / f"r{k}", consume_old=True, old_hashes=hashes)
        if k == 3:  # flip a byte inside a patched window: verification must fail
            i = next(j for j, c in enumerate(items) if c.kind == changes.ChangeKind.PAGES)
            c = items[i]
            raw = bytearray(pagediff.decompress(c.data, c.page_count * pagediff.MAX_RECORD))
            raw[-1] ^= 1
            items[i] = changes.ChangeItem(c.kind, c.name, first_page=c.first_page,
                                          page_count=c.page_count,
                                          data=pagediff.compress(bytes(raw)))
            for c in items:
                rb.apply(c)
            with pytest.raises((errors.ImageFormatError, errors.DeltaFormatError)):
                rb.finish()
            return
        for c in items:
            rb.apply(c)
        rb.finish()
        assert rb.page_hashes == {"pages-1.img": manifest.hash_file_pages(
            tmp_path / f"r{k}" / "pages-1.img")}
        assert filecmp.cmp(tmp_path / f"d{k}" / "pages-1.img", tmp_path / f"r{k}" / "pages-1.img",
                           shallow=False)
        hashes, prev = rb.page_hashes, tmp_path / f"r{k}"


_RSS_PROBE = """
import pathlib, sys
from ctlive.images import diff as image_diff, rebuild
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) << 10
d0, d1, d2, out = map(pathlib.Path, sys.argv[1:5])
start = hwm()
rb = rebuild.Rebuilder(None, out / "r0", consume_old=True)
for c in image_diff.diff(None, d0):
    rb.apply(c)
rb.finish()
rb2 = rebuild.Rebuilder(out / "r0", out / "r1", consume_old=True, old_hashes=rb.page_hashes)
for c in image_diff.diff(d0, d1):
    rb2.apply(c)
rb2.finish()
# A page appeared below the mapping: the whole file moves up by one page, in place.
rb3 = rebuild.Rebuilder(out / "r1", out / "r2", consume_old=True, old_hashes=rb2.page_hashes)
for c in image_diff.diff(d1, d2):
    rb3.apply(c)
rb3.finish()
print(hwm() - start)
"""


def test_memory_bounded_by_window(tmp_path: pathlib.Path) -> None:
    """Diff, rebuild and verify of a 256 MiB image keep the process's peak RSS far below
    the image size (mappings drop each window once done), also when the layout changed
    and the receiver moves every page inside the file."""
    import subprocess
    import sys

    n = 65536
    data = bytearray(os.urandom(n * PAGE))
    for i in range(0, n, 2):
        data[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    make_dump(tmp_path / "d0", {1: [(0x100000, bytes(data))]}, {"core-1.img": b"c" * 100})
    for i in range(0, n, 97):
        data[i * PAGE + 5] ^= 1
    make_dump(tmp_path / "d1", {1: [(0x100000, bytes(data))]}, {"core-1.img": b"c" * 101})
    make_dump(tmp_path / "d2", {1: [(0xFF000, os.urandom(PAGE)), (0x100000, bytes(data))]},
              {"core-1.img": b"c" * 101})
    del data
    (tmp_path / "out").mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(_RSS_PROBE)
    out = subprocess.run([sys.executable, str(probe), str(tmp_path / "d0"), str(tmp_path / "d1"),
                          str(tmp_path / "d2"), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True)
    growth = int(out.stdout)
    assert growth < 160 << 20, f"peak RSS grew by {growth >> 20} MiB for a 256 MiB image"


def test_parallel_diff_is_identical(tmp_path: pathlib.Path) -> None:
    """Windows diffed on a thread pool give the same items, in the same order."""
    r = random.Random(12)
    a = bytearray(rnd_pages(r, 50))
    make_dump(tmp_path / "d0", {1: [(0x10000, bytes(a))]}, {"core-1.img": b"c"})
    for i in range(0, 50, 3):
        a[i * PAGE + 100] ^= 0x33
    make_dump(tmp_path / "d1", {1: [(0x10000, bytes(a)), (0x900000, rnd_pages(r, 7))]},
              {"core-1.img": b"d"})
    for old in (None, tmp_path / "d0"):
        one = list(image_diff.diff(old, tmp_path / "d1", window_pages=4))
        four = list(image_diff.diff(old, tmp_path / "d1", window_pages=4, threads=4))
        assert one == four
    roundtrip(tmp_path / "d0", tmp_path / "d1", tmp_path / "r1", window=4)


def _layout_change(r: random.Random, runs: list[tuple[int, bytearray]]
                   ) -> list[tuple[int, bytearray]]:
    """The next dump's runs: pages appear or vanish inside runs, runs grow, shrink,
    appear and vanish, and some pages change."""
    out = []
    for vaddr, data in runs:
        n = len(data) // PAGE
        op = r.random()
        if op < 0.15 and len(runs) > 1:
            continue  # the mapping went away
        pages = [bytearray(data[i * PAGE : (i + 1) * PAGE]) for i in range(n)]
        if op < 0.4:  # grow at the end
            pages += [bytearray(r.randbytes(PAGE)) for _ in range(r.randint(1, 3))]
        elif op < 0.55 and n > 1:  # shrink at the end
            pages = pages[: r.randint(1, n - 1)]
        for p in pages:
            if r.random() < 0.2:
                p[r.randrange(PAGE)] ^= 0x77
        # Split the run at a random page: a hole (page not present) inside the mapping.
        if len(pages) > 2 and r.random() < 0.3:
            cut = r.randint(1, len(pages) - 2)
            out.append((vaddr, bytearray(b"".join(pages[:cut]))))
            out.append((vaddr + (cut + 1) * PAGE, bytearray(b"".join(pages[cut + 1 :]))))
            continue
        out.append((vaddr, bytearray(b"".join(pages))))
    if r.random() < 0.4:
        top = max(v + len(d) for v, d in out) if out else 0x10000
        out.append((top + PAGE * r.randint(1, 4), bytearray(rnd_pages(r, r.randint(1, 4)))))
    if r.random() < 0.3 and all(v > 0x1000 for v, _ in out):
        out.append((0x1000, bytearray(rnd_pages(r, 2))))
    out.sort(key=lambda run: run[0])
    # Mappings do not overlap: a run that grew into the next one stops short of it.
    return [(v, d if i + 1 == len(out) else d[: max(0, out[i + 1][0] - v)])
            for i, (v, d) in enumerate(out) if i + 1 == len(out) or out[i + 1][0] > v]


@pytest.mark.parametrize("seed", range(12))
def test_changed_layout_is_rearranged_in_place(tmp_path: pathlib.Path, seed: int) -> None:
    """When mappings grow, shrink, split or appear, the receiver rearranges the previous
    pages file inside itself (same file, no new one) and still rebuilds every dump
    byte for byte, with carried hashes that equal hashing anew."""
    r = random.Random(seed)
    runs = [(0x100000 + i * 0x40000, bytearray(rnd_pages(r, r.randint(2, 12))))
            for i in range(4)]
    make_dump(tmp_path / "d0", {1: [(v, bytes(d)) for v, d in runs]}, {"core-1.img": b"c"})
    rb = rebuild.Rebuilder(None, tmp_path / "r0", consume_old=True)
    for c in image_diff.diff(None, tmp_path / "d0", window_pages=4):
        rb.apply(c)
    rb.finish()
    hashes, prev = rb.page_hashes, tmp_path / "r0"
    rearranged = 0
    for k in range(1, 6):
        runs = _layout_change(r, runs)
        make_dump(tmp_path / f"d{k}", {1: [(v, bytes(d)) for v, d in runs]},
                  {"core-1.img": b"c"})
        inode = (prev / "pages-1.img").stat().st_ino
        rb = rebuild.Rebuilder(prev, tmp_path / f"r{k}", consume_old=True, old_hashes=hashes)
        for c in image_diff.diff(tmp_path / f"d{k - 1}", tmp_path / f"d{k}", window_pages=4):
            rb.apply(c)
        rb.finish()
        out = tmp_path / f"r{k}" / "pages-1.img"
        assert out.read_bytes() == (tmp_path / f"d{k}" / "pages-1.img").read_bytes()
        assert rb.page_hashes["pages-1.img"] == manifest.hash_file_pages(out)
        if out.stat().st_ino == inode:
            rearranged += 1
        hashes, prev = rb.page_hashes, tmp_path / f"r{k}"
    assert rearranged >= 3  # most steps keep most pages: the old file is reused


_runs = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6)), min_size=1, max_size=5)


@given(_runs, _runs, st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_any_layouts_rebuild_exactly_or_fail_cleanly(
        tmp_path_factory: pytest.TempPathFactory, old_runs: list[tuple[int, int]],
        new_runs: list[tuple[int, int]], seed: int) -> None:
    """Whatever the two pagemaps say (overlapping runs included, which CRIU never
    writes), the receiver rebuilds the new dump exactly, in place or not, or refuses it
    with a ctlive error."""
    r = random.Random(seed)
    tmp = tmp_path_factory.mktemp("layouts")
    pool = rnd_pages(r, 64)

    def runs(spec: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        out = []
        for page, n in spec:
            data = bytearray(pool[page * PAGE : (page + n) * PAGE].ljust(n * PAGE, b"\0"))
            if r.random() < 0.5:
                data[r.randrange(len(data))] ^= 0x41
            out.append((0x100000 + page * PAGE, bytes(data)))
        return out

    make_dump(tmp / "d0", {1: runs(old_runs)}, {"core-1.img": b"c"})
    make_dump(tmp / "d1", {1: runs(new_runs)}, {"core-1.img": b"c"})
    rb = rebuild.Rebuilder(None, tmp / "r0", consume_old=True)
    for c in image_diff.diff(None, tmp / "d0", window_pages=3):
        rb.apply(c)
    rb.finish()
    rb = rebuild.Rebuilder(tmp / "r0", tmp / "r1", consume_old=True,
                             old_hashes=rb.page_hashes)
    try:
        for c in image_diff.diff(tmp / "d0", tmp / "d1", window_pages=3):
            rb.apply(c)
        rb.finish()
    except errors.CtliveError:
        return
    finally:
        rb.close()
    assert (tmp / "r1" / "pages-1.img").read_bytes() == (tmp / "d1" / "pages-1.img").read_bytes()
