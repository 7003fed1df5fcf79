"""What a podman restore adds to the destination's store (the base image, its tag,
volumes, the container, a rebuilt network namespace), so that a discard removes exactly
that; the store's facts a source asks for (``podman_images``); and the check that the
store keeps nothing in plaintext on a disk (:func:`check_at_rest`)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess

import anyio
import attrs

import ctlive.backends.podman_archive as archive
import ctlive.backends.restore as checks
from ctlive.backends import netns
from ctlive.backends.criu import run_runtime
from ctlive.errors import CtliveError, DataAtRestError, Phase
from ctlive.migration.spool import fstype, private_at_rest

__all__ = ["RECORD", "StoreState", "Undo", "check_at_rest", "ensure_image", "podman_images",
           "storage_roots", "store_state", "thaw"]

IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_OR_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
RECORD = "ctlive-undo.json"
"""The file of an :class:`Undo` record in a restored container's directory of podman's
store."""


def podman_images() -> list[str]:
    """The ids (sha256 hex of their config) of every image in this host's podman store
    (blocking): the destination's ``podman_images`` preflight fact, so that a source sends
    an image only when it is missing. Empty when podman is not installed."""
    try:
        proc = subprocess.run(["podman", "images", "--all", "--quiet", "--no-trunc"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    ids = {line.strip().removeprefix("sha256:") for line in proc.stdout.split()}
    with contextlib.suppress(CtliveError, OSError, subprocess.SubprocessError):
        _ask_roots()  # at the session's start: no podman info in a restore's downtime
    return sorted(i for i in ids if IMAGE_ID.match(i))


_ROOTS: dict[str | None, tuple[str, ...]] = {}
_INFO = ["podman", "info", "--format", "{{.Store.GraphRoot}}\n{{.Store.RunRoot}}"]


def _roots_key() -> str | None:
    return os.environ.get("CONTAINERS_STORAGE_CONF")  # what podman's storage.conf can be


def _parse_roots(out: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def _ask_roots() -> tuple[str, ...]:
    """:func:`storage_roots`, blocking (the preflight's worker thread warms it)."""
    key = _roots_key()
    if key not in _ROOTS:
        proc = subprocess.run(_INFO, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        if proc.returncode != 0:
            raise CtliveError(f"podman info failed: {proc.stderr.strip()[-300:]}")
        _ROOTS[key] = _parse_roots(proc.stdout)
    return _ROOTS[key]


async def storage_roots() -> tuple[str, ...]:
    """Podman's graph root and run root here, asked of ``podman info`` once per
    ``CONTAINERS_STORAGE_CONF`` (a receiver's preflight answer asks already)."""
    key = _roots_key()
    if key not in _ROOTS:
        _ROOTS[key] = _parse_roots(await run_runtime(_INFO[1:], phase=Phase.RESTORE,
                                                     tool="podman"))
    return _ROOTS[key]


def check_at_rest(roots: tuple[str, ...]) -> None:
    """Refuse (:class:`~ctlive.errors.DataAtRestError`) podman's graph root or run root
    (``roots``) unless it is memory, a dm-crypt filesystem, or inside this receiver's open
    encrypted spool, the rule of its state directory
    (:func:`~ctlive.migration.spool.check_state_dir`): the restored container's files and
    the checkpoint podman unpacks there would otherwise rest in plaintext on a disk."""
    for what, root in zip(("graphroot", "runroot"), roots, strict=False):
        if not private_at_rest(root):
            raise DataAtRestError(
                f"podman's {what} {root} is on a disk-backed filesystem ({fstype(root)}): the "
                "restored container's files and podman's unpacked checkpoint (the workload's "
                "memory images) would be plaintext on disk. Give the receiver a podman "
                "storage.conf with graphroot and runroot on a tmpfs (CONTAINERS_STORAGE_CONF="
                "FILE; e.g. graphroot = \"/run/ctlive-podman/storage\", runroot = "
                "\"/run/ctlive-podman/run\", /run a tmpfs), in its encrypted spool, or on a "
                "dm-crypt (LUKS) filesystem", phase=Phase.RESTORE)


class Undo:
    """What a restore added to this host's podman store, removed again on discard: the
    container, the network namespace it rebuilt, the volumes it created and the image it
    loaded (or only tagged)."""

    def __init__(self, container: str | None = None) -> None:
        self.container = container
        self.volumes: list[str] = []
        self.image: str | None = None
        self.tag: str | None = None
        self.netns: netns.Namespace | None = None
        self.record: pathlib.Path | None = None  # where save() kept it

    def save(self, static_dir: str) -> None:
        """Keep this record in the container's own directory of podman's store (gone with
        the container), so that a restarted receiver that adopts the copy can still
        discard all of it."""
        record = {"volumes": self.volumes, "image": self.image, "tag": self.tag,
                  "netns": self.netns.as_dict() if self.netns is not None else None}
        self.record = pathlib.Path(static_dir) / RECORD
        checks.write_private(self.record, json.dumps(record))

    @classmethod
    async def of(cls, container: str) -> Undo:
        """The record :meth:`save` kept for ``container`` (only the container if none)."""
        undo = cls(container)
        with contextlib.suppress(CtliveError, OSError, ValueError, TypeError, AttributeError):
            where = await run_runtime(["container", "inspect", "--format", "{{.StaticDir}}",
                                       container], phase=Phase.ABORT, tool="podman")
            undo.record = pathlib.Path(where.strip()) / RECORD
            data = json.loads(undo.record.read_text())
            undo.volumes = [v for v in data["volumes"] if isinstance(v, str) and _NAME.match(v)]
            for key in ("image", "tag"):
                if isinstance(data[key], str) and NAME_OR_REF.match(data[key]):
                    setattr(undo, key, data[key])
            if data["netns"] is not None:
                undo.netns = netns.parse(data["netns"])
        return undo

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
            if self.netns is not None:
                await netns.remove(self.netns)




@attrs.frozen
class StoreState:
    """What this host's podman store holds, listed once per restore (every podman command
    costs 30-200 ms here, and the restore runs while the workload is down)."""

    volumes: frozenset[str]
    containers: frozenset[str]
    """Names."""
    container_ids: frozenset[str]
    images: frozenset[str]
    """Image ids (sha256 hex)."""
    names: frozenset[str]
    """``repository:tag`` of every tagged image."""


async def store_state() -> StoreState:
    """List volumes, containers and images, the three at once."""
    out: dict[str, str] = {}

    async def ask(key: str, *args: str) -> None:
        out[key] = await run_runtime(list(args), phase=Phase.RESTORE, tool="podman")

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "volumes", "volume", "ls", "--format", "{{.Name}}")
        tg.start_soon(ask, "containers", "ps", "--all", "--no-trunc", "--format",
                      "{{.ID}} {{.Names}}")
        tg.start_soon(ask, "images", "images", "--all", "--no-trunc", "--format",
                      "{{.ID}} {{.Repository}}:{{.Tag}}")
    images = [line.split() for line in out["images"].splitlines() if line.strip()]
    ctrs = [line.split() for line in out["containers"].splitlines() if line.strip()]
    return StoreState(frozenset(out["volumes"].split()),
                      frozenset(c[1] for c in ctrs if len(c) > 1), frozenset(c[0] for c in ctrs),
                      frozenset(i[0].removeprefix("sha256:") for i in images),
                      frozenset(i[1] for i in images if len(i) > 1 and "<none>" not in i[1]))


async def ensure_image(images_dir: pathlib.Path, image_id: str | None, name: str | None,
                       undo: Undo, state: StoreState) -> None:
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
    if image_id not in state.images:
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
    if name is not None and name not in state.names:
        await run_runtime(["tag", image_id, name], phase=Phase.RESTORE, tool="podman")
        undo.tag = name


def thaw(container_id: str) -> bool:
    """Thaw and remove the cgroups a checkpointed container left frozen (CRIU froze them
    for the dump; podman may not have removed them yet, and runc then refuses to restore
    into them). Whether there was one."""
    found = False
    for root in (pathlib.Path("/sys/fs/cgroup/freezer"), pathlib.Path("/sys/fs/cgroup")):
        for d in root.glob(f"*/libpod-{container_id}*"):
            for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                with contextlib.suppress(OSError):
                    (d / name).write_text(value)
                    found = True
            with contextlib.suppress(OSError):
                d.rmdir()
    return found
