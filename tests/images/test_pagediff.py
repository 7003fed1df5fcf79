"""Differential tests: native page-diff kernels against the pure-Python reference."""

from __future__ import annotations

import os
import random

import pagediff_reference as ref
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctlive.errors import DeltaFormatError, PageBufferError
from ctlive.images import pagediff

PAGE = pagediff.PAGE_SIZE


def _page(kind: str, rnd: random.Random) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "random":
        return rnd.randbytes(PAGE)
    # text-like: mostly printable with repeats, and some zero padding
    words = [b"alpha ", b"beta ", b"gamma\n", b"{\"k\": 12}", b"\x00\x00\x00\x00"]
    out = bytearray()
    while len(out) < PAGE:
        out += rnd.choice(words)
    return bytes(out[:PAGE])


def _mutate(page: bytes, rnd: random.Random, mode: str) -> bytes:
    b = bytearray(page)
    if mode == "zero":
        return bytes(PAGE)
    if mode == "all":
        return rnd.randbytes(PAGE)
    if mode == "sparse":
        for _ in range(rnd.randint(1, 64)):
            b[rnd.randrange(PAGE)] = rnd.randrange(256)
    elif mode == "block":
        start = rnd.randrange(PAGE)
        n = rnd.randint(1, 600)
        b[start : start + n] = rnd.randbytes(min(n, PAGE - start))
    return bytes(b)


corpus = st.builds(
    lambda seed, n, kinds, modes, frac: _make(seed, n, kinds, modes, frac),
    st.integers(0, 2**32),
    st.integers(1, 24),
    st.lists(st.sampled_from(["zero", "random", "text"]), min_size=1, max_size=3),
    st.lists(st.sampled_from(["sparse", "block", "all", "zero", "same"]), min_size=1, max_size=4),
    st.floats(0.0, 1.0),
)


def _make(
    seed: int, n: int, kinds: list[str], modes: list[str], frac: float
) -> tuple[bytes, bytes]:
    rnd = random.Random(seed)
    old = [_page(rnd.choice(kinds), rnd) for _ in range(n)]
    new = [
        _mutate(p, rnd, rnd.choice(modes)) if rnd.random() < frac else p for p in old
    ]
    return b"".join(old), b"".join(new)


