"""What the receiver deletes, and when: images and temporary files go as soon as nothing
needs them (docs/backends.md, "Data at rest").

- An iteration's rebuilt image goes once the next one is rebuilt (``receiving``).
- The final image, and the archive podman restored from, go right after the restore:
  the restored copy runs from memory, not from them (:func:`wipe_images_soon`, in a
  thread of its own: freeing a large image takes about 100 ms per 256 MiB, which must
  not add to the downtime).
- A discarded copy takes with it its per-migration directory (in a thread, as above)
  and, for a runc copy, the bundle the receiver made for it (:func:`discard_copy`). A
  committed copy keeps only what it runs from (its bundle and root filesystem).
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import threading
from collections.abc import Callable
from typing import Any

from ctlive import backends
from ctlive.errors import CtliveError

__all__ = ["discard_copy", "wipe_images", "wipe_images_soon"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # runc's container ids


def wipe_images(workdir: pathlib.Path) -> None:
    """Delete everything in a migration's directory (the images its copy was restored
    from), keeping the directory (which COMMIT or a discard may remove meanwhile)."""
    with contextlib.suppress(OSError):
        for p in list(workdir.iterdir()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def wipe_images_soon(workdir: pathlib.Path) -> threading.Thread:
    """:func:`wipe_images` in a daemon thread, started now; returns the thread."""
    return _soon(wipe_images, workdir)


def _soon(target: Callable[..., object], *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name="ctlive-wipe", daemon=True)
    t.start()
    return t


async def discard_copy(state_dir: pathlib.Path, migration_id: str,
                       restored: backends.Restored | None, kind: str = "",
                       spec: dict[str, Any] | None = None) -> None:
    """Kill ``restored`` (if any; runc and podman also delete the container from their
    store) and delete what this receiver kept for it: its directory, and the bundle of
    a runc copy (also when the restore failed after writing it)."""
    if restored is not None:
        with contextlib.suppress(CtliveError):
            await restored.discard()
    cid = (spec or {}).get("id") if kind == "runc" else None
    # A container of that id still known to runc here is another copy's: keep its bundle.
    if isinstance(cid, str) and _ID.match(cid) and not (state_dir / "runc" / cid).exists():
        shutil.rmtree(state_dir / "bundles" / cid, ignore_errors=True)
    # The images may be large: the source waits for the refusal to resume its copy.
    _soon(shutil.rmtree, state_dir / migration_id, True)
