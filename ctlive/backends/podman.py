"""podman containers: checkpoint archives, flattened so that image diff sees one
directory, and restored from the rebuilt archive."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import anyio

import ctlive.backends.podman_archive as archive
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
    "podman_images",
    "podman_restore_name",
    "restore_podman",
]

_TOP = archive.TOP  # tests and callers name flattened metadata files with it
_ID = re.compile(r"^[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")


async def _podman_ok(args: list[str]) -> bool:
    """Whether ``podman ARGS`` succeeds (``image exists``, ``volume exists``)."""
    proc = await anyio.run_process(["podman", *args], check=False, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


async def podman_images() -> list[str]:
    """The ids (sha256 hex of their config) of every image in this host's podman store:
    the destination's ``podman_images`` fact, so a source sends an image only when it is
    missing. Empty when podman is not installed."""
    try:
        proc = await anyio.run_process(["podman", "images", "--all", "--quiet", "--no-trunc"],
                                       check=False, stdin=subprocess.DEVNULL)
    except OSError:
        return []
    ids = {line.strip().removeprefix("sha256:") for line in proc.stdout.decode().split()}
    return sorted(i for i in ids if _ID.match(i))


class PodmanContainer(Backend):
    """A podman container, checkpointed with ``podman container checkpoint --export``.

    Iterations use ``--leave-running``. Podman cannot checkpoint a paused container,
    so the final dump stops it and keeps the exported archive; ``resume()`` (the
    abort path) restores the container locally from that archive. Podman's CRIU
    options cannot leave a restore stopped, so the destination pauses the restored
    container immediately (see docs/backends.md for what that window means).

    Every member of the archive travels (the rootfs diff, named volumes, /dev/shm, …),
    and so does the container's base image unless the destination said it has it
    (:meth:`use_destination_facts`). Live-read iterations pre-copy the image and the
    named volumes (``podman volume export``); the final archive brings the rest.
    """

    kind = "podman"

    def __init__(self, name: str, *, live_read: bool = True,
                 tcp_established: bool = False) -> None:
        self.name = name
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``podman container checkpoint --leave-running``."""
        self.tcp_established = tcp_established
        """Checkpoint and restore the container's established TCP connections
        (``--tcp-established``)."""
        self.destination_images: frozenset[str] | None = None
        """Image ids the destination holds (its ``podman_images`` fact); None: unknown,
        so the image travels and the destination loads it only if it lacks it."""
        self._final_archive: pathlib.Path | None = None
        self._image: pathlib.Path | None = None  # the saved base image, linked into dumps
        self._info: tuple[str, list[str]] | None = None

    def use_destination_facts(self, facts: Mapping[str, Any]) -> None:
        """Take what the destination told about itself: with ``podman_images`` (a list of
        image ids), the base image travels only when it is not among them."""
        images = facts.get("podman_images")
        if isinstance(images, list) and all(isinstance(i, str) for i in images):
            self.destination_images = frozenset(images)

    async def _inspect(self, phase: Phase) -> tuple[str, list[str]]:
        """The container's image id and its named volumes (asked once)."""
        if self._info is None:
            out = await run_runtime(["container", "inspect", "--format",
                                     "{{.Image}}\n{{json .Mounts}}", self.name], phase=phase,
                                    tool="podman")
            image, _, mounts = out.strip().partition("\n")
            vols = [m["Name"] for m in json.loads(mounts or "[]")
                    if m.get("Type") == "volume" and isinstance(m.get("Name"), str)]
            self._info = (image.strip().removeprefix("sha256:"), vols)
        return self._info

    async def _carry(self, images_dir: pathlib.Path, phase: Phase, *, volumes: bool) -> None:
        """Add the base image (saved once, then hard-linked: unchanged iterations cost no
        wire bytes) unless the destination has it, and with ``volumes`` a snapshot of
        each named volume, pre-copied ahead of the final archive's own."""
        image, names = await self._inspect(phase)
        if _ID.match(image) and (self.destination_images is None
                                 or image not in self.destination_images):
            if self._image is None:
                saved = images_dir.parent / f"podman-image-{image[:12]}.tar"
                saved.unlink(missing_ok=True)  # podman refuses to overwrite an archive
                await run_runtime(["image", "save", "--format", "docker-archive", "--output",
                                   str(saved), image], phase=phase, tool="podman")
                self._image = saved
            os.link(self._image, images_dir / f"{archive.IMAGE_PREFIX}{image}.tar")
        for vol in names if volumes else []:
            await run_runtime(["volume", "export", "--output",
                               str(images_dir / f"{_TOP}volumes+{vol}.tar"), vol],
                              phase=phase, tool="podman")

    def _drop_image(self) -> None:
        if self._image is not None:
            self._image.unlink(missing_ok=True)

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        if not final and self.live_read:
            pid = await run_runtime(["container", "inspect", "--format", "{{.State.Pid}}",
                                     self.name], phase=phase, tool="podman")
            res = await live_read_dump(int(pid.strip()), images_dir)
            await self._carry(images_dir, phase, volumes=True)
            return res
        await self._inspect(phase)  # while the container still exists
        archive_path = images_dir.parent / f"{images_dir.name}.tar"
        t = time.monotonic()
        args = ["container", "checkpoint", "--export", str(archive_path), "--compress", "none"]
        if not final:
            args.append("--leave-running")
        if self.tcp_established:
            args.append("--tcp-established")
        await run_runtime([*args, self.name], phase=phase, tool="podman")
        duration = time.monotonic() - t
        if final:
            self._final_archive = archive_path
        await anyio.to_thread.run_sync(archive.flatten, archive_path, images_dir)
        if not final:
            archive_path.unlink()
        await self._carry(images_dir, phase, volumes=False)
        if final:
            self._drop_image()  # the final dump's link is the last one needed
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(duration, False, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.DUMP)

    async def _resume(self) -> None:
        self._drop_image()
        if self._final_archive is None:
            return
        await run_runtime(["rm", "--force", self.name], phase=Phase.ABORT, tool="podman")
        args = ["container", "restore", "--import", str(self._final_archive), "--name",
                self.name]
        if self.tcp_established:
            args.append("--tcp-established")
        await run_runtime(args, phase=Phase.ABORT, tool="podman")

    async def _kill(self) -> None:
        self._drop_image()
        # Named volumes stay: they may be shared, and they are the user's to remove.
        await run_runtime(["rm", "--force", "--time", "0", self.name],
                          phase=Phase.COMMIT, tool="podman")
        if self._final_archive is not None:
            self._final_archive.unlink(missing_ok=True)

    def restore_spec(self) -> dict[str, Any]:
        return {"name": self.name, "tcp_established": self.tcp_established}


