"""Decoder fuzzing: random and mutated streams only ever raise DeltaFormatError,
and agree with the reference decoder on what they accept."""

from __future__ import annotations

import random

import pagediff_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlive.errors import DeltaFormatError
from ctlive.images import pagediff

PAGE = pagediff.PAGE_SIZE
NPAGES = 4


def _valid_stream(seed: int) -> tuple[bytes, bytes]:
    rnd = random.Random(seed)
    old = bytearray(rnd.randbytes(PAGE * NPAGES))
    new = bytearray(old)
    for _ in range(rnd.randint(1, 40)):
        new[rnd.randrange(len(new))] = rnd.randrange(256)
    new[PAGE * 2 : PAGE * 3] = bytes(PAGE) if rnd.random() < 0.5 else new[PAGE * 2 : PAGE * 3]
    if rnd.random() < 0.3:
        new[PAGE * 3 : PAGE * 4] = rnd.randbytes(PAGE)
    return bytes(old), pagediff.encode(old, new).data


def _check(old: bytes, stream: bytes) -> None:
    native = bytearray(old)
    reference = bytearray(old)
    native_ok = ref_ok = True
    try:
        pagediff.decode(native, stream)
    except DeltaFormatError:
        native_ok = False
    try:
        ref.decode(reference, stream)
    except ref.Corrupt:
        ref_ok = False
    assert native_ok == ref_ok
    assert native == reference  # same records applied before any error


@given(st.binary(max_size=600))
def test_random_streams(stream: bytes) -> None:
    _check(bytes(PAGE * NPAGES), stream)


@settings(max_examples=300)
@given(
    st.integers(0, 2**32),
    st.lists(
        st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]),
                  st.integers(0, 2**31), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_streams(seed: int, mutations: list[tuple[str, int, int]]) -> None:
    old, stream = _valid_stream(seed)
    s = bytearray(stream)
    for op, pos, val in mutations:
        if not s:
            break
        p = pos % len(s)
        if op == "flip":
            s[p] ^= 1 << (val % 8)
        elif op == "truncate":
            del s[p:]
        elif op == "insert":
            s[p:p] = bytes([val])
        elif op == "delete":
            del s[p]
        else:
            s[p:p] = stream[: val % 16]
    _check(old, bytes(s))
