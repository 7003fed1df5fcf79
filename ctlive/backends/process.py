"""A plain process tree, checkpointed by CRIU directly."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import time
from typing import Any

from ctlive.backends import carry as carried
from ctlive.backends.criu import find_criu, run_criu
from ctlive.backends.liveread import live_read_dump
from ctlive.backends.restore import (
    RestorePolicy,
    bind_allowed,
    boolean,
    clean_path,
    only_keys,
    refuse,
    string,
)
from ctlive.backends.workload import (
    Backend,
    DumpMethod,
    DumpResult,
    Restored,
    signal_tree,
    visible_tmpfs,
)
from ctlive.errors import CheckpointError, ConfigError, Phase, RestoreError
from ctlive.images.criu_format import read_stats
from ctlive.images.tree_apply import TreeReceiver

__all__ = [
    "Process",
    "process_restore_args",
    "restore_process",
]


class Process(Backend):
    """A process tree, checkpointed by CRIU directly.

    The tree should live in its own PID namespace (``unshare --pid --fork setsid
    CMD``): CRIU then restores it as a whole on the destination.

    ``carry`` lists directories (absolute paths: a user's data directory) pre-copied
    with the memory and rebuilt at the same paths at the destination before the
    restore, which checks that every file the tree has open is there with its size.
    """

    kind = "process"

    def __init__(self, pid: int, *, tcp_established: bool = False,
                 external: tuple[str, ...] = (), shell_job: bool = False,
                 network_lock: str | None = None, live_read: bool | None = None,
                 carry: tuple[str, ...] | list[str] = ()) -> None:
        if pid <= 1:
            raise ConfigError(f"refusing to checkpoint pid {pid}")
        # The real paths: CRIU records the files the tree holds open by those.
        self.carry = tuple(os.path.realpath(p) for p in carry)
        for p in self.carry:
            if not os.path.isdir(p):
                raise ConfigError(f"carry: {p} is not a directory")
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

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        # Once, at the first dump: the later ones go to the same work directory.
        if parent is None and (seen := visible_tmpfs(self.pid, images_dir)) is not None:
            raise ConfigError(
                f"the dump directory {images_dir} is on a tmpfs that process {self.pid} sees "
                f"at {seen}: CRIU archives every tmpfs in the workload's mount namespace, so "
                "each dump would carry the ones before it (more bytes, a longer freeze); give "
                "migrate a work directory (--workdir) on a disk or on a tmpfs the workload "
                "does not see")
        tracking = find_criu().dirty_tracking
        if not final and (self.live_read or (self.live_read is None and not tracking)):
            return await live_read_dump(self.pid, images_dir)
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
                       phase=Phase.FINAL_DUMP if final else Phase.ITERATE)
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(time.monotonic() - t, pre, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.PRE_DUMP if pre
                          else DumpMethod.DUMP)

    async def _resume(self) -> None:
        signal_tree(self.pid, signal.SIGCONT)

    async def _kill(self) -> None:
        signal_tree(self.pid, signal.SIGKILL)

    def carried_trees(self) -> dict[str, str]:
        return {f"carry{i}": p for i, p in enumerate(self.carry)}

    def restore_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"tcp_established": self.tcp_established,
                                "external": list(self.external), "shell_job": self.shell_job}
        if self.carry:
            spec["carry"] = list(self.carry)
        return spec


_IFNAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}"
_VETH = re.compile(rf"^veth\[{_IFNAME}\]:{_IFNAME}$")
_MNT = re.compile(r"^mnt\[[A-Za-z0-9_./-]{1,255}\]:(.*)$")


def process_restore_args(spec: dict[str, Any], external_map: dict[str, str],
                         policy: RestorePolicy) -> list[str]:
    """The CRIU options a process tree's restore spec asks for (``tcp_established``,
    ``external``, ``shell_job``: booleans and a list), or a
    :class:`~ctlive.errors.RestoreSpecError`.

    An ``external`` entry that is a key of ``external_map`` (the operator's) becomes its
    value. Otherwise it must be ``veth[IFNAME]:NAME`` (CRIU creates the outer end under
    that name here; attaching it to a bridge, ``@BRIDGE``, only through
    ``external_map``) or ``mnt[KEY]:PATH``, a bind of host path PATH that ``policy``
    must allow; nothing else (devices, files, sockets, other namespaces)."""
    only_keys(spec, ("tcp_established", "external", "shell_job", "carry"), "")
    args = []
    if boolean(spec.get("tcp_established", False), "tcp_established"):
        args.append("--tcp-established")
    external = spec.get("external", [])
    if not isinstance(external, list) or len(external) > 64:
        refuse("external", "external must be a list of at most 64 strings")
    for i, e in enumerate(external):
        field = f"external[{i}]"
        e = string(e, field, max_len=512)
        if e in external_map:
            args += ["--external", external_map[e]]
            continue
        mnt = _MNT.match(e)
        if mnt:
            path = clean_path(mnt.group(1), field)
            if not bind_allowed(path, policy):
                refuse(field, f"external mount {e[:120]!r} ({field}) binds host path {path} "
                              "into the workload; not allowed on this receiver "
                              "(RestorePolicy.allow_host_mounts, "
                              "RestorePolicy.allowed_bind_sources)")
        elif not _VETH.match(e):
            refuse(field, f"external resource {e[:120]!r} ({field}) is not one this receiver "
                          "accepts: veth[IFNAME]:NAME, mnt[KEY]:PATH or a key of its "
                          "external_map")
        args += ["--external", e]
    if boolean(spec.get("shell_job", False), "shell_job"):
        args.append("--shell-job")
    return args


async def restore_process(images_dir: pathlib.Path, spec: dict[str, Any],
                          external_map: dict[str, str], policy: RestorePolicy, *,
                          trees: TreeReceiver | None = None) -> Restored:
    """Restore a process tree stopped (``criu restore --leave-stopped``), with the
    options :func:`process_restore_args` allows. The tree is restored into this host's
    own root (``--root /``): CRIU reopens its files there by path. The spec's ``carry``
    directories are rebuilt from ``trees`` first, where the policy allows
    (:func:`ctlive.backends.carry.carried_paths`), and every file the dump reopens is
    checked to be here with its size."""
    extra = process_restore_args(spec, external_map, policy)
    paths = carried.carried_paths(spec.get("carry", []), policy, images_dir.parent.parent)
    where = {f"carry{i}": p for i, p in enumerate(paths)}
    carried.expect_trees(trees, set(where))
    made = carried.materialize_carried(trees, where) if trees is not None and where else []
    try:
        carried.check_open_files(images_dir, made)
        return await _criu_restore(images_dir, extra, made)
    except BaseException:
        carried.remove_carried(made)
        raise


async def _criu_restore(images_dir: pathlib.Path, extra: list[str],
                        made: list[str]) -> Restored:
    args = ["restore", "-D", str(images_dir), "-d", "--leave-stopped", "--root", "/",
            "--pidfile", str(images_dir / "restored.pid"), *extra]
    try:
        await run_criu(args, workdir=images_dir, log="restore.log", phase=Phase.RESTORE)
    except CheckpointError:
        raise
    except Exception as exc:
        raise RestoreError(f"restore failed: {exc}", phase=Phase.RESTORE, cause=exc) from exc
    try:
        pid = int((images_dir / "restored.pid").read_text().strip())
    except (OSError, ValueError) as exc:
        raise RestoreError("CRIU did not report the restored pid", phase=Phase.RESTORE,
                           cause=exc) from exc
    return _ProcessRestored(pid, made)


class _ProcessRestored(Restored):
    """A restored process tree; discarding it also removes the carried directories
    rebuilt for it."""

    def __init__(self, pid: int, carried_dirs: list[str]) -> None:
        super().__init__(pid)
        self._carried = carried_dirs

    async def discard(self) -> None:
        await super().discard()
        carried.remove_carried(self._carried)