class _PodmanRestored(Restored):
    def __init__(self, pid: int, *, container_id: str, undo: _Undo | None = None) -> None:
        super().__init__(pid, container_id=container_id)
        # Adopted by a restarted receiver (no undo record): only the container is known.
        self._undo = undo or _Undo(container_id)

    async def resume(self) -> None:
        assert self._id is not None
        await run_runtime(["unpause", self._id], phase=Phase.COMMIT, tool="podman")

    async def discard(self) -> None:
        await self._undo.run()


class _Undo:
    """What a restore added to this host's podman store, removed again on discard: the
    container, the volumes it created and the image it loaded (or only tagged)."""

    def __init__(self, container: str | None = None) -> None:
        self.container = container
        self.volumes: list[str] = []
        self.image: str | None = None
        self.tag: str | None = None

    async def run(self) -> None:
        with anyio.CancelScope(shield=True):
            steps = ([["rm", "--force", "--time", "0", self.container]] if self.container
                     else [])
            steps += [["volume", "rm", "--force", v] for v in self.volumes]
            if self.image is not None:
                steps.append(["rmi", "--force", self.image])
            elif self.tag is not None:
                steps.append(["untag", self.tag])
            for step in steps:
                with contextlib.suppress(CtliveError):
                    await run_runtime(step, phase=Phase.ABORT, tool="podman")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_METADATA = 16 << 20
# config.dump: host paths podman writes to (logs, pid files, its per-container dirs).
_HOST_FILES = ("logPath", "conmonPidFile", "pid_file", "staticDir", "ShmDir", "secretsPath")
# config.dump: namespaces shared with another container of this host.
_SHARED_NS = ("IPCNsCtr", "MountNsCtr", "NetNsCtr", "PIDNsCtr", "UserNsCtr", "UTSNsCtr",
              "CgroupNsCtr")
_storage: tuple[str, ...] | None = None


def podman_restore_name(spec: dict[str, Any]) -> str:
    """The container name of a podman restore spec (``{"name": ..., "tcp_established":
    ...}``, a podman name that cannot be read as an option), or a
    :class:`~ctlive.errors.RestoreSpecError`."""
    checks.only_keys(spec, ("name", "tcp_established"), "")
    if "tcp_established" in spec:
        checks.boolean(spec["tcp_established"], "tcp_established")
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


