"""Checkpoint backends: what ``migrate()`` dumps on the source and restores on the
destination.

The source side is a :class:`Workload`: ``dump(dir, final=…)`` takes an iteration
while the workload runs (``pre-dump`` where the kernel tracks dirty pages, else a live
read of its memory, :mod:`ctlive.livecopy`, or with ``live_read=False`` a full
``dump --leave-running``) or the final dump, which leaves the workload
*stopped* so it can be resumed if the migration fails. The destination side is
:func:`restore`, which restores *stopped* and returns a :class:`Restored` that the
two-phase commit resumes or discards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time
from typing import Any, Protocol, runtime_checkable

import anyio
import attrs

from ctlive import livecopy
from ctlive.criubin import find_criu, run_criu
from ctlive.errors import CheckpointError, ConfigError, CriuError, CtliveError, RestoreError
from ctlive.images import DumpStats, read_stats

__all__ = [
    "DumpResult",
    "PodmanContainer",
    "Process",
    "Restored",
    "RuncContainer",
    "Workload",
    "restore",
]


@attrs.frozen
class DumpResult:
    """One dump: how long it took and CRIU's own figures."""

    duration: float
    pre_dump: bool
    final: bool
    stats: DumpStats | None
    method: str = ""
    """``pre-dump`` (CRIU, soft-dirty: a short freeze), ``dump`` (CRIU ``--leave-running``:
    frozen while all memory is written), ``read`` (memory read while the workload runs,
    no freeze; see :mod:`ctlive.livecopy`) or ``final``."""


async def _live_read(pid: int, images_dir: pathlib.Path) -> DumpResult:
    """A pre-copy iteration that does not freeze the workload (ctlive.livecopy)."""
    t = time.monotonic()
    await anyio.to_thread.run_sync(livecopy.read_tree, _tree(pid), images_dir)
    return DumpResult(time.monotonic() - t, False, False, None, "read")


@runtime_checkable
class Workload(Protocol):
    """A checkpointable workload on the source."""

    kind: str

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        """Dump into ``images_dir``; ``final`` leaves the workload stopped."""
        ...

    async def resume(self) -> None:
        """Continue a workload the final dump left stopped (the abort path)."""
        ...

    async def kill(self) -> None:
        """End the source copy (after the destination is ready)."""
        ...

    def restore_spec(self) -> dict[str, Any]:
        """JSON-able facts the destination needs to restore."""
        ...


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        for task in pathlib.Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def _signal_tree(pid: int, sig: int) -> None:
    for p in _tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


class Process:
    """A process tree, checkpointed by CRIU directly.

    The tree should live in its own PID namespace (``unshare --pid --fork setsid
    CMD``): CRIU then restores it as a whole on the destination.
    """

    kind = "process"

    def __init__(self, pid: int, *, tcp_established: bool = False,
                 external: tuple[str, ...] = (), shell_job: bool = False,
                 network_lock: str | None = None, live_read: bool | None = None) -> None:
        if pid <= 1:
            raise ConfigError(f"refusing to checkpoint pid {pid}")
        if not pathlib.Path(f"/proc/{pid}").exists():
            raise ConfigError(f"no process {pid}")
        self.pid = pid
        self.tcp_established = tcp_established
        self.external = external
        self.shell_job = shell_job
        self.network_lock = network_lock
        self.live_read = live_read
        """Pre-copy by reading memory while the tree runs (no freeze) instead of with
        CRIU; None: whenever CRIU cannot pre-dump (no soft-dirty tracking)."""

    def _common(self) -> list[str]:
        args = []
        if self.tcp_established:
            args.append("--tcp-established")
        for e in self.external:
            args += ["--external", e]
        if self.shell_job:
            args.append("--shell-job")
        if self.network_lock:
            args += ["--network-lock", self.network_lock]
        return args

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        tracking = find_criu().dirty_tracking
        if not final and (self.live_read or (self.live_read is None and not tracking)):
            return await _live_read(self.pid, images_dir)
        pre = not final and tracking
        if pre:
            args = ["pre-dump", "-t", str(self.pid), "-D", str(images_dir)]
            if parent is not None:
                args += ["--prev-images-dir", os.path.relpath(parent, images_dir)]
        else:
            args = ["dump", "-t", str(self.pid), "-D", str(images_dir),
                    "--leave-stopped" if final else "--leave-running"]
        t = time.monotonic()
        await run_criu(args + self._common(), workdir=images_dir, log="dump.log",
                       phase="final-dump" if final else "iterate")
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(time.monotonic() - t, pre, final, stats,
                          "final" if final else "pre-dump" if pre else "dump")

    async def resume(self) -> None:
        _signal_tree(self.pid, signal.SIGCONT)

    async def kill(self) -> None:
        _signal_tree(self.pid, signal.SIGKILL)

    def restore_spec(self) -> dict[str, Any]:
        return {"tcp_established": self.tcp_established, "external": list(self.external),
                "shell_job": self.shell_job}


