"""The files of a podman checkpoint archive as ctlive carries them.

The source flattens the archive into one directory for the image diff: CRIU's images of
``checkpoint/`` keep their names, every other member gets the ``podman+`` prefix with
its ``/`` as ``+`` (``network.status`` is ``podman+network.status``), the tars that
change while the container runs (the rootfs diff and each named volume's) are cut in
chunks of 4 MiB (``volumes/data.tar`` is ``podman+volumes+data.tar+00000``, ``+00001``,
…: the diff sends a file that changed whole, or as a zstd delta when at most 8 MiB, so an
unchanged chunk costs nothing and a changed one a delta), and the
container's base image, when it travels, is ``podman-image+<image id>.tar`` (a
``podman image save --format docker-archive``). The destination checks all of it as
untrusted input before podman sees any of it: member names and kinds, the tars inside
(no absolute names, no ``..``, nothing through a symlink, no devices), the JSON lists, and
the image against its digest (the config's sha256 is the image id, each layer's sha256 its
``diff_id``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import tarfile
from typing import Any, BinaryIO

import ctlive.backends.restore as checks
from ctlive.errors import CheckpointError, Phase
from ctlive.images.changes import MAX_PART

__all__ = [
    "CHUNK",
    "IMAGE_PREFIX",
    "TOP",
    "check_image",
    "check_members",
    "flatten",
    "image_file",
    "split_member",
    "tree_tar",
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
_CHUNK = re.compile(r"^podman\+(volumes\+[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.tar|rootfs-diff\.tar)"
                    r"\+([0-9]{5})$")
CHUNK = MAX_PART
"""Bytes of a volume tar's chunk (all but the last): the change stream's largest part."""
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


def _chunked(member: str) -> bool:
    return member == "rootfs-diff.tar" or _VOLUME.match(member) is not None


class ChunkWriter:
    """A file written as the chunks of archive member ``member`` (``rootfs-diff.tar``,
    ``volumes/NAME.tar``) in directory ``out`` (its old chunks are removed first)."""

    def __init__(self, out: pathlib.Path, member: str) -> None:
        self.out, self.index, self.room = out, 0, 0
        self.prefix = TOP + member.replace("/", "+") + "+"
        for old in out.glob(f"{self.prefix}*"):
            old.unlink()
        self.f: Any = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.room == 0:
                self._next()
            n = min(self.room, len(view))
            self.f.write(view[:n])
            view, self.room = view[n:], self.room - n
        return len(data)

    def _next(self) -> None:
        if self.f is not None:
            self.f.close()
        # Held open across write() calls, closed by the next chunk or close().
        self.f = open(self.out / f"{self.prefix}{self.index:05d}", "wb")  # noqa: SIM115
        self.index, self.room = self.index + 1, CHUNK

    def close(self) -> None:
        if self.f is None:
            self._next()  # an empty tar is still one (empty) chunk
        self.f.close()


class _Chunks:
    """The chunk files ``paths`` read as one file."""

    def __init__(self, paths: list[pathlib.Path]) -> None:
        self.paths = list(paths)
        self.f: BinaryIO | None = None

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self.f is None:
                if not self.paths:
                    break
                self.f = open(self.paths.pop(0), "rb")  # noqa: SIM115 (across read() calls)
            data = self.f.read(-1 if size < 0 else size - len(out))
            if not data:
                self.f.close()
                self.f = None
            out += data
        return bytes(out)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def flatten(archive: pathlib.Path, out: pathlib.Path) -> None:
    """Write every file of podman's export ``archive`` into ``out`` under its flattened
    name, the rootfs diff and volume tars in chunks (directories are implied; a member
    that is neither is a CheckpointError)."""
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if m.isdir():
                continue
            if not m.isfile():
                raise CheckpointError(f"the podman archive's member {name[:120]!r} is not a "
                                      "regular file", phase=Phase.ITERATE)
            flat = _member_name(name)
            src = tar.extractfile(m)
            assert src is not None
            with src, contextlib.closing(ChunkWriter(out, name)) if _chunked(name) else \
                    open(out / flat, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def split_member(tar: pathlib.Path, out: pathlib.Path, member: str) -> None:
    """Cut ``tar`` into the chunks of archive member ``member`` in ``out``, then delete it."""
    with open(tar, "rb") as src, contextlib.closing(ChunkWriter(out, member)) as dst:
        while data := src.read(1 << 20):
            dst.write(data)
    tar.unlink()


def _chunks(flat: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Archive member -> its chunk files, in order."""
    members: dict[str, list[tuple[int, pathlib.Path]]] = {}
    for p in flat.iterdir():
        if m := _CHUNK.match(p.name):
            members.setdefault(m.group(1).replace("+", "/"), []).append((int(m.group(2)), p))
    return {v: [p for _, p in sorted(c)] for v, c in sorted(members.items())}


