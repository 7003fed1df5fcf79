"""Carried trees: a tree with hard links, symlinks, modes, owners, xattrs and sparse files
comes out exactly as scanned; later iterations send only what changed; hostile manifests
and blobs are refused. Trees live on /dev/shm (tmpfs: user.* xattrs and holes work)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import uuid
from collections.abc import Iterator

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive.errors import DeltaFormatError, RestoreError
from ctlive.images.changes import ChangeItem, ChangeKind, decode_change, encode_change
from ctlive.images.tree import EMPTY_DIGEST, TreeSender, scan
from ctlive.images.tree_apply import TreeReceiver

MiB = 1 << 20


@pytest.fixture
def shm() -> Iterator[pathlib.Path]:
    d = pathlib.Path("/dev/shm") / f"ctlive-tree-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_tree(root: pathlib.Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "conf").write_text("a = 1\n")
    os.chmod(root / "etc" / "conf", 0o640)
    os.chown(root / "etc" / "conf", 1234, 5678)
    os.setxattr(root / "etc" / "conf", "user.note", b"kept")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(3 * MiB) + b"x" * (2 * MiB))
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-again")
    (root / "bin" / "sh").symlink_to("tool")
    (root / "escape").symlink_to("/etc")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(b"middle" * 1000)
        f.seek(60 * MiB)
        f.write(b"end")
    os.setxattr(root / "etc", "user.dir", b"too")
    os.chmod(root / "etc", 0o750)
    os.utime(root / "etc", ns=(1_000_000_000, 1_500_000_123))


def send(sender: TreeSender, rx: TreeReceiver) -> int:
    """One iteration through the wire codec; returns its bytes."""
    total = 0
    items = list(sender.items())
    for it in reversed(items):  # lanes give no order: manifest first, blobs after
        blob = encode_change(it)
        total += len(blob)
        rx.apply(decode_change(blob))
    rx.end_iteration()
    return total


def snapshot(root: pathlib.Path) -> list[tuple[object, ...]]:
    out = []
    for e, _ in scan(root):
        out.append((e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.digest,
                    e.extents, e.target, e.xattrs))
    return out


def test_round_trip_keeps_links_modes_owners_xattrs_and_holes(shm: pathlib.Path) -> None:
    src, dst = shm / "src", shm / "dst"
    make_tree(src)
    sender = TreeSender({"data": str(src)})
    rx = TreeReceiver(shm / "work")
    wire = send(sender, rx)
    # zstd, and holes not sent: far less than the 64 MiB sparse file's apparent size.
    assert wire < 5 * MiB
    rx.materialize("data", dst)
    assert snapshot(dst) == snapshot(src)
    st_tool = (dst / "bin" / "tool").stat()
    assert stat.S_IMODE(st_tool.st_mode) == 0o4755
    assert st_tool.st_ino == (dst / "bin" / "tool-again").stat().st_ino
    assert os.readlink(dst / "bin" / "sh") == "tool"
    assert os.readlink(dst / "escape") == "/etc"
    assert os.getxattr(dst / "etc" / "conf", "user.note") == b"kept"
    assert os.getxattr(dst / "etc", "user.dir") == b"too"
    assert (dst / "etc" / "conf").stat().st_uid == 1234
    assert (dst / "etc").stat().st_mtime_ns == 1_500_000_123
    sparse = (dst / "sparse.img").stat()
    assert sparse.st_size == 64 * MiB
    assert sparse.st_blocks * 512 < 1 * MiB  # holes stayed holes
    assert (dst / "sparse.img").read_bytes() == (src / "sparse.img").read_bytes()


def test_later_iterations_send_only_what_changed(shm: pathlib.Path) -> None:
    src, dst = shm / "src", shm / "dst"
    make_tree(src)
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(64 << 10))
    sender = TreeSender({"data": str(src)})
    rx = TreeReceiver(shm / "work")
    first = send(sender, rx)
    assert first > 3 * MiB
    # Nothing changed: only the manifest travels.
    assert send(sender, rx) < 8 << 10
    # grow, shrink, vanish, rename, new hard link, mode change, and a same-size
    # same-mtime content change.
    with open(src / "f0", "ab") as f:
        f.write(os.urandom(1000))
    os.truncate(src / "f1", 10)
    (src / "f2").unlink()
    (src / "bin" / "tool").rename(src / "bin" / "renamed")
    os.link(src / "f3", src / "f3-link")
    os.chmod(src / "f4", 0o600)
    st5 = (src / "f5").stat()
    with open(src / "f5", "r+b") as f:
        f.write(os.urandom(100))
    os.utime(src / "f5", ns=(st5.st_atime_ns, st5.st_mtime_ns))
    assert (src / "f5").stat().st_mtime_ns == st5.st_mtime_ns
    later = send(sender, rx)
    # f0 and f5 again (about 130 KiB of random data), f1's 10 bytes, the manifest; the
    # renamed 5 MiB file is not resent.
    assert 128 << 10 < later < 160 << 10
    rx.materialize("data", dst)
    assert snapshot(dst) == snapshot(src)
    assert not (dst / "f2").exists()
    assert (dst / "f1").read_bytes() == (src / "f1").read_bytes()
    assert (dst / "f5").read_bytes() == (src / "f5").read_bytes()
    assert (dst / "f3-link").stat().st_ino == (dst / "f3").stat().st_ino
    # Blobs that no manifest names any more were dropped on the receiver.
    assert len(list((shm / "work" / "trees").iterdir())) == len(rx.held) - 1


def manifest_item(label: str, entries: list[dict[str, object]]) -> ChangeItem:
    raw = json.dumps({"v": 1, "label": label, "entries": entries}).encode()
    return ChangeItem(ChangeKind.TREE_MANIFEST, label, data=zstandard.compress(raw))


ROOT = {"p": ".", "k": "dir", "m": 0o755, "u": 0, "g": 0, "t": 0}


@pytest.mark.parametrize("entries, why", [
    ([ROOT, {**ROOT, "p": "../x"}], "climbs out"),
    ([ROOT, {**ROOT, "p": "/etc"}], "climbs out"),
    ([ROOT, {**ROOT, "p": "a/./b"}], "climbs out"),
    ([ROOT, {"p": "l", "k": "symlink", "m": 0, "u": 0, "g": 0, "t": 0, "l": "/etc"},
      {"p": "l/passwd", "k": "file", "m": 0o644, "u": 0, "g": 0, "t": 0, "s": 0,
       "h": EMPTY_DIGEST, "e": []}], "parent is not an earlier directory"),
    ([ROOT, {"p": "h", "k": "hardlink", "l": "etc/shadow"}], "hard link"),
    ([ROOT, {"p": "f", "k": "file", "m": 0o644, "u": 0, "g": 0, "t": 0, "s": 10,
             "h": "0" * 64, "e": [[5, 10]]}], "extent length"),
    ([ROOT, {"p": "f", "k": "file", "m": 0o644, "u": 0, "g": 0, "t": 0, "s": 1 << 50,
             "h": "0" * 64, "e": []}], "size"),
    ([ROOT, {**ROOT, "p": "d", "m": 0o77777}], "mode"),
    ([{**ROOT, "p": "d"}], "root directory"),
    ([ROOT, {**ROOT, "p": "d"}, {**ROOT, "p": "d"}], "twice"),
])
def test_hostile_manifests_are_refused(shm: pathlib.Path, entries: list[dict[str, object]],
                                       why: str) -> None:
    rx = TreeReceiver(shm / "work")
    with pytest.raises(DeltaFormatError, match=why):
        rx.apply(decode_change(encode_change(manifest_item("data", entries))))


def test_a_manifest_bomb_is_refused(shm: pathlib.Path) -> None:
    bomb = zstandard.compress(b"[" * (300 << 20))
    with pytest.raises(DeltaFormatError, match="not zstd JSON"):
        TreeReceiver(shm / "w").apply(ChangeItem(ChangeKind.TREE_MANIFEST, "data", data=bomb))


def test_a_blob_that_does_not_match_its_name_is_refused(shm: pathlib.Path) -> None:
    rx = TreeReceiver(shm / "work")
    data = zstandard.ZstdCompressor(write_content_size=True).compress(b"evil")
    with pytest.raises(DeltaFormatError, match="does not match its name"):
        rx.apply(decode_change(encode_change(
            ChangeItem(ChangeKind.TREE_BLOB, "ab" * 32, size=4, data=data))))
    assert not any((shm / "work" / "trees").glob("abab*[!t]"))


@pytest.mark.parametrize("size, offset, why", [
    (1 << 31, 0, "above"),            # oversize blob
    (4, 2, "past the file"),          # a part that ends past the blob
])
def test_oversize_or_misplaced_blob_parts_are_refused(shm: pathlib.Path, size: int,
                                                      offset: int, why: str) -> None:
    data = zstandard.ZstdCompressor(write_content_size=True).compress(b"evil")
    with pytest.raises(DeltaFormatError, match=why):
        decode_change(encode_change(
            ChangeItem(ChangeKind.TREE_BLOB, "ab" * 32, size=size, offset=offset, data=data)))


def test_a_manifest_naming_a_blob_never_sent_is_refused(shm: pathlib.Path) -> None:
    rx = TreeReceiver(shm / "work")
    rx.apply(manifest_item("data", [ROOT, {"p": "f", "k": "file", "m": 0o644, "u": 0, "g": 0,
                                           "t": 0, "s": 4, "h": "cd" * 32, "e": [[0, 4]]}]))
    with pytest.raises(DeltaFormatError, match="does not hold"):
        rx.end_iteration()


def test_materializing_refuses_a_tree_that_does_not_verify(shm: pathlib.Path) -> None:
    src = shm / "src"
    src.mkdir()
    (src / "f").write_text("hello")
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"data": str(src)}), rx)
    # The blob store was tampered with after receipt: the tree does not verify.
    (blob,) = [p for p in (shm / "work" / "trees").iterdir()]
    blob.write_text("HELLO")
    with pytest.raises(RestoreError, match="content hash"):
        rx.materialize("data", shm / "dst")


def test_materializing_refuses_a_non_empty_destination(shm: pathlib.Path) -> None:
    src = shm / "src"
    src.mkdir()
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"data": str(src)}), rx)
    (shm / "dst").mkdir()
    (shm / "dst" / "x").write_text("there")
    with pytest.raises(RestoreError, match="not empty"):
        rx.materialize("data", shm / "dst")


def test_unknown_labels_are_not_names(shm: pathlib.Path) -> None:
    with pytest.raises(DeltaFormatError, match="unsafe"):
        TreeSender({"../x": str(shm)})


# --- a process tree's carried directories at the destination -------------------------

def _varint_field(num: int, v: int) -> bytes:
    from ctlive.images.criu_format import encode_varint

    return encode_varint(num << 3) + encode_varint(v)


def _bytes_field(num: int, b: bytes) -> bytes:
    from ctlive.images.criu_format import encode_varint

    return encode_varint(num << 3 | 2) + encode_varint(len(b)) + b


def _files_img(d: pathlib.Path, files: list[tuple[str, int | None, int]]) -> None:
    """A files.img of regular-file entries (path, size or None, st_mode), as CRIU writes
    it (a size for mapped files only)."""
    from ctlive.backends.carry import FILES_MAGIC
    from ctlive.images.criu_format import write_image

    msgs = []
    for i, (path, size, mode) in enumerate(files, 1):
        reg = (_varint_field(1, i) + _varint_field(2, 0) + _varint_field(3, 0)
               + _bytes_field(6, path.encode())
               + (_varint_field(8, size) if size is not None else b"")
               + _varint_field(10, mode))
        msgs.append(_varint_field(1, 1) + _varint_field(2, i) + _bytes_field(3, reg))
    write_image(d / "files.img", FILES_MAGIC, msgs)


def test_open_files_are_checked_against_the_dump(shm: pathlib.Path) -> None:
    from ctlive.backends.carry import check_open_files

    data = shm / "data"
    data.mkdir()
    (data / "log").write_text("12345")
    (shm / "elsewhere").write_text("x")
    images = shm / "img"
    images.mkdir()
    _files_img(images, [(str(data / "log"), 5, 0o100644), ("/dev/null", 0, 0o20666)])
    check_open_files(images, [str(data)])  # all there, sizes as dumped
    _files_img(images, [(str(data / "log"), 9, 0o100644), (str(data / "gone"), None, 0o100644),
                        (str(shm / "elsewhere"), 2, 0o100644), (str(data / "log"), None,
                                                                 0o100644)])
    with pytest.raises(RestoreError) as exc:
        check_open_files(images, [str(data)])
    msg = str(exc.value)
    assert f"{data}/log (5 bytes here, 9 in the dump; carried)" in msg
    assert f"{data}/gone (missing here; carried)" in msg
    assert f"{shm}/elsewhere (1 bytes here, 2 in the dump; not carried" in msg


def test_carried_directories_go_only_where_the_policy_allows(shm: pathlib.Path) -> None:
    from ctlive.backends import RestorePolicy
    from ctlive.backends.carry import carried_paths
    from ctlive.errors import RestoreSpecError

    state = shm / "state"
    policy = RestorePolicy(allowed_carry_prefixes=(str(shm), "/var/lib"))
    assert carried_paths([f"{shm}/a", f"{shm}/b"], policy, state) == [f"{shm}/a", f"{shm}/b"]
    for paths, field, why in [
            (["/etc/cron.d"], "carry[0]", "allowed_carry_prefixes"),
            ([f"{shm}/../etc"], "carry[0]", "climbs out"),
            (["relative"], "carry[0]", "not an absolute path"),
            ([str(shm)], "carry[0]", "outside the places"),     # the prefix itself
            ([f"{state}/x"], "carry[0]", "state directory"),
            ([f"{shm}/a", f"{shm}/a/b"], "carry[1]", "overlaps another"),
            (["/var/lib/ctlive-x"], "carry[0]", "not on a memory filesystem"),
    ]:
        with pytest.raises(RestoreSpecError, match=why) as exc:
            carried_paths(paths, policy, state)
        assert exc.value.field == field
    # The default allows /tmp and /dev/shm, which are where user data lives in a guest.
    assert carried_paths(["/dev/shm/x"], RestorePolicy(), state) == ["/dev/shm/x"]


def test_names_that_are_not_utf8_round_trip(shm: pathlib.Path) -> None:
    src = shm / "src"
    src.mkdir()
    odd = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, not UTF-8
    (src / odd).write_text("x")
    (src / "ln").symlink_to(odd)
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"data": str(src)}), rx)
    rx.materialize("data", shm / "dst")
    assert sorted(os.listdir(os.fsencode(shm / "dst"))) == [b"caf\xe9", b"ln"]
    bad = [ROOT, {**ROOT, "p": "\ud800"}]  # a lone surrogate names no file
    with pytest.raises(DeltaFormatError, match="not a file name"):
        rx.apply(manifest_item("data", bad))


def test_a_large_changed_file_goes_through_a_spill_file(shm: pathlib.Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from ctlive.images.tree import Blob

    monkeypatch.setattr(Blob, "SPILL", 1 * MiB)
    spills = []
    real = tempfile.TemporaryFile

    def counted(*a: object, **kw: object) -> object:
        spills.append(kw.get("dir"))
        return real(*a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(tempfile, "TemporaryFile", counted)
    src = shm / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(9 * MiB + 123))
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"data": str(src)}), rx)
    rx.materialize("data", shm / "dst")
    assert (shm / "dst" / "big").read_bytes() == (src / "big").read_bytes()
    assert spills == ["/var/tmp"]  # on disk, not in the source's memory


def _part(digest: str, size: int, offset: int, data: bytes) -> ChangeItem:
    z = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    return decode_change(encode_change(
        ChangeItem(ChangeKind.TREE_BLOB, digest, size=size, offset=offset, data=z)))


def test_overlapping_or_missing_blob_parts_are_refused(shm: pathlib.Path) -> None:
    rx = TreeReceiver(shm / "work")
    rx.apply(_part("ab" * 32, 8, 0, b"abcd"))
    with pytest.raises(DeltaFormatError, match="overlaps"):
        rx.apply(_part("ab" * 32, 8, 2, b"cdef"))
    with pytest.raises(DeltaFormatError, match="sizes"):
        rx.apply(_part("ab" * 32, 9, 4, b"efgh"))
    # The iteration ends with the blob half received.
    with pytest.raises(DeltaFormatError, match="incomplete"):
        rx.end_iteration()


def test_a_blob_in_too_many_parts_is_refused(shm: pathlib.Path) -> None:
    """One-byte parts of a large blob would make the receiver's part list grow without
    bound: past MAX_PART_RANGES parts it refuses."""
    from ctlive.images.files import MAX_PART_RANGES

    rx = TreeReceiver(shm / "work")
    for i in range(MAX_PART_RANGES):
        rx.apply(_part("ab" * 32, 1 << 20, 2 * i, b"x"))
    with pytest.raises(DeltaFormatError, match="parts"):
        rx.apply(_part("ab" * 32, 1 << 20, 2 * MAX_PART_RANGES, b"x"))


def test_every_iteration_carries_the_same_trees(shm: pathlib.Path) -> None:
    (shm / "a").mkdir()
    (shm / "b").mkdir()
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"one": str(shm / "a")}), rx)
    with pytest.raises(DeltaFormatError, match="in the first"):
        send(TreeSender({"one": str(shm / "a"), "two": str(shm / "b")}), rx)


def test_a_blob_becomes_one_file_at_most(shm: pathlib.Path) -> None:
    """On the blobs' filesystem a file without holes is its blob, linked into place (no
    copy); the same content in another file or another tree is a copy of its own, so
    each keeps its own mode."""
    a, b = shm / "a", shm / "b"
    a.mkdir()
    b.mkdir()
    for d, mode in ((a, 0o600), (b, 0o644)):
        (d / "same").write_bytes(b"z" * 10000)
        (d / "same").chmod(mode)
        (d / "twin").write_bytes(b"z" * 10000)
    rx = TreeReceiver(shm / "work")
    send(TreeSender({"a": str(a), "b": str(b)}), rx)
    (blob,) = [p for p in (shm / "work" / "trees").iterdir()]
    rx.materialize("a", shm / "ra")
    rx.materialize("b", shm / "rb")
    inodes = {(shm / r / n).stat().st_ino for r in ("ra", "rb") for n in ("same", "twin")}
    assert blob.stat().st_ino in inodes and len(inodes) == 4
    assert stat.S_IMODE((shm / "ra" / "same").stat().st_mode) == 0o600
    assert stat.S_IMODE((shm / "rb" / "same").stat().st_mode) == 0o644


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.text(max_size=12), st.lists(st.integers(-5, 1 << 41), max_size=3),
                    st.lists(st.lists(st.integers(-5, 1 << 20), max_size=3), max_size=3))
_ENTRY = st.one_of(
    st.dictionaries(st.sampled_from(["p", "k", "m", "u", "g", "t", "s", "h", "e", "l", "x",
                                     "zz"]), _VALUES, max_size=8),
    # Nearly valid entries, so that the deeper checks run too.
    st.fixed_dictionaries(
        {"p": st.sampled_from(["a", "b", "a/b", "a/b/c", "b/x", "../x", "/e", ".", "a//b"]),
         "k": st.sampled_from(["dir", "file", "symlink", "hardlink", "fifo"])},
        optional={"m": st.integers(-1, 0o10000), "u": st.integers(-1, 1 << 33),
                  "g": st.just(0), "t": st.integers(-(1 << 64), 1 << 64),
                  "s": st.integers(-1, 1 << 41),
                  "h": st.sampled_from([EMPTY_DIGEST, "0" * 64, "0" * 63, 7]),
                  "e": st.lists(st.lists(st.integers(-1, 1 << 31), min_size=2, max_size=2),
                                max_size=4),
                  "l": st.sampled_from(["a", "a/b", "/etc", "", "b/x"]),
                  "x": st.lists(st.lists(st.sampled_from(["user.a", "bad", "00", "zz"]),
                                         min_size=2, max_size=2), max_size=2)}))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENTRY, max_size=6), st.booleans())
def test_any_manifest_is_taken_or_refused_cleanly(entries: list[dict[str, object]],
                                                  with_root: bool) -> None:
    from ctlive.images.tree import decode_manifest

    doc = [ROOT, *entries] if with_root else entries
    raw = zstandard.compress(json.dumps({"v": 1, "label": "t", "entries": doc}).encode())
    try:
        out = decode_manifest("t", raw)
    except DeltaFormatError:
        return
    assert out[0].path == "." and len({e.path for e in out}) == len(out)
