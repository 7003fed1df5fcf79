"""One pre-copy iteration on the source: diff the new dump against the previous one and
send its change items over the session's lanes."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import anyio
import anyio.abc

from ctlive.images.changes import Change as ImageChange
from ctlive.images.changes import encode_change
from ctlive.images.diff import DiffStats, diff
from ctlive.protocol.frames import (
    IterationBegin,
    IterationEnd,
)
from ctlive.transport.session import MAX_CHANGE, Session

__all__ = [
    "FRAG_LAST",
    "FRAG_MORE",
    "FRAG_WHOLE",
    "fragments",
    "next_item",
    "send_iteration",
]

# First byte of every CHANGE payload: items larger than one frame travel as
# fragments, all on one lane, in order.
FRAG_WHOLE, FRAG_MORE, FRAG_LAST = 0, 1, 2


def fragments(item: bytes) -> Iterator[bytes]:
    room = MAX_CHANGE - 1
    if len(item) <= room:
        yield bytes([FRAG_WHOLE]) + item
        return
    for off in range(0, len(item), room):
        last = off + room >= len(item)
        yield bytes([FRAG_LAST if last else FRAG_MORE]) + item[off : off + room]


async def next_item(gen: Iterator[ImageChange]) -> ImageChange | None:
    return await anyio.to_thread.run_sync(next, gen, None)


async def send_iteration(s: Session, k: int, final: bool, prev: pathlib.Path | None,
                         d: pathlib.Path, lane_rr: int = 0) -> tuple[DiffStats, int]:
    """Send iteration ``k``: the change items that turn dump ``prev`` into ``d``, spread
    over the session's lanes round-robin from ``lane_rr``. Returns the diff statistics
    and the next lane counter. (Also the data-plane benchmark's source side.)"""
    await s.send(IterationBegin(k, final))
    st = DiffStats()
    # The final dump is diffed while the workload is frozen: use every core.
    gen = diff(prev, d, stats=st, threads=min(os.cpu_count() or 1, 4) if final else 1)
    while (item := await next_item(gen)) is not None:
        blob = encode_change(item)
        lane = lane_rr % s.lane_count
        lane_rr += 1
        for frag in fragments(blob):
            await s.send_change(k, frag, lane=lane)
    await s.send(IterationEnd(k, final, s.lane_counts(k), {
        "pages": st.pages_total, "changed": st.pages_changed}))
    return st, lane_rr
