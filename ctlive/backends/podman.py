"""podman containers: checkpoint archives, flattened so that image diff sees one
directory, and restored from the rebuilt archive."""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import time
from typing import Any

import anyio

import ctlive.backends.restore as checks  # the module (the package's `restore` is its function)
from ctlive.backends.criu import run_runtime
from ctlive.backends.liveread import live_read_dump
from ctlive.backends.restore import RestorePolicy
from ctlive.backends.workload import Backend, DumpMethod, DumpResult, Restored
from ctlive.errors import CtliveError, Phase
from ctlive.images.criu_format import read_stats

__all__ = [
    "PodmanContainer",
    "check_podman_archive",
    "podman_restore_name",
    "restore_podman",
]

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


class PodmanContainer(Backend):
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

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        if not final and self.live_read:
            pid = await run_runtime(["container", "inspect", "--format", "{{.State.Pid}}",
                                     self.name], phase=phase, tool="podman")
            return await live_read_dump(int(pid.strip()), images_dir)
        archive = images_dir.parent / f"{images_dir.name}.tar"
        t = time.monotonic()
        args = ["container", "checkpoint", "--export", str(archive), "--compress", "none"]
        if not final:
            args.append("--leave-running")
        await run_runtime([*args, self.name], phase=phase, tool="podman")
        duration = time.monotonic() - t
        if final:
            self._final_archive = archive
        await anyio.to_thread.run_sync(_flatten, archive, images_dir)
        if not final:
            archive.unlink()
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(duration, False, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.DUMP)

    async def _resume(self) -> None:
        if self._final_archive is None:
            return
        await run_runtime(["rm", "--force", self.name], phase=Phase.ABORT, tool="podman")
        await run_runtime(["container", "restore", "--import", str(self._final_archive), "--name",
                           self.name], phase=Phase.ABORT, tool="podman")

    async def _kill(self) -> None:
        await run_runtime(["rm", "--force", "--time", "0", self.name], phase=Phase.COMMIT,
                          tool="podman")

    def restore_spec(self) -> dict[str, Any]:
        return {"name": self.name}


class _PodmanRestored(Restored):
    async def resume(self) -> None:
        assert self._id is not None
        await run_runtime(["unpause", self._id], phase=Phase.COMMIT, tool="podman")

    async def discard(self) -> None:
        with contextlib.suppress(CtliveError):
            await run_runtime(["rm", "--force", "--time", "0", self._id or ""], phase=Phase.ABORT,
                              tool="podman")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_METADATA = 16 << 20
# config.dump: host paths podman writes to (logs, pid files, its per-container dirs).
_HOST_FILES = ("logPath", "conmonPidFile", "pid_file", "staticDir", "ShmDir", "secretsPath")
# config.dump: namespaces shared with another container of this host.
_SHARED_NS = ("IPCNsCtr", "MountNsCtr", "NetNsCtr", "PIDNsCtr", "UserNsCtr", "UTSNsCtr",
              "CgroupNsCtr")
_storage: tuple[str, ...] | None = None


def podman_restore_name(spec: dict[str, Any]) -> str:
    """The container name of a podman restore spec (``{"name": ...}``, a podman name that
    cannot be read as an option), or a :class:`~ctlive.errors.RestoreSpecError`."""
    checks.only_keys(spec, ("name",), "")
    return checks.string(spec.get("name"), "name", max_len=64, pattern=_NAME)


def _metadata(images_dir: pathlib.Path, name: str) -> dict[str, Any]:
    path = images_dir / (_TOP + name)
    if not path.is_file():
        checks.refuse(name, f"the podman archive has no {name}")
    if path.stat().st_size > _MAX_METADATA:
        checks.refuse(name, f"{name} is larger than {_MAX_METADATA} bytes")
    try:
        data = json.loads(path.read_bytes())
    except ValueError:
        checks.refuse(name, f"{name} is not JSON")
    return checks.obj(data, name)


