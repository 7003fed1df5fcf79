"""Change items and their codec: named fields over the unchanged wire format."""

from __future__ import annotations

import struct

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ctlive import errors
from ctlive.images import changes
from ctlive.images.changes import ChangeItem, ChangeKind

_HDR = struct.Struct("<BHQQI")


def test_kinds_keep_their_wire_values() -> None:
    assert [(k.name, int(k)) for k in ChangeKind] == [
        ("FILE_WHOLE", 1), ("FILE_ZDELTA", 2), ("FILE_SAME", 3), ("PAGES", 4), ("MANIFEST", 5),
        ("FILE_PART", 6), ("TREE_BLOB", 7), ("TREE_MANIFEST", 8)]


@pytest.mark.parametrize(("item", "a", "b"), [
    (ChangeItem(ChangeKind.FILE_WHOLE, "core-1.img", size=70, data=b"zz"), 70, 0),
    (ChangeItem(ChangeKind.FILE_ZDELTA, "mm-1.img", size=9, data=b"d"), 9, 0),
    (ChangeItem(ChangeKind.FILE_SAME, "fs-1.img"), 0, 0),
    (ChangeItem(ChangeKind.PAGES, "pages-1.img", first_page=4096, page_count=17, data=b"p"),
     4096, 17),
    (ChangeItem(ChangeKind.MANIFEST, "", data=b"{}"), 0, 0),
    (ChangeItem(ChangeKind.FILE_PART, "tmpfs-dev-1.tar.gz.img", size=9 << 20, offset=8 << 20,
                data=zstandard.ZstdCompressor().compress(b"part")), 9 << 20, 8 << 20),
])
def test_encoding_is_the_wire_format(item: ChangeItem, a: int, b: int) -> None:
    """Size or first page in the first u64, page count (a part's offset) in the
    second: the bytes the receiver has always parsed."""
    name = item.name.encode()
    want = _HDR.pack(item.kind, len(name), a, b, len(item.data)) + name + item.data
    assert changes.encode_change(item) == want
    assert changes.decode_change(want) == item


_items = st.one_of(
    st.builds(ChangeItem, st.sampled_from([ChangeKind.FILE_WHOLE, ChangeKind.FILE_ZDELTA]),
              st.just("core-1.img"), size=st.integers(0, 2**64 - 1), data=st.binary(max_size=8)),
    st.builds(ChangeItem, st.just(ChangeKind.FILE_SAME), st.just("fs-1.img")),
    st.builds(ChangeItem, st.just(ChangeKind.PAGES), st.just("pages-3.img"),
              first_page=st.integers(0, 2**64 - 1), page_count=st.integers(0, 2**64 - 1),
              data=st.binary(max_size=8)),
    st.builds(ChangeItem, st.just(ChangeKind.MANIFEST), st.just(""), data=st.binary(max_size=8)),
)


@given(_items)
def test_roundtrip(item: ChangeItem) -> None:
    assert changes.decode_change(changes.encode_change(item)) == item


@pytest.mark.parametrize(("kind", "a", "b"), [
    (ChangeKind.FILE_WHOLE, 1, 1), (ChangeKind.FILE_ZDELTA, 0, 2), (ChangeKind.FILE_SAME, 1, 0),
    (ChangeKind.MANIFEST, 0, 1)])
def test_header_fields_a_kind_does_not_use_are_refused(kind: ChangeKind, a: int, b: int) -> None:
    name = b"" if kind == ChangeKind.MANIFEST else b"core-1.img"
    with pytest.raises(errors.DeltaFormatError, match="does not use"):
        changes.decode_change(_HDR.pack(kind, len(name), a, b, 0) + name)


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_unknown_kind_refused(kind: int) -> None:
    with pytest.raises(errors.DeltaFormatError, match="unknown change kind"):
        changes.decode_change(_HDR.pack(kind, 0, 0, 0, 0))


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a/b", "", ".."])
def test_unsafe_names_refused(name: str) -> None:
    item = changes.encode_change(ChangeItem(ChangeKind.FILE_WHOLE, name))
    with pytest.raises(errors.DeltaFormatError):
        changes.decode_change(item)


@given(st.binary(max_size=300))
def test_decode_change_fuzz(data: bytes) -> None:
    try:
        changes.decode_change(data)
    except errors.DeltaFormatError:
        pass
