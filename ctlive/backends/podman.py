"""podman containers: checkpoint archives, flattened so that image diff sees one
directory, and restored from the rebuilt archive."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import anyio

import ctlive.backends.podman_archive as archive
import ctlive.backends.podman_store as store
import ctlive.backends.restore as checks  # the module (the package's `restore` is its function)
from ctlive.backends import netns
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

_TOP = archive.TOP  # tests and callers name flattened metadata files with it


class PodmanContainer(Backend):
    """A podman container, checkpointed with ``podman container checkpoint --export``.

    Iterations use ``--leave-running``. Podman cannot checkpoint a paused container,
    so the final dump stops it and keeps the exported archive; ``resume()`` (the
    abort path) restores the container locally from that archive. Podman's CRIU
    options cannot leave a restore stopped, so the destination pauses the restored
    container immediately (see docs/backends.md for what that window means).

    A container that joins a named network namespace (``--network ns:/run/netns/NAME``)
    keeps its TCP connections: the namespace is described in the restore spec and
    rebuilt at the destination (:mod:`ctlive.backends.netns`), its veths' outer ends go
    down from the final dump on (up again on ``resume()``; ``kill()`` deletes it).
    Podman 4 cannot restore established connections under another name, so such a
    container keeps its name at the destination.

    Every member of the archive travels (the rootfs diff, named volumes, /dev/shm, …),
    and so does the container's base image unless the destination said it has it
    (:meth:`use_destination_facts`). Live-read iterations pre-copy the image and the
    named volumes (``podman volume export``); the final archive brings the rest.
    """

    kind = "podman"

    def __init__(self, name: str, *, live_read: bool = True,
                 tcp_established: bool | None = None) -> None:
        self.name = name
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``podman container checkpoint --leave-running``."""
        self.tcp_established = tcp_established
        """Checkpoint and restore the container's established TCP connections
        (``--tcp-established``); None: when it joins a named network namespace, the only
        case in which they can survive the move."""
        self.destination_images: frozenset[str] | None = None
        """Image ids the destination holds (its ``podman_images`` fact); None: unknown,
        so the image travels and the destination loads it only if it lacks it."""
        self._final_archive: pathlib.Path | None = None
        self._image: pathlib.Path | None = None  # the saved base image, linked into dumps
        self._info: tuple[str, dict[str, str | None], str | None] | None = None
        self._ns: netns.Namespace | None = None  # described at the final dump
        self._netns_name: str | None = None  # "" once known to be none
        self._described: netns.Namespace | None = None  # what the restore spec says

    def use_destination_facts(self, facts: Mapping[str, Any]) -> None:
        """Take what the destination told about itself: with ``podman_images`` (a list of
        image ids), the base image travels only when it is not among them."""
        images = facts.get("podman_images")
        if isinstance(images, list) and all(isinstance(i, str) for i in images):
            self.destination_images = frozenset(images)

    async def _inspect(self, phase: Phase) -> tuple[str, dict[str, str | None], str | None]:
        """The container's image id, its named volumes with the directory of each that
        has one here (podman's ``local`` driver), and its overlay upper directory (the
        rootfs diff; None with another storage driver), asked once."""
        if self._info is None:
            out = await run_runtime(["container", "inspect", "--format",
                                     "{{.Image}}\n{{.GraphDriver.Name}} "
                                     "{{.GraphDriver.Data.UpperDir}}\n{{json .Mounts}}",
                                     self.name], phase=phase, tool="podman")
            image, driver, mounts = [*out.strip().split("\n", 2), "", ""][:3]
            vols = {m["Name"]: m.get("Source") if m.get("Driver") == "local" else None
                    for m in json.loads(mounts or "[]")
                    if m.get("Type") == "volume" and isinstance(m.get("Name"), str)}
            kind, _, upper = driver.strip().partition(" ")
            self._info = (image.strip().removeprefix("sha256:"), vols,
                          upper if kind == "overlay" and upper.startswith("/") else None)
        return self._info

    def _netns(self) -> str | None:
        """The named network namespace the container joins (``ns:/run/netns/NAME``),
        asked once (the container keeps it; the final dump need not ask again)."""
        if self._netns_name is None:
            out = subprocess.run(["podman", "container", "inspect", "--format",
                                  "{{.HostConfig.NetworkMode}}", self.name],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
            mode = out.stdout.strip()
            if out.returncode != 0:
                return None  # gone (or not yet there): ask again next time
            self._netns_name = (netns.netns_name(mode[3:]) or "") if mode[:3] == "ns:" else ""
        return self._netns_name or None

    def _tcp(self) -> bool:
        tcp = self.tcp_established
        return bool(tcp or (tcp is None and self._netns()))

    async def _carry(self, images_dir: pathlib.Path, phase: Phase, *, final: bool) -> None:
        """Add the base image (saved once, then hard-linked: unchanged iterations cost no
        wire bytes) unless the destination has it, and the rootfs diff (the overlay upper
        directory) and each named volume as tars laid out for pre-copy
        (:func:`~ctlive.backends.podman_archive.tree_tar`; they replace the archive's own in
        the final dump, so the diff finds what the iterations sent)."""
        image, names, upper = await self._inspect(phase)
        if store.IMAGE_ID.match(image) and (self.destination_images is None
                                 or image not in self.destination_images):
            if self._image is None:
                saved = images_dir.parent / f"podman-image-{image[:12]}.tar"
                saved.unlink(missing_ok=True)  # podman refuses to overwrite an archive
                await run_runtime(["image", "save", "--format", "docker-archive", "--output",
                                   str(saved), image], phase=phase, tool="podman")
                self._image = saved
            os.link(self._image, images_dir / f"{archive.IMAGE_PREFIX}{image}.tar")
        if upper is not None and os.path.isdir(upper):  # else: podman's, in the final dump
            await anyio.to_thread.run_sync(lambda: archive.tree_tar(
                pathlib.Path(upper), images_dir, "rootfs-diff.tar", overlay=True))
        for vol, where in names.items():
            member = f"volumes/{vol}.tar"
            if where is not None and os.path.isdir(where):
                await anyio.to_thread.run_sync(archive.tree_tar, pathlib.Path(where),
                                               images_dir, member)
            elif not final:  # not a directory here: podman's own export, the archive's last
                out = images_dir.parent / f"volume-{vol}.tar"
                await run_runtime(["volume", "export", "--output", str(out), vol],
                                  phase=phase, tool="podman")
                await anyio.to_thread.run_sync(archive.split_member, out, images_dir, member)

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
            await self._carry(images_dir, phase, final=False)
            return res
        await self._inspect(phase)  # while the container still exists
        tcp, name = self._tcp(), self._netns()
        if final and name:
            # Podman's checkpoint ends the container, and with it the sockets that hold
            # the connections: keep the client's packets (and so its resets) off it.
            self._ns = self._described or netns.describe(name)  # as the spec says
            await netns.set_links(self._ns, up=False)
        archive_path = images_dir.parent / f"{images_dir.name}.tar"
        t = time.monotonic()
        args = ["container", "checkpoint", "--export", str(archive_path), "--compress", "none"]
        if not final:
            args.append("--leave-running")
        if tcp:
            args.append("--tcp-established")
        await run_runtime([*args, self.name], phase=phase, tool="podman")
        duration = time.monotonic() - t
        if final:
            self._final_archive = archive_path
        await anyio.to_thread.run_sync(archive.flatten, archive_path, images_dir)
        if not final:
            archive_path.unlink()
        await self._carry(images_dir, phase, final=final)
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
        tcp = self._tcp()
        cid = (await run_runtime(["container", "inspect", "--format", "{{.Id}}", self.name],
                                 phase=Phase.ABORT, tool="podman")).strip()
        await run_runtime(["rm", "--force", self.name], phase=Phase.ABORT, tool="podman")
        # The named volumes are still here, as the checkpoint left them.
        args = ["container", "restore", "--import", str(self._final_archive), "--ignore-volumes"]
        # Podman restores established connections only under the archive's own name.
        args += ["--tcp-established"] if tcp else ["--name", self.name]
        try:
            await run_runtime(args, phase=Phase.ABORT, tool="podman")
        except CtliveError as exc:
            # Seen here once: "container's cgroup unexpectedly frozen" (the dump's freezer
            # cgroup not yet removed by podman's cleanup); thaw it and try once more.
            if "frozen" not in str(exc):
                raise
            await anyio.to_thread.run_sync(store.thaw, cid)
            await anyio.sleep(0.5)
            await run_runtime(["rm", "--force", "--ignore", self.name], phase=Phase.ABORT,
                              tool="podman")
            await run_runtime(args, phase=Phase.ABORT, tool="podman")
        if self._ns is not None:
            await netns.set_links(self._ns, up=True, phase=Phase.ABORT)

    async def _kill(self) -> None:
        self._drop_image()
        # Named volumes stay: they may be shared, and they are the user's to remove.
        await run_runtime(["rm", "--force", "--time", "0", self.name],
                          phase=Phase.COMMIT, tool="podman")
        if self._final_archive is not None:
            self._final_archive.unlink(missing_ok=True)
        if self._ns is not None:  # the copy at the destination owns its addresses now
            await netns.remove(self._ns)

    def restore_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "tcp_established": self._tcp()}
        name = self._netns()
        if name:
            self._described = netns.describe(name)
            spec["network"] = self._described.as_dict()
        return spec


