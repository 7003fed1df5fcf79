"""runc containers: checkpoint on the source, restore into a bundle of our own."""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import time
from typing import Any

from ctlive.backends.criu import run_runtime
from ctlive.backends.liveread import live_read_dump
from ctlive.backends.workload import Backend, DumpMethod, DumpResult, Restored
from ctlive.errors import CheckpointError, CtliveError, Phase, RestoreError
from ctlive.images.criu_format import read_stats

__all__ = [
    "RuncContainer",
    "restore_runc",
]


class RuncContainer(Backend):
    """A runc container, checkpointed with ``runc checkpoint``.

    Iterations use ``--leave-running``. The final dump first pauses the container
    (cgroup freezer) and then checkpoints it, so it stays frozen and ``resume()``
    (``runc resume``) can bring it back if the migration fails.
    """

    kind = "runc"

    def __init__(self, container_id: str, *, root: str | None = None,
                 live_read: bool = True) -> None:
        self.id = container_id
        self.root = root
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``runc checkpoint --leave-running``."""

    async def _state(self) -> dict[str, Any]:
        data = json.loads(await run_runtime(["state", self.id], phase=Phase.ITERATE,
                                            root=self.root))
        if not isinstance(data, dict):
            raise CheckpointError(f"runc state of {self.id} is not an object")
        return data

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        if not final and self.live_read:
            return await live_read_dump(int((await self._state())["pid"]), images_dir)
        t = time.monotonic()
        if final:
            await run_runtime(["pause", self.id], phase=phase, root=self.root)
        await run_runtime(["checkpoint", "--image-path", str(images_dir), "--work-path",
                           str(images_dir), "--leave-running", self.id],
                          phase=phase, root=self.root)
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(time.monotonic() - t, False, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.DUMP)

    async def _resume(self) -> None:
        await run_runtime(["resume", self.id], phase=Phase.ABORT, root=self.root)

    async def _kill(self) -> None:
        await run_runtime(["delete", "--force", self.id], phase=Phase.COMMIT, root=self.root)

    def restore_spec(self) -> dict[str, Any]:
        state = json.loads(subprocess.run(
            ["runc"] + (["--root", self.root] if self.root else []) + ["state", self.id],
            capture_output=True, check=True).stdout)
        bundle = pathlib.Path(state["bundle"])
        config = json.loads((bundle / "config.json").read_text())
        rootfs = pathlib.Path(config["root"]["path"])
        if not rootfs.is_absolute():
            rootfs = bundle / rootfs
        return {"id": self.id, "config": config, "rootfs": str(rootfs)}


class _RuncRestored(Restored):
    """A runc container restored stopped: discarding it also deletes the container."""

    def __init__(self, pid: int, root: str, container_id: str) -> None:
        super().__init__(pid, container_id=container_id)
        self._root = root

    async def discard(self) -> None:
        await super().discard()
        with contextlib.suppress(CtliveError):
            await run_runtime(["delete", "--force", self._id or ""], phase=Phase.ABORT,
                              root=self._root)



async def restore_runc(images_dir: pathlib.Path, spec: dict[str, Any],
                       external_map: dict[str, str]) -> Restored:
    cid, config, rootfs = spec.get("id"), spec.get("config"), spec.get("rootfs")
    if not (isinstance(cid, str) and cid.replace("-", "").replace("_", "").isalnum()
            and isinstance(config, dict) and isinstance(rootfs, str)):
        raise RestoreError("bad runc restore spec", phase=Phase.RESTORE)
    # A bundle of our own: the container's config, its rootfs, and a CRIU config that
    # restores it stopped (runc has no --leave-stopped; CRIU reads this file).
    # Outside the per-migration directory, which is wiped after COMMIT; the container
    # keeps running from them.
    state_dir = images_dir.parent.parent
    bundle = state_dir / "bundles" / cid
    bundle.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["root"] = dict(config.get("root", {}), path=rootfs)
    # Its own cgroup: the source's (frozen until COMMIT) may be on this very host.
    config["linux"] = dict(config.get("linux") or {},
                           cgroupsPath=f"/ctlive/{cid}-{images_dir.parent.name}")
    (bundle / "criu.conf").write_text("leave-stopped\n")
    config["annotations"] = dict(config.get("annotations") or {},
                                 **{"org.criu.config": str(bundle / "criu.conf")})
    (bundle / "config.json").write_text(json.dumps(config))
    root = str(state_dir / "runc")
    await run_runtime(["restore", "--detach", "--image-path", str(images_dir), "--work-path",
                       str(images_dir), "--bundle", str(bundle), cid], phase=Phase.RESTORE,
                      root=root)
    state = json.loads(await run_runtime(["state", cid], phase=Phase.RESTORE, root=root))
    return _RuncRestored(int(state["pid"]), root, cid)