@given(corpus)
def test_kernels_match_reference(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    assert list(pagediff.page_hashes(new)) == ref.page_hashes(new)
    assert list(pagediff.zero_pages(new)) == ref.zero_pages(new)
    assert list(pagediff.changed_pages(old, new)) == ref.changed_pages(old, new)
    enc = pagediff.encode(old, new)
    assert enc.data == ref.encode(old, new)
    assert enc.consumed == len(new) // PAGE


@given(corpus)
def test_roundtrip_reproduces_new(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    enc = pagediff.encode(old, new)
    pages = bytearray(old)
    stats = pagediff.decode(pages, enc.data)
    assert pages == new
    assert stats.records == enc.pages_zero + enc.pages_delta + enc.pages_raw
    changed = len(ref.changed_pages(old, new))
    assert enc.pages_zero + enc.pages_delta + enc.pages_raw == changed
    assert enc.pages_unchanged == len(new) // PAGE - changed
    ref_pages = bytearray(old)
    ref.decode(ref_pages, enc.data)
    assert ref_pages == new


@given(corpus, st.data())
def test_encode_listed_indices(pair: tuple[bytes, bytes], data: st.DataObject) -> None:
    old, new = pair
    n = len(new) // PAGE
    idx = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    enc = pagediff.encode(old, new, idx)
    assert enc.data == ref.encode(old, new, idx)
    pages = bytearray(old)
    pagediff.decode(pages, enc.data)
    for i in range(n):
        want = new if i in idx else old
        assert pages[i * PAGE : (i + 1) * PAGE] == want[i * PAGE : (i + 1) * PAGE]


def test_xxh64_published_values() -> None:
    # Values from the xxHash reference implementation's test suite / spec.
    assert pagediff.xxh64(b"") == 0xEF46DB3751D8E999
    assert pagediff.xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert pagediff.xxh64(b"abc") == 0x44BC2CF5AD770999
    for n in (0, 1, 3, 4, 7, 8, 31, 32, 33, 100, 4096):
        data = random.Random(n).randbytes(n)
        assert pagediff.xxh64(data, seed=n) == ref.xxh64(data, seed=n)


def test_sparse_delta_is_small() -> None:
    old = os.urandom(PAGE * 4)
    new = bytearray(old)
    for p in range(4):
        new[p * PAGE + 100] ^= 0xFF  # one byte per page
    enc = pagediff.encode(old, bytes(new))
    assert enc.pages_delta == 4
    # Per page: index gap, length, two run lengths, one literal byte.
    assert len(enc.data) <= 4 * 7


def test_dense_change_falls_back_to_raw() -> None:
    old = os.urandom(PAGE)
    new = os.urandom(PAGE)
    enc = pagediff.encode(old, new)
    assert (enc.pages_raw, enc.pages_delta) == (1, 0)


def test_limit_stops_and_resumes() -> None:
    rnd = random.Random(7)
    old = rnd.randbytes(PAGE * 50)
    new = rnd.randbytes(PAGE * 50)  # every page raw: 4099 bytes each
    pages = bytearray(old)
    start = 0
    rounds = 0
    while start < 50:
        idx = list(range(start, 50))
        enc = pagediff.encode(old, new, idx, limit=3 * pagediff.MAX_RECORD)
        assert len(enc.data) <= 3 * pagediff.MAX_RECORD
        assert enc.consumed >= 1
        pagediff.decode(pages, enc.data)
        start += enc.consumed
        rounds += 1
    assert pages == new
    assert rounds >= 50 // 3


def test_buffer_errors() -> None:
    with pytest.raises(PageBufferError):
        pagediff.page_hashes(b"x" * 100)
    with pytest.raises(PageBufferError):
        pagediff.changed_pages(bytes(PAGE), bytes(2 * PAGE))
    with pytest.raises(PageBufferError):
        pagediff.decode(bytes(PAGE), b"")  # not writable
    with pytest.raises(PageBufferError):
        pagediff.encode(bytes(PAGE), bytes(PAGE), [1])
    with pytest.raises(PageBufferError):
        pagediff.encode(bytes(PAGE), bytes(PAGE), [-1])


@pytest.mark.parametrize(
    "stream",
    [
        b"\x00\x81\x20",  # kind 4097: neither delta length nor raw
        b"\x00\xff\x1f",  # kind 4095
        b"\x05\x00",  # index 5 of 2 pages
        b"\x00\x00\x01\x00",  # second record: index 2 of 2 pages
        b"\x00\x80\x20" + bytes(100),  # truncated raw
        b"\x00\x02\x00\x00",  # literal of length 0
        b"\x00\x04\x00\x01",  # delta payload shorter than its length
        b"\x00\x03\x05\x00\x01",  # zero-length literal after a zero run
        b"\x00\x05\x00\x01\xaa\x00\x01",  # zero run of 0 after offset 0
        b"\x00\x03\xff\x1f\x01",  # zero run past page end
        b"\x00\x04\x00\x81\x20\xaa",  # literal past page end
        b"\x80\x80\x80\x80\x80\x01",  # overlong ULEB
        b"\x80\x00\x00",  # non-minimal ULEB
        b"\x00",  # truncated header
    ],
)
def test_decoder_rejects(stream: bytes) -> None:
    pages = bytearray(2 * PAGE)
    with pytest.raises(DeltaFormatError) as info:
        pagediff.decode(pages, stream)
    assert info.value.offset is not None
    with pytest.raises(ref.Corrupt):
        ref.decode(bytearray(2 * PAGE), stream)


def test_failed_record_leaves_its_page_untouched() -> None:
    old = bytes(PAGE * 2)
    good = pagediff.encode(old, b"\x01" * PAGE + bytes(PAGE)).data
    bad = b"\x00\x05\x00\x01\xaa\x00\x01"  # page 1: empty zero run after offset 0
    pages = bytearray(old)
    with pytest.raises(DeltaFormatError) as info:
        pagediff.decode(pages, good + bad)
    assert info.value.offset == len(good)
    assert pages[:PAGE] == b"\x01" * PAGE  # earlier record applied
    assert pages[PAGE:] == bytes(PAGE)  # failing page unchanged


def test_zstd_bounds() -> None:
    data = bytes(1 << 20)
    frame = pagediff.compress(data)
    assert pagediff.decompress(frame, 1 << 20) == data
    with pytest.raises(DeltaFormatError):
        pagediff.decompress(frame, (1 << 20) - 1)  # bomb guard
    with pytest.raises(DeltaFormatError):
        pagediff.decompress(b"not zstd at all", 100)
    c, d = pagediff.StreamCompressor(), pagediff.StreamDecompressor(1 << 20)
    for chunk in (b"a" * 1000, os.urandom(5000), bytes(70000)):
        assert d.chunk(c.chunk(chunk)) == chunk