def unflatten(flat: pathlib.Path, archive: pathlib.Path) -> None:
    """Rebuild podman's archive from the flattened directory ``flat`` (checked by
    :func:`check_members`): the base image stays out, it is loaded on its own."""
    with tarfile.open(archive, "w") as tar:
        for d in ("checkpoint", "artifacts", "volumes"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for member, chunks in _chunks(flat).items():
            info = tarfile.TarInfo(member)
            info.size, info.mode = sum(c.stat().st_size for c in chunks), 0o600
            tar.addfile(info, _Chunks(chunks))
        for p in sorted(flat.iterdir()):
            if not p.is_file() or p.name.endswith(".log") or p.name.startswith(IMAGE_PREFIX) \
                    or _CHUNK.match(p.name):
                continue
            name = (p.name[len(TOP):].replace("+", "/") if p.name.startswith(TOP)
                    else f"checkpoint/{p.name}")
            tar.add(p, arcname=name)


class _Exactly:
    """``n`` bytes of ``f``: a file that shrank while it was read is padded with zeros
    (a pre-copy tar need not be consistent: the final one, of a stopped container, is)."""

    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        want = self.left if size < 0 else min(size, self.left)
        data = self.f.read(want)
        data += bytes(want - len(data))
        self.left -= want
        return bytes(data)


def _xattrs(path: pathlib.Path, overlay: bool) -> dict[str, str]:
    """``path``'s extended attributes as PAX records (values as raw bytes), without
    overlayfs' own (``trusted.overlay.*``) for an overlay upper directory."""
    out = {}
    with contextlib.suppress(OSError):
        for name in os.listxattr(path, follow_symlinks=False):
            if overlay and name.startswith("trusted.overlay."):
                continue
            with contextlib.suppress(OSError):
                value = os.getxattr(path, name, follow_symlinks=False)
                out[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return out


def tree_tar(root: pathlib.Path, out: pathlib.Path, member: str, *,
             overlay: bool = False) -> None:
    """The chunks (in ``out``) of archive member ``member``, a tar of directory ``root`` (a
    volume's, or with ``overlay`` the container's overlay upper directory: its whiteouts
    are left out, ``deleted.files`` says what was deleted), laid out for pre-copy:
    everything but directories oldest first (mtime, then name), then the directories by
    name, the root last (a directory's mtime changes with every file made or removed in
    it; extractors make missing parents and set directories' times at the end), with
    fixed owner names and each entry's extended attributes (PAX ``SCHILY.xattr.*``, as
    podman's own tars). A file that grows or changes then moves only what follows it in
    the tar, usually little, so the chunks before it stay as they were. (Podman's own
    volume tars follow the directory order, which on a tmpfs is newest first.)"""
    dirs: list[tuple[str, pathlib.Path]] = []
    rest: list[tuple[int, str, pathlib.Path]] = []
    for top, dnames, fnames in os.walk(root):
        for n in dnames + fnames:
            p = pathlib.Path(top) / n
            rel = p.relative_to(root).as_posix()
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue  # removed meanwhile: the final tar decides
            if p.is_dir() and not p.is_symlink():
                dirs.append((rel, p))
            else:
                rest.append((st.st_mtime_ns, rel, p))
    writer = ChunkWriter(out, member)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for rel, p in [*[(r, q) for _, r, q in sorted(rest)], *sorted(dirs), (".", root)]:
            try:
                info = tar.gettarinfo(str(p), arcname=rel)
            except FileNotFoundError:
                continue
            if info is None:
                continue  # a socket: nothing a tar can hold
            if overlay and info.ischr() and (info.devmajor, info.devminor) == (0, 0):
                continue  # a whiteout: a deletion, which deleted.files carries
            info.uname = info.gname = ""
            info.pax_headers = _xattrs(p, overlay)
            if info.isreg():
                try:
                    with open(p, "rb") as f:
                        tar.addfile(info, _Exactly(f, info.size))
                except FileNotFoundError:
                    continue
            else:
                tar.addfile(info)
    writer.close()


def image_file(images_dir: pathlib.Path) -> tuple[pathlib.Path, str] | None:
    """The base image a flattened directory carries and its id, if any."""
    for p in images_dir.iterdir():
        if m := _IMAGE.match(p.name):
            return p, m.group(1)
    return None


def check_members(images_dir: pathlib.Path, *, allow_devices: bool) -> list[str]:
    """Refuse (RestoreSpecError) a flattened archive with members podman's restore does
    not read, more than one image, malformed tars or lists; returns the volume names."""
    images = 0
    chunked = _chunks(images_dir)
    for member, chunks in chunked.items():
        field = f"archive.{TOP}{member.replace('/', '+')}"
        names = [c.name for c in chunks]
        if names != [f"{TOP}{member.replace('/', '+')}+{i:05d}" for i in range(len(chunks))] or any(
                c.stat().st_size != CHUNK for c in chunks[:-1]):
            checks.refuse(field, f"{field}: its chunks are not 0 to {len(chunks) - 1} of "
                                 f"{CHUNK} bytes each but the last")
        stream = _Chunks(chunks)
        try:
            check_tar(stream, field, allow_devices=allow_devices)
        finally:
            stream.close()
    for p in sorted(images_dir.iterdir()):
        field = f"archive.{p.name}"
        if _CHUNK.match(p.name):
            continue
        if p.name.startswith(IMAGE_PREFIX):
            images += 1
            if not _IMAGE.match(p.name) or images > 1:
                checks.refuse(field, f"{p.name[:120]!r} is not one image named by its id")
            continue
        if not p.name.startswith(TOP):
            continue  # CRIU's own images: plain names, checked by the change stream
        member = p.name[len(TOP):].replace("+", "/")
        if _chunked(member):
            checks.refuse(field, f"{member} must travel in chunks ({p.name}+00000, …)")
        if member not in _KNOWN:
            checks.refuse(field, f"the podman archive has a member podman's restore does not "
                                 f"read: {member[:120]!r}")
        if member.endswith(".tar"):
            with open(p, "rb") as f:
                check_tar(f, field, allow_devices=allow_devices)
        elif member in ("deleted.files", "bind.mounts"):
            _check_paths(p, field)
    return [v.group(1) for m in chunked if (v := _VOLUME.match(m))]


def _clean(name: str, field: str) -> str:
    n = name.removeprefix("./")
    if n.startswith("/") or ".." in n.split("/") or "\0" in n or len(n) > 4096:
        checks.refuse(field, f"{field} has a member {name[:120]!r} that climbs out of its "
                             "directory (absolute, or '..')")
    return n.rstrip("/")


def check_tar(f: Any, field: str, *, allow_devices: bool) -> None:
    """Refuse a tar (read from file object ``f``, in one pass) that is compressed or
    malformed, has too many members, names outside its root, writes through a symlink it
    made, links outside itself, or holds devices (only overlay whiteouts, 0:0, unless
    ``allow_devices``)."""
    links: set[str] = set()
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
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