class _PodmanRestored(Restored):
    """A podman container restored and paused: resuming it unpauses it and announces
    its addresses; discarding it removes what its restore added (:class:`_Undo`)."""

    def __init__(self, pid: int, *, container_id: str, undo: store.Undo | None = None) -> None:
        super().__init__(pid, container_id=container_id)
        # None: adopted by a restarted receiver; the record is read from podman's store.
        self._undo = undo

    async def _record(self) -> store.Undo:
        if self._undo is None:
            assert self._id is not None
            self._undo = await store.Undo.of(self._id)
        return self._undo

    async def resume(self) -> None:
        assert self._id is not None
        undo = await self._record()
        await run_runtime(["unpause", self._id], phase=Phase.COMMIT, tool="podman")
        if undo.netns is not None:  # traffic may come here now: the source is gone
            await netns.announce(undo.netns)
        if undo.record is not None:  # committed: nothing will be undone
            undo.record.unlink(missing_ok=True)

    async def discard(self) -> None:
        await (await self._record()).run()


_MAX_METADATA = 16 << 20
# config.dump: host paths podman writes to (logs, pid files, its per-container dirs).
_HOST_FILES = ("logPath", "conmonPidFile", "pid_file", "staticDir", "ShmDir", "secretsPath")
# config.dump: namespaces shared with another container of this host.
_SHARED_NS = ("IPCNsCtr", "MountNsCtr", "NetNsCtr", "PIDNsCtr", "UserNsCtr", "UTSNsCtr",
              "CgroupNsCtr")


