"""``ctlive image diff`` and ``ctlive image patch``: checkpoints as deltas, offline."""

from __future__ import annotations

import argparse
import pathlib
import struct
import time

from ctlive.errors import DeltaFormatError
from ctlive.images.changes import decode_change, encode_change
from ctlive.images.diff import DiffStats, diff
from ctlive.images.rebuild import Rebuilder

__all__ = ["DELTA_MAGIC", "register"]

DELTA_MAGIC = b"CTLDELT1"
_MAX_ITEM = 256 << 20


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``image`` command group."""
    p = sub.add_parser("image", help="diff and patch CRIU image directories")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")
    d = isub.add_parser("diff", help="write the delta that turns OLD into NEW")
    d.add_argument("old", help="old image directory, or '-' for none (a full image)")
    d.add_argument("new", type=pathlib.Path)
    d.add_argument("-o", "--output", type=pathlib.Path, required=True)
    d.set_defaults(func=_diff)
    a = isub.add_parser("patch", help="rebuild NEW from OLD and a delta")
    a.add_argument("old", help="old image directory, or '-' for none")
    a.add_argument("delta", type=pathlib.Path)
    a.add_argument("-o", "--output", type=pathlib.Path, required=True)
    a.set_defaults(func=_patch)


def _old(arg: str) -> pathlib.Path | None:
    return None if arg in ("-", "none") else pathlib.Path(arg)


def _size(d: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def _diff(args: argparse.Namespace) -> int:
    st = DiffStats()
    t = time.perf_counter()
    with open(args.output, "wb") as f:
        f.write(DELTA_MAGIC)
        for c in diff(_old(args.old), args.new, stats=st):
            item = encode_change(c)
            f.write(struct.pack("<I", len(item)) + item)
    dt = time.perf_counter() - t
    out = args.output.stat().st_size
    full = _size(args.new)
    print(f"{args.new}: {full:,} bytes; delta {out:,} bytes ({out / max(full, 1):.2%}) "
          f"in {dt:.2f} s")
    print(f"pages {st.pages_total:,}: changed {st.pages_changed:,} (zero {st.pages_zero:,}, "
          f"delta {st.pages_delta:,}, raw {st.pages_raw:,}); files {st.files} "
          f"({st.files_unchanged} unchanged)")
    return 0


def _patch(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    rb = Rebuilder(_old(args.old), args.output)
    try:
        with open(args.delta, "rb") as f:
            if f.read(len(DELTA_MAGIC)) != DELTA_MAGIC:
                raise DeltaFormatError(f"{args.delta} is not a ctlive image delta")
            while hdr := f.read(4):
                if len(hdr) != 4:
                    raise DeltaFormatError(f"{args.delta}: truncated item length")
                (n,) = struct.unpack("<I", hdr)
                if n > _MAX_ITEM:
                    raise DeltaFormatError(f"{args.delta}: item of {n} bytes is too large")
                item = f.read(n)
                if len(item) != n:
                    raise DeltaFormatError(f"{args.delta}: truncated item")
                rb.apply(decode_change(item))
        rb.finish()
    finally:
        rb.close()
    dt = time.perf_counter() - t
    print(f"{args.output}: {_size(args.output):,} bytes rebuilt and verified in {dt:.2f} s")
    return 0
