"""What the receiver deletes (ctlive.migration.wipe) and what it must keep: a running
copy's bundle and runc state survive a restart and another copy's discard."""

from __future__ import annotations

import pathlib
import time

import anyio
import pytest

from ctlive.migration.destination import Destination
from ctlive.migration.wipe import discard_copy, wipe_images, wipe_images_soon

pytestmark = pytest.mark.anyio


def tree(root: pathlib.Path, *files: str) -> None:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x")


def test_wipe_images_empties_the_directory_and_tolerates_its_removal(
        tmp_path: pathlib.Path) -> None:
    tree(tmp_path / "m", "img-2/pages-1.img", "img-2/core-1.img", "restore.tar")
    wipe_images(tmp_path / "m")
    assert (tmp_path / "m").is_dir() and list((tmp_path / "m").iterdir()) == []
    wipe_images(tmp_path / "gone")  # COMMIT removed it meanwhile: nothing to do
    tree(tmp_path / "n", "img-3/pages-1.img")
    wipe_images_soon(tmp_path / "n").join(5)
    assert list((tmp_path / "n").iterdir()) == []


async def test_discard_copy_removes_the_bundle_unless_runc_still_has_the_container(
        memory_path: pathlib.Path) -> None:
    state = memory_path
    tree(state, "m1/img-1/pages-1.img", "bundles/web/config.json", "bundles/db/config.json",
         "runc/db/state.json", "m2/img-1/pages-1.img")
    await discard_copy(state, "m1", None, "runc", {"id": "web"})
    assert not (state / "bundles" / "web").exists()
    # runc still knows a container "db" here: that bundle is another copy's, kept.
    await discard_copy(state, "m2", None, "runc", {"id": "db"})
    assert (state / "bundles" / "db" / "config.json").is_file()
    # Hostile ids never reach outside bundles/.
    tree(state, "keep/file")
    await discard_copy(state, "m3", None, "runc", {"id": "../keep"})
    assert (state / "keep" / "file").is_file()
    deadline = time.monotonic() + 10
    while (state / "m1").exists() or (state / "m2").exists():  # a thread of their own
        assert time.monotonic() < deadline
        await anyio.sleep(0.02)


async def test_a_restarted_receiver_keeps_running_copies_bundles(
        memory_path: pathlib.Path) -> None:
    """adopt() removes stale migration directories, never bundles/ and runc/, which
    running (committed) containers use."""
    tree(memory_path, "bundles/web/config.json", "runc/web/state.json",
         "3f2a9c/img-1/pages-1.img")
    rx = Destination(memory_path)
    try:
        await rx.adopt()
    finally:
        rx.journal.close()
    assert (memory_path / "bundles" / "web" / "config.json").is_file()
    assert (memory_path / "runc" / "web" / "state.json").is_file()
    assert not (memory_path / "3f2a9c").exists()