def podman_restore_name(spec: dict[str, Any]) -> str:
    """The container name of a podman restore spec (``{"name": ..., "tcp_established":
    ...}``, a podman name that cannot be read as an option), or a
    :class:`~ctlive.errors.RestoreSpecError`."""
    checks.only_keys(spec, ("name", "tcp_established", "network"), "")
    if "tcp_established" in spec:
        checks.boolean(spec["tcp_established"], "tcp_established")
    if spec.get("network") is not None:
        netns.parse(spec["network"])
    return checks.string(spec.get("name"), "name", max_len=64, pattern=checks.NAME)


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
                         storage: tuple[str, ...], store: pathlib.Path,
                         own_netns: str | None = None) -> None:
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
    # (``own_netns``: the named namespace this receiver rebuilt from the spec.)
    ns_paths: tuple[str, ...] = ("/run/netns",) if config.get("createNetNS") is True else ()
    ns_paths += (own_netns,) if own_netns else ()
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
        checks.check_namespaces(linux, policy, where, runtime_paths=ns_paths)
        if policy.no_new_privileges:
            oci["process"] = dict(process, noNewPrivileges=True)
    if policy.no_new_privileges:
        for name, data in (("spec.dump", spec), ("config.dump", config)):
            checks.write_private(images_dir / (_TOP + name), json.dumps(data))