def check_podman_archive(images_dir: pathlib.Path, policy: RestorePolicy, *,
                         storage: tuple[str, ...], store: pathlib.Path) -> None:
    """Podman recreates the container from the archive's own ``spec.dump`` (an OCI spec)
    and ``config.dump`` (its container config), so these are the restore spec too:
    the OCI checks of the runc backend apply to both specs (hooks, devices,
    capabilities, bind mounts outside podman's ``storage``, namespace paths), and a
    privileged container, namespaces shared with other containers, and host files
    outside podman's storage are refused as ``policy`` says. With
    ``policy.no_new_privileges`` both specs are rewritten with it on."""
    spec = _metadata(images_dir, "spec.dump")
    config = _metadata(images_dir, "config.dump")
    refuse = checks.refuse
    if config.get("privileged") and not policy.allow_devices:
        refuse("config.dump.privileged", "a privileged podman container (config.dump."
                                         "privileged) gets every device of this receiver; "
                                         "not allowed (RestorePolicy.allow_devices)")
    for key in _SHARED_NS:
        if config.get(key) and not policy.allow_host_namespaces:
            refuse(f"config.dump.{key}", f"sharing a namespace with container "
                                         f"{str(config[key])[:80]!r} (config.dump.{key}) is not"
                                         " allowed on this receiver "
                                         "(RestorePolicy.allow_host_namespaces)")
    for key in _HOST_FILES:
        path = checks.clean_path(config[key], f"config.dump.{key}") if config.get(key) else None
        # Podman writes these: its storage only, whatever the policy lets bind-mount.
        if path is not None and not checks.bind_allowed(path, RestorePolicy(), storage):
            refuse(f"config.dump.{key}", f"config.dump.{key} {path} is outside podman's "
                                         f"storage ({', '.join(storage)})")
    volumes = checks.strings(config.get("mounts") or [], "config.dump.mounts")
    for i, path in enumerate(volumes):
        field = f"config.dump.mounts[{i}]"
        if not checks.bind_allowed(checks.clean_path(path, field), policy, storage):
            refuse(field, f"bind mount of host path {path} ({field}) is not allowed on this "
                          "receiver (RestorePolicy.allow_host_mounts, "
                          "RestorePolicy.allowed_bind_sources)")
    if config.get("rootfs"):
        checks.in_store(config["rootfs"], "config.dump.rootfs", store)
    # Podman makes a new network namespace for the restored copy and replaces the path.
    netns = ("/run/netns",) if config.get("createNetNS") is True else ()
    specs = [("spec.dump.", spec)]
    if config.get("spec") is not None:
        specs.append(("config.dump.spec.", checks.obj(config["spec"], "config.dump.spec")))
    for where, oci in specs:
        process = checks.obj(oci.get("process") or {}, f"{where}process")
        linux = checks.obj(oci.get("linux") or {}, f"{where}linux")
        checks.check_hooks(oci, policy, where)
        checks.check_capabilities(process, policy, where)
        checks.check_devices(linux, policy, where)
        checks.check_mounts(oci.get("mounts"), policy, where, runtime_roots=storage)
        checks.check_namespaces(linux, policy, where, runtime_paths=netns)
        if policy.no_new_privileges:
            oci["process"] = dict(process, noNewPrivileges=True)
    if policy.no_new_privileges:
        for name, data in (("spec.dump", spec), ("config.dump", config)):
            checks.write_private(images_dir / (_TOP + name), json.dumps(data))


async def _podman_storage() -> tuple[str, ...]:
    """Podman's graph root and run root here (asked once)."""
    global _storage
    if _storage is None:
        out = await run_runtime(["info", "--format", "{{.Store.GraphRoot}}\n{{.Store.RunRoot}}"],
                                phase=Phase.RESTORE, tool="podman")
        _storage = tuple(line.strip() for line in out.splitlines() if line.strip())
    return _storage


async def restore_podman(images_dir: pathlib.Path, spec: dict[str, Any],
                         external_map: dict[str, str], policy: RestorePolicy) -> Restored:
    """Restore a podman container from the rebuilt archive (once :func:`podman_restore_name`
    and :func:`check_podman_archive` passed), then pause it at once."""
    name = podman_restore_name(spec)
    check_podman_archive(images_dir, policy, storage=await _podman_storage(),
                         store=policy.store_for(images_dir.parent.parent))
    archive = images_dir.parent / "restore.tar"
    await anyio.to_thread.run_sync(_unflatten, images_dir, archive)
    new_name = f"{name}-{images_dir.parent.name[:8]}"
    await run_runtime(["container", "restore", "--import", str(archive), "--name", new_name],
                      phase=Phase.RESTORE, tool="podman")
    # Not atomic: the container runs for the moment between restore and pause.
    await run_runtime(["pause", new_name], phase=Phase.RESTORE, tool="podman")
    pid = int((await run_runtime(["inspect", new_name, "--format", "{{.State.Pid}}"],
                                 phase=Phase.RESTORE, tool="podman")).strip())
    return _PodmanRestored(pid, container_id=new_name)
