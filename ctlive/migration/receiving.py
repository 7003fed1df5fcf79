"""The destination's data path for one migration: rebuild each iteration's image from its
CHANGE frames (fragments joined, items applied in worker threads, credit returned as
they are applied) until the final image is verified against its manifest."""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from collections.abc import Callable

import anyio
import attrs

from ctlive.errors import RemoteProtocolError
from ctlive.images.changes import ChangeKind, decode_change
from ctlive.images.rebuild import Rebuilder
from ctlive.images.tree_apply import TreeReceiver
from ctlive.protocol.frames import Abort, Change, Error, IterationBegin, IterationEnd, Reassembler
from ctlive.transport.session import Session

__all__ = ["MigrationRecord", "receive_iterations"]


@attrs.define
class MigrationRecord:
    """What the receiver knows about one migration while it runs (``Destination.
    migrations``; the durable state is the journal's)."""

    migration_id: str
    state: str = "receiving"
    iterations: int = 0
    bytes_received: int = 0
    started: float = attrs.field(factory=time.monotonic)
    restored_pid: int | None = None
    error: str | None = None
    image_bytes: int = 0
    """Size of the image being rebuilt (its files' apparent sizes), checked against the
    receiver's limits after every item."""
    timings: dict[str, float] = attrs.field(factory=dict)
    """Seconds spent in the final phase: ``verify`` (completing and checking the last
    image once its last item arrived), ``restore``, ``post_restore``, ``resume``,
    ``post_resume``."""
    trees: TreeReceiver | None = attrs.field(default=None, repr=False)
    """The carried trees received so far (their blobs and last manifests), which the
    restore materializes."""


_TREE_KINDS = (ChangeKind.TREE_BLOB, ChangeKind.TREE_MANIFEST)


def _image_size(d: pathlib.Path) -> int:
    total = 0
    with os.scandir(d) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total


async def receive_iterations(session: Session, rec: MigrationRecord, workdir: pathlib.Path,
                             stage: Callable[[str], None] = lambda _: None,
                             check_size: Callable[[MigrationRecord], None] = lambda _: None,
                             ) -> pathlib.Path:
    """Rebuild each iteration's image under ``workdir`` until the final one, which is
    verified against its manifest; returns its directory. ``stage("mid-iteration")`` is
    called after each item of iteration 1 (a test hook); ``check_size(rec)`` after each
    item, with ``rec.image_bytes`` up to date (it raises to refuse the image)."""
    prev: pathlib.Path | None = None
    hashes: dict[str, bytes] = {}
    trees = rec.trees = TreeReceiver(workdir)
    while True:
        event = await session.receive()
        if isinstance(event, Abort):
            raise RemoteProtocolError(f"the source aborted: {event.reason}")
        if isinstance(event, Error):
            raise RemoteProtocolError(f"the source failed: {event.message}")
        if not isinstance(event, IterationBegin):
            raise RemoteProtocolError(f"expected ITERATION_BEGIN, got {event!r}")
        out = workdir / f"img-{event.index}"
        # The previous image is discarded: patch it in place, and re-hash only what
        # changed when verifying.
        rb = Rebuilder(prev, out, consume_old=True, old_hashes=hashes)
        frags = Reassembler()
        try:
            while True:
                ev = await session.receive()
                if isinstance(ev, IterationEnd):
                    break
                if not isinstance(ev, Change):
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} in iteration")
                rec.bytes_received += len(ev.data)
                item = frags.feed(ev.lane, ev.data)
                if item is not None:
                    change = decode_change(item)
                    apply = trees.apply if change.kind in _TREE_KINDS else rb.apply
                    await anyio.to_thread.run_sync(apply, change)
                    # Pages files are sized in full when their first window arrives, so an
                    # oversized image is refused before it is written.
                    rec.image_bytes = _image_size(out) + trees.bytes_held
                    check_size(rec)
                await session.grant(len(ev.data))
                if event.index == 1:
                    stage("mid-iteration")
            frags.end_iteration()
            t = time.monotonic()
            await anyio.to_thread.run_sync(rb.finish)
            await anyio.to_thread.run_sync(trees.end_iteration)
            if ev.final:
                rec.timings["verify"] = time.monotonic() - t
            hashes = rb.page_hashes
        finally:
            rb.close()
        if prev is not None:
            shutil.rmtree(prev, ignore_errors=True)
        prev = out
        rec.iterations += 1
        if ev.final:
            return out