def _image_facts(images_dir: pathlib.Path
                 ) -> tuple[str | None, str | None, list[str], str | None]:
    """config.dump's image id and name (checked), the named volumes it lists, and the
    source container's id."""
    config = _metadata(images_dir, "config.dump")
    image_id = config.get("rootfsImageID") or None
    if image_id is not None:
        image_id = checks.string(image_id, "config.dump.rootfsImageID", pattern=store.IMAGE_ID)
    name = config.get("rootfsImageName") or None
    if name is not None:
        name = checks.string(name, "config.dump.rootfsImageName", max_len=255,
                             pattern=store.NAME_OR_REF)
    vols = []
    for i, v in enumerate(config.get("namedVolumes") or []):
        field = f"config.dump.namedVolumes[{i}].volumeName"
        vols.append(checks.string(checks.obj(v, field).get("volumeName"), field, max_len=128,
                                  pattern=checks.NAME))
    source_id = config.get("id") if isinstance(config.get("id"), str) else None
    return image_id, name, vols, source_id


async def restore_podman(images_dir: pathlib.Path, spec: dict[str, Any],
                         external_map: dict[str, str], policy: RestorePolicy) -> Restored:
    """Restore a podman container from the rebuilt archive (once :func:`podman_restore_name`
    and :func:`check_podman_archive` passed, and every member of the archive and the
    carried image were checked), then pause it at once. A failure, like a later
    discard, removes what the restore added to the store: container, volumes, image.
    Before anything is written, podman's store must keep nothing in plaintext on a disk
    (:func:`~ctlive.backends.podman_store.check_at_rest`)."""
    storage = await store.storage_roots()  # asked once (already at the preflight)
    store.check_at_rest(storage)
    name = podman_restore_name(spec)
    net = netns.parse(spec["network"]) if spec.get("network") is not None else None
    check_podman_archive(images_dir, policy, storage=storage,
                         store=policy.store_for(images_dir.parent.parent),
                         own_netns=f"{netns.NETNS_DIR}/{net.name}" if net else None)
    carried = await anyio.to_thread.run_sync(
        lambda: archive.check_members(images_dir, allow_devices=policy.allow_devices))
    image_id, image_name, named, source_id = _image_facts(images_dir)
    undo = store.Undo()
    rebuilt = images_dir.parent / "restore.tar"
    try:
        state = await store.store_state()
        # The source's own container in this store: one host, and its volumes are the
        # very ones the archive carries (they stay as they are).
        same_store = source_id in state.container_ids
        for vol in named:
            if vol not in state.volumes:
                undo.volumes.append(vol)  # podman's restore creates it
            elif vol in carried and not same_store:
                checks.refuse(f"volumes.{vol}", f"volume {vol} exists on this receiver: the "
                                                "carried one would be unpacked over it")
        # Podman 4 restores established connections only under the archive's own name.
        tcp = bool(spec.get("tcp_established"))
        new_name = name if tcp else f"{name}-{images_dir.parent.name[:8]}"
        if new_name in state.containers:
            checks.refuse("name", f"a container named {new_name} exists on this receiver")
        await store.ensure_image(images_dir, image_id, image_name, undo, state)
        await anyio.to_thread.run_sync(archive.unflatten, images_dir, rebuilt)
        args = ["container", "restore", "--import", str(rebuilt)]
        args += ["--tcp-established"] if tcp else ["--name", new_name]
        args += ["--ignore-volumes"] if same_store else []
        if net is not None:  # before the restore: CRIU reconnects the sockets inside it
            await netns.rebuild(net, policy.bridge_for)
            undo.netns = net
        undo.container = new_name
        await run_runtime(args, phase=Phase.RESTORE, tool="podman")
        # Not atomic: the container runs for the moment between restore and pause.
        await run_runtime(["pause", new_name], phase=Phase.RESTORE, tool="podman")
        pid, _, static_dir = (await run_runtime(
            ["inspect", new_name, "--format", "{{.State.Pid}} {{.StaticDir}}"],
            phase=Phase.RESTORE, tool="podman")).strip().partition(" ")
        await anyio.to_thread.run_sync(undo.save, static_dir)
    except BaseException:
        await undo.run()
        raise
    finally:
        # Podman holds its own copy now: wipe ours at once.
        rebuilt.unlink(missing_ok=True)
        if (img := archive.image_file(images_dir)) is not None:
            img[0].unlink(missing_ok=True)
    return _PodmanRestored(int(pid), container_id=new_name, undo=undo)
