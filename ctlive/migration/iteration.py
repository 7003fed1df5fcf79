"""One pre-copy iteration on the source: diff the new dump against the previous one and
send its change items over the session's lanes."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import anyio
import anyio.abc

from ctlive.backends.workload import Backend
from ctlive.images.changes import ChangeItem as ImageChange
from ctlive.images.changes import encode_change
from ctlive.images.diff import DiffStats, diff
from ctlive.images.tree import TreeSender
from ctlive.protocol.frames import (
    IterationBegin,
    IterationEnd,
    fragment,
)
from ctlive.transport.session import Session

__all__ = ["send_iteration", "tree_sender"]


async def _next_item(gen: Iterator[ImageChange]) -> ImageChange | None:
    return await anyio.to_thread.run_sync(next, gen, None)


def tree_sender(workload: object) -> TreeSender:
    """The sender of ``workload``'s carried trees (none for a workload that is not one
    of ctlive's backends)."""
    return TreeSender(workload.carried_trees if isinstance(workload, Backend) else {})


async def send_iteration(s: Session, k: int, final: bool, prev: pathlib.Path | None,
                         d: pathlib.Path, lane_rr: int = 0,
                         trees: TreeSender | None = None) -> tuple[DiffStats, int]:
    """Send iteration ``k``: the change items that turn dump ``prev`` into ``d``, then
    those of the carried ``trees`` (scanned now: for the final iteration, while the
    workload is frozen), spread over the session's lanes round-robin from ``lane_rr``.
    Returns the diff statistics and the next lane counter (``trees.bytes_sent`` says
    what the files took). (Also the data-plane benchmark's source side.)"""
    await s.send(IterationBegin(k, final))
    st = DiffStats()
    # The final dump is diffed while the workload is frozen: use every core.
    gen = diff(prev, d, stats=st, threads=min(os.cpu_count() or 1, 4) if final else 1)
    for items in (gen, trees.items() if trees is not None else iter(())):
        while (item := await _next_item(items)) is not None:
            blob = encode_change(item)
            lane = lane_rr % s.lane_count
            lane_rr += 1
            for frag in fragment(blob):
                await s.send_change(k, frag, lane=lane)
    await s.send(IterationEnd(k, final, s.lane_counts(k), {
        "pages": st.pages_total, "changed": st.pages_changed}))
    return st, lane_rr
