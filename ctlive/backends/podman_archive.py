"""The files of a podman checkpoint archive as ctlive carries them.

The source flattens the archive into one directory for the image diff: CRIU's images of
``checkpoint/`` keep their names, every other member gets the ``podman+`` prefix with
its ``/`` as ``+`` (``volumes/data.tar`` is ``podman+volumes+data.tar``), and the
container's base image, when it travels, is ``podman-image+<image id>.tar`` (a
``podman image save --format docker-archive``). The destination checks all of it as
untrusted input before podman sees any of it: member names and kinds, the tars inside
(no absolute names, no ``..``, nothing through a symlink, no devices), the JSON lists, and
the image against its digest (the config's sha256 is the image id, each layer's sha256 its
``diff_id``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import tarfile
from typing import Any

import ctlive.backends.restore as checks
from ctlive.errors import CheckpointError, Phase

__all__ = [
    "IMAGE_PREFIX",
    "TOP",
    "check_image",
    "check_members",
    "flatten",
    "image_file",
    "unflatten",
]

TOP = "podman+"
"""Prefix of the archive's own files (all but ``checkpoint/``) in a flattened directory."""
IMAGE_PREFIX = "podman-image+"
"""Prefix of the base image in a flattened directory (then the image id and ``.tar``)."""

# The members podman's restore reads (podman 4: libpod/container_internal_linux.go,
# pkg/checkpoint/crutils) besides checkpoint/: anything else is refused at the destination.
_KNOWN = frozenset({"config.dump", "spec.dump", "status.dump", "network.status", "stats-dump",
                    "rootfs-diff.tar", "deleted.files", "devshm-checkpoint.tar",
                    "bind.mounts", "ctr.log"})
_VOLUME = re.compile(r"^volumes/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})\.tar$")
_IMAGE = re.compile(r"^podman-image\+([0-9a-f]{64})\.tar$")
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_MEMBERS = 1 << 18
_MAX_LIST = 1 << 16
_MAX_JSON = 16 << 20


def _member_name(name: str) -> str:
    """An archive member's flattened file name (CheckpointError if ctlive cannot carry it)."""
    if name.startswith("checkpoint/"):
        rest = name.removeprefix("checkpoint/")
        if _PLAIN.match(rest):
            return rest
    elif name in _KNOWN or _VOLUME.match(name) or _PLAIN.match(name):
        return TOP + name.replace("/", "+")
    raise CheckpointError(f"the podman archive has a member ctlive cannot carry: {name[:120]!r}",
                          phase=Phase.ITERATE)