def _image_facts(images_dir: pathlib.Path) -> tuple[str | None, str | None, list[str]]:
    """config.dump's image id and name (checked), and the named volumes it lists."""
    config = _metadata(images_dir, "config.dump")
    image_id = config.get("rootfsImageID") or None
    if image_id is not None:
        image_id = checks.string(image_id, "config.dump.rootfsImageID", pattern=_ID)
    name = config.get("rootfsImageName") or None
    if name is not None:
        name = checks.string(name, "config.dump.rootfsImageName", max_len=255, pattern=_REF)
    vols = []
    for i, v in enumerate(config.get("namedVolumes") or []):
        field = f"config.dump.namedVolumes[{i}].volumeName"
        vols.append(checks.string(checks.obj(v, field).get("volumeName"), field, max_len=128,
                                  pattern=_NAME))
    return image_id, name, vols


async def _ensure_image(images_dir: pathlib.Path, image_id: str | None, name: str | None,
                        undo: _Undo) -> None:
    """Load the carried base image unless this host has that id already (then its copy
    is not even read), checked against its digest before and after ``podman load``; tag
    it with the name config.dump gives when that name is missing (podman's restore would
    try to pull it)."""
    carried = archive.image_file(images_dir)
    if carried is not None and carried[1] != image_id:
        checks.refuse("image", f"the carried image {carried[1][:12]} is not the container's "
                               f"({str(image_id)[:12]})")
    if image_id is None:
        return
    if not await _podman_ok(["image", "exists", image_id]):
        if carried is None:
            return  # podman pulls it, as its own pull policy says
        await anyio.to_thread.run_sync(archive.check_image, carried[0], image_id)
        undo.image = image_id  # from here on a discard removes it
        await run_runtime(["load", "--quiet", "--input", str(carried[0])], phase=Phase.RESTORE,
                          tool="podman")
        got = await run_runtime(["image", "inspect", "--format", "{{.Id}}", image_id],
                                phase=Phase.RESTORE, tool="podman")
        if got.strip().removeprefix("sha256:") != image_id:
            checks.refuse("image", f"podman loaded another image than {image_id[:12]}")
    if name is not None and not await _podman_ok(["image", "exists", name]):
        await run_runtime(["tag", image_id, name], phase=Phase.RESTORE, tool="podman")
        undo.tag = name


async def restore_podman(images_dir: pathlib.Path, spec: dict[str, Any],
                         external_map: dict[str, str], policy: RestorePolicy) -> Restored:
    """Restore a podman container from the rebuilt archive (once :func:`podman_restore_name`
    and :func:`check_podman_archive` passed, and every member of the archive and the
    carried image were checked), then pause it at once. A failure, like a later
    discard, removes what the restore added to the store: container, volumes, image."""
    name = podman_restore_name(spec)
    check_podman_archive(images_dir, policy, storage=await _podman_storage(),
                         store=policy.store_for(images_dir.parent.parent))
    carried = await anyio.to_thread.run_sync(
        lambda: archive.check_members(images_dir, allow_devices=policy.allow_devices))
    image_id, image_name, named = _image_facts(images_dir)
    undo = _Undo()
    rebuilt = images_dir.parent / "restore.tar"
    try:
        for vol in named:
            if not await _podman_ok(["volume", "exists", vol]):
                undo.volumes.append(vol)  # podman's restore creates it
            elif vol in carried:
                checks.refuse(f"volumes.{vol}", f"volume {vol} exists on this receiver: the "
                                                "carried one would be unpacked over it")
        await _ensure_image(images_dir, image_id, image_name, undo)
        await anyio.to_thread.run_sync(archive.unflatten, images_dir, rebuilt)
        new_name = f"{name}-{images_dir.parent.name[:8]}"
        args = ["container", "restore", "--import", str(rebuilt), "--name", new_name]
        if spec.get("tcp_established"):
            args.append("--tcp-established")
        undo.container = new_name
        await run_runtime(args, phase=Phase.RESTORE, tool="podman")
        # Not atomic: the container runs for the moment between restore and pause.
        await run_runtime(["pause", new_name], phase=Phase.RESTORE, tool="podman")
        pid = int((await run_runtime(["inspect", new_name, "--format", "{{.State.Pid}}"],
                                     phase=Phase.RESTORE, tool="podman")).strip())
    except BaseException:
        await undo.run()
        raise
    finally:
        # Podman holds its own copy now: wipe ours at once.
        rebuilt.unlink(missing_ok=True)
        if (img := archive.image_file(images_dir)) is not None:
            img[0].unlink(missing_ok=True)
    return _PodmanRestored(pid, container_id=new_name, undo=undo)
