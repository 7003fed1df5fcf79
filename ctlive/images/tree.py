"""Carried directory trees (a container's rootfs, a process's data directory), pre-copied
like memory: the scan and the source's per-iteration delta, and the manifest codec both
sides share.

A tree has a label (a :func:`~ctlive.images.changes.safe_name`) and a root directory.
Each iteration the source scans it (:func:`scan`) and sends, as change items,

- ``TREE_BLOB`` parts of every file content the destination does not hold: a blob is
  a file's data extents (``SEEK_DATA``/``SEEK_HOLE``; holes are not sent), concatenated,
  named by its BLAKE2b-256, zstd, in parts of at most ``MAX_PART`` bytes. Blobs are
  content-addressed, so a renamed or hard-linked file is not sent again;
- one ``TREE_MANIFEST`` item: every entry (path, type, mode, owner, mtime, size,
  xattrs, extents, blob name), zstd JSON.

Both sides hold the same set of blobs after an iteration: those the iteration's
manifests name (:func:`referenced`). The receiver (:mod:`ctlive.images.tree_apply`)
materializes the final manifest and verifies it end to end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import zstandard

from ctlive.errors import CheckpointError, DeltaFormatError, Phase, map_os_errors
from ctlive.images.changes import MAX_FILE, MAX_PART, ChangeItem, ChangeKind, safe_name

__all__ = [
    "EMPTY_DIGEST",
    "MAX_ENTRIES",
    "MAX_EXTENTS",
    "Blob",
    "Entry",
    "TreeSender",
    "check_path",
    "decode_manifest",
    "encode_manifest",
    "read_data",
    "referenced",
    "scan",
]

MAX_ENTRIES = 1 << 19
"""Most entries one manifest may hold."""
MAX_EXTENTS = 1024
"""Most data extents one file may declare; a file with more is sent as one extent."""
MAX_APPARENT = 1 << 40
"""Largest apparent size (holes included) of one carried file, bytes."""
MAX_XATTRS, MAX_XATTR_VALUE = 64, 64 << 10
_MAX_MANIFEST = 256 << 20  # decompressed JSON
_MAX_PATH = 4096
EMPTY_DIGEST = hashlib.blake2b(b"", digest_size=32).hexdigest()
"""The blob name of a file without data (never sent: every receiver holds it)."""

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_XATTR = re.compile(r"^(user|security|trusted|system)\.[\x21-\x7e]{1,240}$")
_KINDS = ("dir", "file", "symlink", "hardlink")
_KEYS = frozenset({"p", "k", "m", "u", "g", "t", "s", "h", "e", "l", "x"})
_READ = 1 << 20


@attrs.frozen
class Entry:
    """One entry of a carried tree. ``path`` is relative, ``/``-separated, ``.`` for
    the root; ``kind`` is ``dir``, ``file``, ``symlink`` or ``hardlink`` (a further name
    of the earlier file ``target``)."""

    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    """Files: the apparent size (holes included)."""
    digest: str = ""
    """Files: the blob name, BLAKE2b-256 (hex) of the data extents' bytes."""
    extents: tuple[tuple[int, int], ...] = ()
    """Files: (offset, length) of each data extent, in order; the rest is holes."""
    target: str = ""
    """Symlinks: the link's text; hard links: the earlier path."""
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @property
    def data_length(self) -> int:
        """The blob's length: the bytes of all data extents."""
        return sum(n for _, n in self.extents)


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of ``fd`` below ``size`` (all of it where SEEK_DATA is missing)."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only holes from here
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            off = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    if len(out) > MAX_EXTENTS:
        return [(out[0][0], size - out[0][0])]
    return out


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    if len(names) > MAX_XATTRS:
        raise CheckpointError(f"{path}: {len(names)} extended attributes, more than the "
                              f"{MAX_XATTRS} a carried file may have")
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


