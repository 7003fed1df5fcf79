"""Page-diff core benchmark: every row measured side by side in one run.

    python -m benchmarks.pagediff [--pages N] [--dir CRIU_IMAGES_DIR] [--quick]

For each corpus it prints:
- change detection GB/s, and its ratio to a memcpy of the same bytes;
- delta encode and decode GB/s, and their ratio to zstd-1 compression of the same bytes;
- the size of encode+zstd, against zstd of the XOR of exactly the changed pages (the floor).
Targets: detection >= 1.0x memcpy, encode >= 2x zstd-1, size <= 1.1x floor.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import pathlib
import random
import time
from collections.abc import Callable

import zstandard

from ctlive.images import pagediff

PAGE = pagediff.PAGE_SIZE


def _best(fn: Callable[[], object], min_time: float) -> float:
    """Best wall time of repeated calls over at least min_time seconds."""
    best = float("inf")
    spent = 0.0
    runs = 0
    while spent < min_time or runs < 3:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = min(best, dt)
        spent += dt
        runs += 1
    return best


def _text_page(rnd: random.Random) -> bytes:
    words = [b"GET /index.html ", b"user=", b"session ", b"200 OK\n", b"{\"id\": ", b"0000"]
    out = bytearray()
    while len(out) < PAGE:
        out += rnd.choice(words) + str(rnd.randrange(10**6)).encode()
    return bytes(out[:PAGE])


def base_corpus(npages: int, seed: int = 1) -> bytes:
    """A third random pages, a third zero pages, a third text-like pages (shuffled)."""
    rnd = random.Random(seed)
    kinds = [i % 3 for i in range(npages)]
    rnd.shuffle(kinds)
    parts = []
    for k in kinds:
        if k == 0:
            parts.append(rnd.randbytes(PAGE))
        elif k == 1:
            parts.append(bytes(PAGE))
        else:
            parts.append(_text_page(rnd))
    return b"".join(parts)


def dirty(base: bytes, fraction: float, max_bytes: int, seed: int = 2) -> bytes:
    """A copy of base where `fraction` of the non-zero pages get 1..max_bytes bytes changed."""
    rnd = random.Random(seed)
    out = bytearray(base)
    n = len(base) // PAGE
    for p in rnd.sample(range(n), int(n * fraction)):
        for _ in range(rnd.randint(1, max_bytes)):
            out[p * PAGE + rnd.randrange(PAGE)] = rnd.randrange(256)
    return bytes(out)


def xor_floor(old: bytes, new: bytes) -> int:
    """zstd-1 size of the XOR of exactly the changed pages."""
    idx = pagediff.changed_pages(old, new)
    a = int.from_bytes(b"".join(old[i * PAGE : (i + 1) * PAGE] for i in idx) or b"\0", "little")
    b = int.from_bytes(b"".join(new[i * PAGE : (i + 1) * PAGE] for i in idx) or b"\0", "little")
    x = (a ^ b).to_bytes(max(len(idx) * PAGE, 1), "little")
    return len(zstandard.ZstdCompressor(level=1).compress(x))


def row(name: str, old: bytes, new: bytes, min_time: float) -> dict[str, float | str]:
    n = len(new)
    dst = ctypes.create_string_buffer(n)
    t_memcpy = _best(lambda: ctypes.memmove(dst, new, n), min_time)
    t_detect = _best(lambda: pagediff.changed_pages(old, new), min_time)
    zc = zstandard.ZstdCompressor(level=1)
    t_zstd = _best(lambda: zc.compress(new), min_time)
    enc = pagediff.encode(old, new)
    t_enc = _best(lambda: pagediff.encode(old, new), min_time)
    scratch = bytearray(old)
    # Applying a stream is idempotent (literals carry the new bytes), so repeated
    # decodes into the same scratch copy measure the decoder alone.
    t_dec = _best(lambda: pagediff.decode(scratch, enc.data), min_time)
    assert scratch == new
    size = len(zc.compress(enc.data))
    floor = xor_floor(old, new)
    gbs = lambda t: n / t / 1e9  # noqa: E731
    return {
        "corpus": name,
        "MiB": n / 2**20,
        "changed": len(pagediff.changed_pages(old, new)) / (n // PAGE),
        "detect": gbs(t_detect),
        "detect/memcpy": t_memcpy / t_detect,
        "encode": gbs(t_enc),
        "encode/zstd1": t_zstd / t_enc,
        "decode": gbs(t_dec),
        "decode/zstd1": t_zstd / t_dec,
        "wire": size,
        "floor": floor,
        "wire/floor": size / floor if floor else float("nan"),
    }


def real_pairs(directory: pathlib.Path) -> list[tuple[str, bytes, bytes]]:
    """Pairs of same-named pages-*.img files from successive dump dirs under `directory`."""
    dumps = sorted(p for p in directory.iterdir() if p.is_dir())
    pairs = []
    for a, b in itertools.pairwise(dumps):
        for f in sorted(b.glob("pages-*.img")):
            old_f = a / f.name
            if old_f.exists():
                old, new = old_f.read_bytes(), f.read_bytes()
                m = min(len(old), len(new)) // PAGE * PAGE
                if m:
                    pairs.append((f"{b.name}/{f.name}", old[:m], new[:m]))
    return pairs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=16384, help="pages per corpus (default 64 MiB)")
    ap.add_argument("--dir", type=pathlib.Path, help="directory of successive CRIU dump dirs")
    ap.add_argument("--quick", action="store_true", help="tiny corpus, for CI")
    args = ap.parse_args(argv)
    npages = 512 if args.quick else args.pages
    min_time = 0.02 if args.quick else 0.3
    base = base_corpus(npages)
    rows = []
    for frac in (0.01, 0.10, 0.50):
        for nbytes in (1, 16, 64):
            rows.append(row(f"dirty {frac:.0%} x{nbytes}B", base, dirty(base, frac, nbytes),
                            min_time))
    rows.append(row("all random", base, base_corpus(npages, seed=9), min_time))
    if args.dir:
        for name, old, new in real_pairs(args.dir):
            rows.append(row(name, old, new, min_time))
    cols = ["corpus", "MiB", "changed", "detect", "detect/memcpy", "encode", "encode/zstd1",
            "decode", "decode/zstd1", "wire", "floor", "wire/floor"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, str):
                cells.append(v)
            elif c in ("wire", "floor"):
                cells.append(f"{int(v)}")
            elif c == "changed":
                cells.append(f"{v:.1%}")
            else:
                cells.append(f"{v:.2f}")
        print("| " + " | ".join(cells) + " |")
    print("\nGB/s columns: detect, encode, decode. Ratios > 1 mean faster than the reference.")
    worst = {
        "detect/memcpy (target >= 1.0)": min(float(r["detect/memcpy"]) for r in rows),
        "encode/zstd1 (target >= 2.0)": min(float(r["encode/zstd1"]) for r in rows),
        "wire/floor (target <= 1.1)": max(
            float(r["wire/floor"]) for r in rows if r["corpus"] != "all random"),
    }
    for k, v in worst.items():
        print(f"worst {k}: {v:.2f}")


if __name__ == "__main__":
    main()
