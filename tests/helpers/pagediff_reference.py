"""Pure-Python reference of every native page-diff kernel, for differential tests.

Written from the same specifications as native/pagediff.c (XXH64 from the
xxHash spec; the record stream from docs/pagediff.md), deliberately simple and
slow, sharing no code with the C.
"""

from __future__ import annotations

PAGE = 4096
M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)
MIN_ZERO_GAP = 3


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & M64
    return (_rotl(acc, 31) * P1) & M64


def xxh64(data: bytes, seed: int = 0) -> int:
    n, i = len(data), 0
    le = int.from_bytes
    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], le(data[i + 8 * k : i + 8 * k + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for k in range(4):
            h = (((h ^ _round(0, v[k])) * P1) + P4) & M64
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        h ^= _round(0, le(data[i : i + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h ^= (le(data[i : i + 4], "little") * P1) & M64
        h = (_rotl(h, 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h ^= (data[i] * P5) & M64
        h = (_rotl(h, 11) * P1) & M64
        i += 1
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    h ^= h >> 32
    return h


def pages_of(buf: bytes) -> list[bytes]:
    return [bytes(buf[i : i + PAGE]) for i in range(0, len(buf), PAGE)]


def page_hashes(buf: bytes) -> list[int]:
    return [xxh64(p) for p in pages_of(buf)]


def zero_pages(buf: bytes) -> list[int]:
    return [i for i, p in enumerate(pages_of(buf)) if not any(p)]


def changed_pages(old: bytes, new: bytes) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(pages_of(old), pages_of(new), strict=True)) if a != b]


def uleb(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def delta_page(old: bytes, new: bytes) -> bytes | None:
    """(zero run, literal run, literal bytes)* or None when it would not beat raw.

    Equal gaps shorter than MIN_ZERO_GAP inside changed data join the literal.
    The encoder gives up once a pair would bring the payload to 4094 bytes
    (4 bytes of run lengths reserved per pair), as the C does.
    """
    diff = [a != b for a, b in zip(old, new, strict=True)]
    out = bytearray()
    pos = 0
    while pos < PAGE:
        start = pos
        while start < PAGE and not diff[start]:
            start += 1
        if start == PAGE:
            break
        end = start
        while True:
            while end < PAGE and diff[end]:
                end += 1
            if end == PAGE:
                break
            gap = end
            while gap < PAGE and not diff[gap]:
                gap += 1
            if gap == PAGE or gap - end >= MIN_ZERO_GAP:
                break
            end = gap
        if len(out) + 4 + (end - start) >= PAGE - 2:
            return None
        out += uleb(start - pos) + uleb(end - start) + new[start:end]
        pos = end
    return bytes(out)


def encode(old: bytes, new: bytes, indices: list[int] | None = None) -> bytes:
    po, pn = pages_of(old), pages_of(new)
    idx = range(len(pn)) if indices is None else sorted(set(indices))
    out = bytearray()
    nxt = 0
    for i in idx:
        if po[i] == pn[i]:
            continue
        out += uleb(i - nxt)
        nxt = i + 1
        if not any(pn[i]):
            out += uleb(0)
            continue
        d = delta_page(po[i], pn[i])
        if d is None:
            out += uleb(4096) + pn[i]
        else:
            out += uleb(len(d)) + d
    return bytes(out)


class Corrupt(Exception):
    pass


def _read_uleb(s: bytes, i: int) -> tuple[int, int]:
    v = 0
    for k in range(5):
        if i + k >= len(s):
            raise Corrupt("truncated")
        b = s[i + k]
        v |= (b & 0x7F) << (7 * k)
        if not b & 0x80:
            if k and b == 0:
                raise Corrupt("overlong")
            if v >= 1 << 32:
                raise Corrupt("overflow")
            return v, i + k + 1
    raise Corrupt("overlong")


def decode(pages: bytearray, stream: bytes) -> None:
    """Applies a stream; raises Corrupt. Same per-record atomicity as the C."""
    n = len(pages) // PAGE
    i = 0
    nxt = 0
    while i < len(stream):
        gap, i = _read_uleb(stream, i)
        kind, i = _read_uleb(stream, i)
        if 4093 < kind != 4096:
            raise Corrupt("kind")
        idx = nxt + gap
        if idx >= n:
            raise Corrupt("index")
        base = idx * PAGE
        if kind == 0:
            pages[base : base + PAGE] = bytes(PAGE)
        elif kind == 4096:
            if len(stream) - i < PAGE:
                raise Corrupt("truncated")
            pages[base : base + PAGE] = stream[i : i + PAGE]
            i += PAGE
        else:
            ln = kind
            if ln > len(stream) - i:
                raise Corrupt("truncated")
            payload, i = stream[i : i + ln], i + ln
            page = bytearray(pages[base : base + PAGE])
            r, pos, first = 0, 0, True
            while r < ln:
                z, r = _read_uleb(payload, r)
                if z == 0 and not first:
                    raise Corrupt("empty run")
                if z > PAGE - pos:
                    raise Corrupt("run")
                pos += z
                lit, r = _read_uleb(payload, r)
                if lit == 0:
                    raise Corrupt("empty run")
                if lit > PAGE - pos:
                    raise Corrupt("run")
                if lit > ln - r:
                    raise Corrupt("truncated")
                page[pos : pos + lit] = payload[r : r + lit]
                r += lit
                pos += lit
                first = False
            pages[base : base + PAGE] = page
        nxt = idx + 1