def flatten(archive: pathlib.Path, out: pathlib.Path) -> None:
    """Write every file of podman's export ``archive`` into ``out`` under its flattened
    name (directories are implied; a member that is neither is a CheckpointError)."""
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if m.isdir():
                continue
            if not m.isfile():
                raise CheckpointError(f"the podman archive's member {name[:120]!r} is not a "
                                      "regular file", phase=Phase.ITERATE)
            src = tar.extractfile(m)
            assert src is not None
            with src, open(out / _member_name(name), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def unflatten(flat: pathlib.Path, archive: pathlib.Path) -> None:
    """Rebuild podman's archive from the flattened directory ``flat`` (checked by
    :func:`check_members`): the base image stays out, it is loaded on its own."""
    with tarfile.open(archive, "w") as tar:
        for d in ("checkpoint", "artifacts", "volumes"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for p in sorted(flat.iterdir()):
            if not p.is_file() or p.name.endswith(".log") or p.name.startswith(IMAGE_PREFIX):
                continue
            name = (p.name[len(TOP):].replace("+", "/") if p.name.startswith(TOP)
                    else f"checkpoint/{p.name}")
            tar.add(p, arcname=name)


def image_file(images_dir: pathlib.Path) -> tuple[pathlib.Path, str] | None:
    """The base image a flattened directory carries and its id, if any."""
    for p in images_dir.iterdir():
        if m := _IMAGE.match(p.name):
            return p, m.group(1)
    return None


def check_members(images_dir: pathlib.Path, *, allow_devices: bool) -> list[str]:
    """Refuse (RestoreSpecError) a flattened archive with members podman's restore does
    not read, more than one image, malformed tars or lists; returns the volume names."""
    volumes, images = [], 0
    for p in sorted(images_dir.iterdir()):
        field = f"archive.{p.name}"
        if p.name.startswith(IMAGE_PREFIX):
            images += 1
            if not _IMAGE.match(p.name) or images > 1:
                checks.refuse(field, f"{p.name[:120]!r} is not one image named by its id")
            continue
        if not p.name.startswith(TOP):
            continue  # CRIU's own images: plain names, checked by the change stream
        member = p.name[len(TOP):].replace("+", "/")
        vol = _VOLUME.match(member)
        if member not in _KNOWN and vol is None:
            checks.refuse(field, f"the podman archive has a member podman's restore does not "
                                 f"read: {member[:120]!r}")
        if vol is not None:
            volumes.append(vol.group(1))
        if member.endswith(".tar"):
            check_tar(p, field, allow_devices=allow_devices)
        elif member in ("deleted.files", "bind.mounts"):
            _check_paths(p, field)
    return volumes


def _clean(name: str, field: str) -> str:
    n = name.removeprefix("./")
    if n.startswith("/") or ".." in n.split("/") or "\0" in n or len(n) > 4096:
        checks.refuse(field, f"{field} has a member {name[:120]!r} that climbs out of its "
                             "directory (absolute, or '..')")
    return n.rstrip("/")


def check_tar(path: pathlib.Path, field: str, *, allow_devices: bool) -> None:
    """Refuse a tar that is compressed or malformed, has too many members, names outside
    its root, writes through a symlink it made, links outside itself, or holds devices
    (only overlay whiteouts, 0:0, unless ``allow_devices``)."""
    links: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for i, m in enumerate(tar):
                if i >= _MAX_MEMBERS:
                    checks.refuse(field, f"{field} has more than {_MAX_MEMBERS} members")
                name = _clean(m.name, field)
                parts = name.split("/")
                if any("/".join(parts[:k]) in links for k in range(1, len(parts))):
                    checks.refuse(field, f"{field}: {name[:120]!r} is written through a "
                                         "symlink of the same archive")
                if m.issym():
                    links.add(name)
                elif m.islnk():
                    _clean(m.linkname, field)
                elif m.ischr() or m.isblk():
                    whiteout = m.ischr() and (m.devmajor, m.devminor) == (0, 0)
                    if not (allow_devices or whiteout):
                        checks.refuse(field, f"{field}: device node {name[:120]!r} is not "
                                             "allowed on this receiver "
                                             "(RestorePolicy.allow_devices)")
                elif not (m.isfile() or m.isdir() or m.isfifo()):
                    checks.refuse(field, f"{field}: {name[:120]!r} is of an unknown kind")
    except (tarfile.TarError, UnicodeError) as exc:
        checks.refuse(field, f"{field} is not an uncompressed tar: {exc}")


def _check_paths(path: pathlib.Path, field: str) -> None:
    if path.stat().st_size > _MAX_JSON:
        checks.refuse(field, f"{field} is larger than {_MAX_JSON} bytes")
    try:
        data = json.loads(path.read_bytes() or b"null")
    except ValueError:
        checks.refuse(field, f"{field} is not JSON")
    for i, p in enumerate(checks.strings(data or [], field, max_items=_MAX_LIST)):
        if ".." in p.split("/"):
            checks.refuse(f"{field}[{i}]", f"{field}[{i}] {p[:80]!r} climbs out of the "
                                           "container ('..')")


def _sha256(f: Any) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def check_image(path: pathlib.Path, image_id: str, field: str = "image") -> None:
    """Refuse a base image that is not a docker-archive of exactly image ``image_id``:
    its config's sha256 must be the id, and each layer's sha256 the config's ``diff_id``
    (so podman loads only what that digest names); members only files, directories and
    symlinks that stay inside the archive; no tags (the restore tags it)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for i, m in enumerate(tar):
                if i >= _MAX_MEMBERS:
                    checks.refuse(field, f"{field} has more than {_MAX_MEMBERS} members")
                name = _clean(m.name, field)
                if m.issym():
                    target = (pathlib.PurePosixPath(name).parent / m.linkname).as_posix()
                    if m.linkname.startswith("/") or _normal(target) is None:
                        checks.refuse(field, f"{field}: symlink {name[:80]!r} points outside it")
                elif not (m.isfile() or m.isdir()):
                    checks.refuse(field, f"{field}: {name[:80]!r} is not a file or directory")
                members[name] = m

            def read(name: Any, what: str) -> Any:
                m = members.get(name) if isinstance(name, str) else None
                f = tar.extractfile(m) if m is not None and m.isfile() else None
                if f is None:
                    checks.refuse(field, f"{field}: its {what} {str(name)[:80]!r} is missing")
                return f

            with read("manifest.json", "manifest") as f:
                manifest = json.loads(f.read(_MAX_JSON))
            if not (isinstance(manifest, list) and len(manifest) == 1
                    and isinstance(manifest[0], dict)):
                checks.refuse(field, f"{field}: manifest.json must list exactly one image")
            entry = manifest[0]
            if entry.get("RepoTags"):
                checks.refuse(field, f"{field}: the image carries tags")
            with read(entry.get("Config"), "config") as f:
                raw = f.read(_MAX_JSON + 1)
            if len(raw) > _MAX_JSON or hashlib.sha256(raw).hexdigest() != image_id:
                checks.refuse(field, f"{field}: its config is not image {image_id[:12]} (the "
                                     "digest differs)")
            diff_ids = (json.loads(raw).get("rootfs") or {}).get("diff_ids")
            layers = entry.get("Layers")
            if not (isinstance(layers, list) and isinstance(diff_ids, list)
                    and len(layers) == len(diff_ids)):
                checks.refuse(field, f"{field}: its layers do not match its config")
            for layer, want in zip(layers, diff_ids, strict=True):
                with read(layer, "layer") as f:
                    if f"sha256:{_sha256(f)}" != want:
                        checks.refuse(field, f"{field}: layer {str(layer)[:80]!r} does not match "
                                             "its digest in the config")
    except (tarfile.TarError, UnicodeError, ValueError, AttributeError) as exc:
        checks.refuse(field, f"{field} is not a docker-archive: {exc}")


def _normal(path: str) -> str | None:
    out: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not out:
                return None
            out.pop()
        elif part not in ("", "."):
            out.append(part)
    return "/".join(out)