async def _runc(args: list[str], *, phase: str, root: str | None = None,
                tool: str = "runc") -> str:
    cmd = [tool] + (["--root", root] if root else []) + args
    env = dict(os.environ)
    # runc finds CRIU as `criu` on PATH; prefer the private install.
    env["PATH"] = f"{pathlib.Path(find_criu().path).parent}:{env.get('PATH', '')}"
    try:
        proc = await anyio.run_process(cmd, check=False, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise CheckpointError(f"cannot run runc: {exc}", phase=phase, cause=exc) from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise CriuError(f"{tool} {args[0]} failed: {err}", phase=phase)
    return proc.stdout.decode(errors="replace")


class RuncContainer:
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
        data = json.loads(await _runc(["state", self.id], phase="iterate", root=self.root))
        if not isinstance(data, dict):
            raise CheckpointError(f"runc state of {self.id} is not an object")
        return data

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = "final-dump" if final else "iterate"
        if not final and self.live_read:
            return await _live_read(int((await self._state())["pid"]), images_dir)
        t = time.monotonic()
        if final:
            await _runc(["pause", self.id], phase=phase, root=self.root)
        await _runc(["checkpoint", "--image-path", str(images_dir), "--work-path",
                     str(images_dir), "--leave-running", self.id], phase=phase, root=self.root)
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(time.monotonic() - t, False, final, stats,
                          "final" if final else "dump")

    async def resume(self) -> None:
        await _runc(["resume", self.id], phase="abort", root=self.root)

    async def kill(self) -> None:
        await _runc(["delete", "--force", self.id], phase="commit", root=self.root)

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


# Names in a flattened podman archive: top-level files get this prefix, the CRIU
# images of checkpoint/ keep their names, so image diff sees one flat directory.
_TOP = "podman+"


def _flatten(archive: pathlib.Path, out: pathlib.Path) -> None:
    import tarfile

    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if not m.isfile():
                continue
            target = (name.removeprefix("checkpoint/") if name.startswith("checkpoint/")
                      else _TOP + name)
            if "/" in target:
                continue  # nested files (none in podman 4 archives) are not migrated
            src = tar.extractfile(m)
            assert src is not None
            (out / target).write_bytes(src.read())


def _unflatten(flat: pathlib.Path, archive: pathlib.Path) -> None:
    import tarfile

    with tarfile.open(archive, "w") as tar:
        for d in ("checkpoint", "artifacts"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for p in sorted(flat.iterdir()):
            if not p.is_file() or p.name.endswith(".log"):
                continue
            name = p.name[len(_TOP):] if p.name.startswith(_TOP) else f"checkpoint/{p.name}"
            tar.add(p, arcname=name)


class PodmanContainer:
    """A podman container, checkpointed with ``podman container checkpoint --export``.

    Iterations use ``--leave-running``. Podman cannot checkpoint a paused container,
    so the final dump stops it and keeps the exported archive; ``resume()`` (the
    abort path) restores the container locally from that archive. Podman's CRIU
    options cannot leave a restore stopped, so the destination pauses the restored
    container immediately (see docs/backends.md for what that window means).
    """

    kind = "podman"

    def __init__(self, name: str, *, live_read: bool = True) -> None:
        self.name = name
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``podman container checkpoint --leave-running``."""
        self._final_archive: pathlib.Path | None = None

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = "final-dump" if final else "iterate"
        if not final and self.live_read:
            pid = await _runc(["container", "inspect", "--format", "{{.State.Pid}}", self.name],
                              phase=phase, tool="podman")
            return await _live_read(int(pid.strip()), images_dir)
        archive = images_dir.parent / f"{images_dir.name}.tar"
        t = time.monotonic()
        args = ["container", "checkpoint", "--export", str(archive), "--compress", "none"]
        if not final:
            args.append("--leave-running")
        await _runc([*args, self.name], phase=phase, tool="podman")
        duration = time.monotonic() - t
        if final:
            self._final_archive = archive
        await anyio.to_thread.run_sync(_flatten, archive, images_dir)
        if not final:
            archive.unlink()
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(duration, False, final, stats, "final" if final else "dump")

    async def resume(self) -> None:
        if self._final_archive is None:
            return
        await _runc(["rm", "--force", self.name], phase="abort", tool="podman")
        await _runc(["container", "restore", "--import", str(self._final_archive), "--name",
                     self.name], phase="abort", tool="podman")

    async def kill(self) -> None:
        await _runc(["rm", "--force", "--time", "0", self.name], phase="commit", tool="podman")

    def restore_spec(self) -> dict[str, Any]:
        return {"name": self.name}


class Restored:
    """A workload restored stopped on the destination."""

    def __init__(self, pid: int, *, runc_root: str | None = None,
                 container_id: str | None = None) -> None:
        self.pid = pid
        self._runc_root = runc_root
        self._id = container_id

    async def resume(self) -> None:
        """Let it run (the destination's half of COMMIT)."""
        _signal_tree(self.pid, signal.SIGCONT)

    async def discard(self) -> None:
        """Kill it (ABORT, or a failure before COMMIT)."""
        _signal_tree(self.pid, signal.SIGKILL)
        if self._id is not None:
            with contextlib.suppress(CtliveError):
                await _runc(["delete", "--force", self._id], phase="abort",
                            root=self._runc_root)


async def _restore_runc(images_dir: pathlib.Path, spec: dict[str, Any]) -> Restored:
    cid, config, rootfs = spec.get("id"), spec.get("config"), spec.get("rootfs")
    if not (isinstance(cid, str) and cid.replace("-", "").replace("_", "").isalnum()
            and isinstance(config, dict) and isinstance(rootfs, str)):
        raise RestoreError("bad runc restore spec", phase="restore")
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
    await _runc(["restore", "--detach", "--image-path", str(images_dir), "--work-path",
                 str(images_dir), "--bundle", str(bundle), cid], phase="restore", root=root)
    state = json.loads(await _runc(["state", cid], phase="restore", root=root))
    return Restored(int(state["pid"]), runc_root=root, container_id=cid)


class _PodmanRestored(Restored):
    async def resume(self) -> None:
        assert self._id is not None
        await _runc(["unpause", self._id], phase="commit", tool="podman")

    async def discard(self) -> None:
        with contextlib.suppress(CtliveError):
            await _runc(["rm", "--force", "--time", "0", self._id or ""], phase="abort",
                        tool="podman")


async def _restore_podman(images_dir: pathlib.Path, spec: dict[str, Any]) -> Restored:
    name = spec.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise RestoreError("bad podman restore spec", phase="restore")
    archive = images_dir.parent / "restore.tar"
    await anyio.to_thread.run_sync(_unflatten, images_dir, archive)
    new_name = f"{name}-{images_dir.parent.name[:8]}"
    await _runc(["container", "restore", "--import", str(archive), "--name", new_name],
                phase="restore", tool="podman")
    # Not atomic: the container runs for the moment between restore and pause.
    await _runc(["pause", new_name], phase="restore", tool="podman")
    pid = int((await _runc(["inspect", new_name, "--format", "{{.State.Pid}}"],
                           phase="restore", tool="podman")).strip())
    return _PodmanRestored(pid, container_id=new_name)


async def restore(kind: str, images_dir: pathlib.Path, spec: dict[str, Any], *,
                  external_map: dict[str, str] | None = None) -> Restored:
    """Restore a dump stopped; returns the handle the two-phase commit drives.

    ``external_map`` renames external resources for this host, e.g.
    ``{"veth[eth0]:vh0": "veth[eth0]:vh1"}`` when the outer end of the workload's veth
    has another name here."""
    if kind == "runc":
        return await _restore_runc(images_dir, spec)
    if kind == "podman":
        return await _restore_podman(images_dir, spec)
    if kind != "process":
        raise RestoreError(f"this receiver cannot restore workloads of kind {kind!r}")
    args = ["restore", "-D", str(images_dir), "-d", "--leave-stopped", "--root", "/",
            "--pidfile", str(images_dir / "restored.pid")]
    if spec.get("tcp_established"):
        args.append("--tcp-established")
    for e in spec.get("external", []):
        if not isinstance(e, str):
            raise RestoreError("bad external resource in the restore spec")
        args += ["--external", (external_map or {}).get(e, e)]
    if spec.get("shell_job"):
        args.append("--shell-job")
    try:
        await run_criu(args, workdir=images_dir, log="restore.log", phase="restore")
    except CheckpointError:
        raise
    except Exception as exc:
        raise RestoreError(f"restore failed: {exc}", phase="restore", cause=exc) from exc
    try:
        pid = int((images_dir / "restored.pid").read_text().strip())
    except (OSError, ValueError) as exc:
        raise RestoreError("CRIU did not report the restored pid", phase="restore",
                           cause=exc) from exc
    return Restored(pid)