class Blob:
    """A file's blob as read, in MAX_PART-sized chunks: in memory up to ``SPILL`` bytes,
    beyond that in an unnamed temporary file (so one large changed file does not take
    its size in memory)."""

    SPILL = 64 << 20

    def __init__(self) -> None:
        self._mem: list[bytes] = []
        self._held = 0
        self._file: Any = None

    def append(self, chunk: bytes) -> None:
        """Add the next chunk (at most MAX_PART bytes)."""
        if self._file is None and self._held + len(chunk) > self.SPILL:
            # The source's own disk, like its dumps (/tmp may be memory); closed by close().
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
            for c in self._mem:
                self._file.write(c)
            self._mem = []
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._mem.append(chunk)
        self._held += len(chunk)

    def __iter__(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._mem
            return
        self._file.seek(0)
        while chunk := self._file.read(MAX_PART):
            yield chunk

    def close(self) -> None:
        """Drop the data."""
        self._mem = []
        if self._file is not None:
            self._file.close()


def read_data(path: str, st: os.stat_result, *, keep: bool = True
              ) -> tuple[Entry, Blob]:
    """A regular file's entry and its blob (data extents, concatenated), read once so
    that the two agree even while the file changes (empty unless ``keep``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.blake2b(digest_size=32)
        chunks = Blob()
        got: list[tuple[int, int]] = []
        buf = bytearray()
        for off, length in _extents(fd, size):
            done = 0
            while done < length:
                data = os.pread(fd, min(_READ, length - done), off + done)
                if not data:  # shrank while read: what was read is the entry
                    break
                h.update(data)
                if keep:
                    buf += data
                done += len(data)
                while len(buf) >= MAX_PART:
                    chunks.append(bytes(buf[:MAX_PART]))
                    del buf[:MAX_PART]
            if done:
                got.append((off, done))
            if done < length:
                size = off + done
                break
        if buf:
            chunks.append(bytes(buf))
    finally:
        os.close(fd)
    if sum(n for _, n in got) > MAX_FILE:
        raise CheckpointError(f"{path}: more than {MAX_FILE} bytes of data; too large to "
                              "carry")
    entry = Entry("", "file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  size, h.hexdigest(), tuple(got))
    return entry, chunks


def scan(root: str | os.PathLike[str], *, with_data: bool = True,
         held: set[str] | frozenset[str] = frozenset(),
         ) -> Iterator[tuple[Entry, Blob | None]]:
    """Every entry of the tree at ``root``, parents before children, names sorted;
    regular files with their blob chunks (``with_data``), or None when their content
    is one of ``held`` (then only hashed, never held in memory). Mount points below
    ``root`` (another filesystem), sockets, FIFOs and device nodes are not carried."""
    base = os.fspath(root)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{base} is not a directory: a carried tree is a directory")
    dev = st.st_dev
    links: dict[tuple[int, int], str] = {}
    yield _dir_entry(".", base, st), None
    todo = [""]
    while todo:
        rel = todo.pop()
        here = os.path.join(base, rel) if rel else base
        with os.scandir(here) as it:
            names = sorted(e.name for e in it)
        subdirs = []
        for name in names:
            rpath = f"{rel}/{name}" if rel else name
            full = os.path.join(base, rpath)
            try:
                est = os.lstat(full)
            except FileNotFoundError:  # gone since the listing
                continue
            mode = est.st_mode
            if stat.S_ISDIR(mode):
                if est.st_dev != dev:
                    continue
                yield _dir_entry(rpath, full, est), None
                subdirs.append(rpath)
            elif stat.S_ISLNK(mode):
                yield Entry(rpath, "symlink", 0, est.st_uid, est.st_gid, est.st_mtime_ns,
                            target=os.readlink(full), xattrs=_xattrs(full)), None
            elif stat.S_ISREG(mode):
                key = (est.st_dev, est.st_ino)
                if est.st_nlink > 1 and key in links:
                    yield Entry(rpath, "hardlink", target=links[key]), None
                    continue
                chunks: Blob | None = None
                try:
                    if with_data:
                        e, _ = read_data(full, est, keep=False)
                        if e.digest not in held:  # read again, keeping what is read
                            e, chunks = read_data(full, est)
                    else:
                        e, chunks = Entry("", "file", stat.S_IMODE(mode), est.st_uid,
                                          est.st_gid, est.st_mtime_ns, est.st_size), None
                except FileNotFoundError:
                    continue
                if est.st_nlink > 1:
                    links[key] = rpath
                yield attrs.evolve(e, path=rpath, xattrs=_xattrs(full)), chunks
        # Depth first, in name order: a stack, so push in reverse.
        todo.extend(reversed(subdirs))


def _dir_entry(rel: str, full: str, st: os.stat_result) -> Entry:
    return Entry(rel, "dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                 xattrs=_xattrs(full))


def referenced(manifests: Iterable[Iterable[Entry]]) -> set[str]:
    """The blobs that ``manifests`` name: what both sides hold after an iteration."""
    return {e.digest for m in manifests for e in m if e.kind == "file"} | {EMPTY_DIGEST}


# --- the manifest codec -----------------------------------------------------------------

def encode_manifest(label: str, entries: list[Entry]) -> bytes:
    """zstd JSON of a tree's entries."""
    out = []
    for e in entries:
        d: dict[str, Any] = {"p": e.path, "k": e.kind}
        if e.kind != "hardlink":
            d.update(m=e.mode, u=e.uid, g=e.gid, t=e.mtime_ns)
        if e.kind == "file":
            d.update(s=e.size, h=e.digest, e=[list(x) for x in e.extents])
        if e.kind in ("symlink", "hardlink"):
            d["l"] = e.target
        if e.xattrs:
            d["x"] = [[n, v.hex()] for n, v in e.xattrs]
        out.append(d)
    raw = json.dumps({"v": 1, "label": label, "entries": out}, separators=(",", ":"))
    return zstandard.ZstdCompressor(level=3).compress(raw.encode())


def _bad(label: str, msg: str) -> DeltaFormatError:
    return DeltaFormatError(f"carried tree {label!r}: {msg}")


def _int(v: Any, lo: int, hi: int, label: str, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(label, f"{what} must be an integer from {lo} to {hi}")
    return v


def _fs_len(s: str, label: str) -> int:
    """Bytes of ``s`` as a file name (undecodable bytes travel as surrogate escapes)."""
    try:
        return len(s.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise _bad(label, f"{s[:80]!r} is not a file name") from None


def check_path(p: Any, label: str) -> str:
    """``p`` if it is a relative path without ``.``, ``..``, empty parts or NUL."""
    if not isinstance(p, str) or not p or _fs_len(p, label) > _MAX_PATH or "\0" in p:
        raise _bad(label, f"bad path {str(p)[:80]!r}")
    if p == ".":
        return p
    parts = p.split("/")
    if any(c in ("", ".", "..") or _fs_len(c, label) > 255 for c in parts):
        raise _bad(label, f"path {p[:80]!r} is absolute or climbs out of the tree "
                          "('', '.' or '..' parts)")
    return p


def decode_manifest(label: str, data: bytes) -> list[Entry]:
    """A peer's manifest of tree ``label``; hostile-input safe: sizes, counts and names
    capped; paths relative, without ``..``; every parent an earlier directory entry (so
    nothing is ever created through a symlink); a hard link's target an earlier file;
    extents ordered, inside the file, adding up to no more than ``MAX_FILE``."""
    safe_name(label)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=_MAX_MANIFEST)
        doc = json.loads(raw)
    except (zstandard.ZstdError, ValueError, RecursionError) as exc:
        raise _bad(label, f"the manifest is not zstd JSON within {_MAX_MANIFEST} bytes "
                          f"({exc})") from exc
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("label") != label:
        raise _bad(label, "the manifest is not version 1 of this tree")
    items = doc.get("entries")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_ENTRIES:
        raise _bad(label, f"the manifest must list 1 to {MAX_ENTRIES} entries")
    kinds: dict[str, str] = {}
    out = []
    for i, d in enumerate(items):
        if not isinstance(d, dict) or not set(d) <= _KEYS:
            raise _bad(label, f"entry {i} is not an object of known fields")
        p = check_path(d.get("p"), label)
        kind = d.get("k")
        if kind not in _KINDS:
            raise _bad(label, f"{p[:80]!r}: unknown kind {str(kind)[:20]!r}")
        if (i == 0) != (p == ".") or (p == "." and kind != "dir"):
            raise _bad(label, "the first entry, and only it, must be the root directory '.'")
        if p in kinds:
            raise _bad(label, f"{p[:80]!r} appears twice")
        parent = p.rpartition("/")[0] or "."
        if p != "." and kinds.get(parent) != "dir":
            raise _bad(label, f"{p[:80]!r}: its parent is not an earlier directory of the "
                              "tree (a symlink or a missing entry)")
        kinds[p] = kind
        out.append(_entry(label, p, kind, d, kinds))
    return out


def _entry(label: str, p: str, kind: str, d: dict[str, Any], kinds: dict[str, str]) -> Entry:
    where = f"{p[:80]!r}"
    if kind == "hardlink":
        target = check_path(d.get("l"), label)
        if kinds.get(target) != "file" or set(d) - {"p", "k"} - {"l"}:
            raise _bad(label, f"{where}: a hard link must name an earlier regular file")
        return Entry(p, kind, target=target)
    mode = _int(d.get("m"), 0, 0o7777, label, f"{where} mode")
    uid = _int(d.get("u"), 0, (1 << 32) - 2, label, f"{where} uid")
    gid = _int(d.get("g"), 0, (1 << 32) - 2, label, f"{where} gid")
    mtime = _int(d.get("t"), -(1 << 63), (1 << 63) - 1, label, f"{where} mtime")
    xattrs = _xattr_list(label, where, d.get("x", []))
    if kind == "symlink":
        text = d.get("l")
        if not isinstance(text, str) or not text or "\0" in text or _fs_len(
                text, label) > _MAX_PATH:
            raise _bad(label, f"{where}: bad symlink target")
        return Entry(p, kind, mode, uid, gid, mtime, target=text, xattrs=xattrs)
    if kind == "dir":
        if {"s", "h", "e", "l"} & set(d):
            raise _bad(label, f"{where}: a directory with file fields")
        return Entry(p, kind, mode, uid, gid, mtime, xattrs=xattrs)
    size = _int(d.get("s"), 0, MAX_APPARENT, label, f"{where} size")
    digest = d.get("h")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise _bad(label, f"{where}: the blob name is not a BLAKE2b-256 hex digest")
    ext = d.get("e")
    if not isinstance(ext, list) or len(ext) > MAX_EXTENTS:
        raise _bad(label, f"{where}: extents must be a list of at most {MAX_EXTENTS}")
    extents: list[tuple[int, int]] = []
    end = total = 0
    for x in ext:
        if not isinstance(x, list) or len(x) != 2:
            raise _bad(label, f"{where}: an extent is not [offset, length]")
        off = _int(x[0], end, size, label, f"{where} extent offset")
        n = _int(x[1], 1, size - off, label, f"{where} extent length")
        extents.append((off, n))
        end, total = off + n, total + n
    if total > MAX_FILE:
        raise _bad(label, f"{where}: {total} bytes of data, above {MAX_FILE}")
    if total == 0 and digest != EMPTY_DIGEST:
        raise _bad(label, f"{where}: no data extents but a non-empty blob")
    return Entry(p, kind, mode, uid, gid, mtime, size, digest, tuple(extents), xattrs=xattrs)


def _xattr_list(label: str, where: str, value: Any) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(value, list) or len(value) > MAX_XATTRS:
        raise _bad(label, f"{where}: at most {MAX_XATTRS} extended attributes")
    out = []
    for x in value:
        if (not isinstance(x, list) or len(x) != 2 or not isinstance(x[0], str)
                or not _XATTR.match(x[0]) or not isinstance(x[1], str)
                or len(x[1]) > 2 * MAX_XATTR_VALUE):
            raise _bad(label, f"{where}: a bad extended attribute")
        try:
            out.append((x[0], bytes.fromhex(x[1])))
        except ValueError:
            raise _bad(label, f"{where}: an extended attribute value is not hex") from None
    if len({n for n, _ in out}) != len(out):
        raise _bad(label, f"{where}: an extended attribute appears twice")
    return tuple(out)


# --- the source side --------------------------------------------------------------------

@attrs.define
class TreeSender:
    """The source's view of its carried trees across iterations: which blobs the
    destination holds. ``trees`` maps labels to root directories, or is a function that
    returns them, asked on the first :meth:`items` (inside the migration's phases)."""

    trees: dict[str, str] | Callable[[], dict[str, str]]
    held: set[str] = attrs.field(factory=lambda: {EMPTY_DIGEST})
    bytes_sent: int = 0
    """Change-item data bytes of the last :meth:`items` (blobs and manifests)."""

    def __attrs_post_init__(self) -> None:
        if isinstance(self.trees, dict):
            for label in self.trees:
                safe_name(label)

    def items(self) -> Iterator[ChangeItem]:
        """This iteration's change items: blobs the destination lacks, then a manifest
        per tree. Call once per iteration (the final one once the workload is frozen)."""
        if not isinstance(self.trees, dict):
            self.trees = self.trees()
            self.__attrs_post_init__()
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
        self.bytes_sent = 0
        manifests = []
        known = set(self.held)  # held there, or sent in this iteration
        for label, root in self.trees.items():
            entries = []
            with map_os_errors(CheckpointError, f"reading carried tree {label} at {root}",
                               phase=Phase.ITERATE):
                for e, chunks in scan(root, held=known):
                    entries.append(e)
                    if len(entries) > MAX_ENTRIES:
                        raise CheckpointError(f"carried tree {label} at {root} has more than "
                                              f"{MAX_ENTRIES} entries, the most one may have")
                    if chunks is None or e.digest in known:
                        continue
                    known.add(e.digest)
                    off = 0
                    try:
                        for c in chunks:
                            item = ChangeItem(ChangeKind.TREE_BLOB, e.digest,
                                              size=e.data_length, offset=off,
                                              data=cctx.compress(c))
                            off += len(c)
                            self.bytes_sent += len(item.data)
                            yield item
                    finally:
                        chunks.close()
            manifests.append(entries)
            m = ChangeItem(ChangeKind.TREE_MANIFEST, label, data=encode_manifest(label, entries))
            self.bytes_sent += len(m.data)
            yield m
        self.held = referenced(manifests)
