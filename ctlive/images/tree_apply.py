"""The receiver's half of carried trees (:mod:`ctlive.images.tree`): blobs kept in the
migration's work directory and checked against their names on receipt, manifests
checked per iteration, and the final tree materialized without following a symlink and
verified end to end against its manifest."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import pathlib
import stat
from collections.abc import Callable, Iterator

import attrs
import zstandard

from ctlive.errors import DeltaFormatError, Phase, RestoreError, StorageError, map_os_errors
from ctlive.fs import private_dir
from ctlive.images.changes import ChangeItem, ChangeKind, check_part, safe_name
from ctlive.images.files import MAX_PART_RANGES
from ctlive.images.tree import _DIGEST, EMPTY_DIGEST, Entry, decode_manifest, referenced

__all__ = ["TreeReceiver"]

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY = 1 << 20


@attrs.define
class _Partial:
    size: int
    ranges: list[tuple[int, int]] = attrs.field(factory=list)
    have: int = 0


class TreeReceiver:
    """The carried trees of one migration, under ``workdir/trees``: ``apply`` each
    TREE_BLOB or TREE_MANIFEST item, ``end_iteration`` after each iteration, then
    ``materialize`` each label of the final one."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self._dir = workdir / "trees"
        self.held: set[str] = {EMPTY_DIGEST}
        self.bytes_held = 0
        """Bytes of blobs held (complete or being received): counted in the image."""
        self.manifests: dict[str, list[Entry]] = {}
        """The last complete iteration's manifests, by label."""
        self._current: dict[str, list[Entry]] = {}
        self._partial: dict[str, _Partial] = {}
        self._sizes: dict[str, int] = {}
        self._labels: set[str] | None = None
        self._linked: set[str] = set()  # blobs that became a tree's file (one each)

    @property
    def labels(self) -> tuple[str, ...]:
        """The carried trees' labels (none before the first iteration ended)."""
        return tuple(sorted(self.manifests))

    def _blob(self, digest: str) -> pathlib.Path:
        return self._dir / digest

    def apply(self, item: ChangeItem) -> None:
        """Take one tree item (decoded by ``decode_change``); DeltaFormatError if hostile."""
        if item.kind == ChangeKind.TREE_MANIFEST:
            label = safe_name(item.name)
            if label in self._current:
                raise DeltaFormatError(f"carried tree {label!r}: two manifests in one "
                                       "iteration")
            self._current[label] = decode_manifest(label, item.data)
            return
        if item.kind != ChangeKind.TREE_BLOB:
            raise DeltaFormatError(f"{item.kind.name} is not a carried-tree item")
        with map_os_errors(StorageError, "storing a carried file's data", phase=Phase.ITERATE):
            self._part(item)

    def _part(self, item: ChangeItem) -> None:
        digest = item.name
        if not _DIGEST.match(digest):
            raise DeltaFormatError(f"blob name {digest[:80]!r} is not a BLAKE2b-256 hex digest")
        if digest in self.held:
            raise DeltaFormatError(f"blob {digest}: sent again, though already held")
        length = check_part(item)
        p = self._partial.get(digest)
        if p is None:
            private_dir(self._dir)
            p = self._partial[digest] = _Partial(item.size)
            self.bytes_held += item.size
        elif p.size != item.size:
            raise DeltaFormatError(f"blob {digest}: parts declare sizes {p.size} and "
                                   f"{item.size}")
        i = bisect.bisect(p.ranges, (item.offset, length))
        if (i > 0 and sum(p.ranges[i - 1]) > item.offset) or (
                i < len(p.ranges) and p.ranges[i][0] < item.offset + length):
            raise DeltaFormatError(f"blob {digest}: part at {item.offset} overlaps another")
        if len(p.ranges) >= MAX_PART_RANGES:  # tiny parts would make each insert costlier
            raise DeltaFormatError(f"blob {digest}: more than {MAX_PART_RANGES} parts")
        data = zstandard.ZstdDecompressor().decompress(item.data, max_output_size=length)
        if len(data) != length:
            raise DeltaFormatError(f"blob {digest}: part at {item.offset} is not the "
                                   f"{length} bytes it declares")
        path = self._blob(digest).with_suffix(".part")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, data, item.offset)
        finally:
            os.close(fd)
        p.ranges.insert(i, (item.offset, length))
        p.have += length
        if p.have == p.size:
            # Checked on receipt: a blob is kept only under the name of its content.
            if _hash_file(path) != digest:
                raise DeltaFormatError(f"blob {digest}: its content does not match its name "
                                       "(BLAKE2b-256)")
            os.rename(path, self._blob(digest))
            del self._partial[digest]
            self.held.add(digest)
            self._sizes[digest] = p.size

    def end_iteration(self) -> None:
        """The iteration's items are all in: every blob is complete, every tree has its
        manifest, and every blob a manifest names is held. Blobs no manifest names are
        dropped (the source forgets them too)."""
        if self._partial:
            raise DeltaFormatError(f"{len(self._partial)} carried blobs were left incomplete "
                                   "at the end of the iteration")
        labels = set(self._current)
        if self._labels is None:
            self._labels = labels
        elif labels != self._labels:
            raise DeltaFormatError(f"carried trees {sorted(labels)} in this iteration, "
                                   f"{sorted(self._labels)} in the first")
        keep = referenced(self._current.values())
        missing = keep - self.held
        if missing:
            raise DeltaFormatError(f"a carried tree's manifest names {len(missing)} blobs "
                                   f"this receiver does not hold (e.g. {min(missing)})")
        with map_os_errors(StorageError, "dropping carried blobs", phase=Phase.ITERATE):
            for d in self.held - keep:
                self._blob(d).unlink(missing_ok=True)
                self.bytes_held -= self._sizes.pop(d, 0)
        self.held = keep
        self.manifests, self._current = self._current, {}

    def discard_blobs(self) -> None:
        """Drop every blob (after materializing: the trees hold their own copies)."""
        for d in self.held - {EMPTY_DIGEST}:
            with contextlib.suppress(OSError):
                self._blob(d).unlink()
        self.held, self.bytes_held, self._sizes = {EMPTY_DIGEST}, 0, {}

    # -- materializing ---------------------------------------------------------------------

    def materialize(self, label: str, dest: pathlib.Path) -> None:
        """Build tree ``label`` as its last manifest says at ``dest`` (absent, or an
        empty directory; its parent must exist), then verify it end to end; RestoreError
        if it does not match, StorageError if it cannot be written."""
        entries = self.manifests.get(label)
        if entries is None:
            raise RestoreError(f"no carried tree {label!r} was received", phase=Phase.RESTORE)
        with map_os_errors(StorageError, f"materializing carried tree {label} at {dest}",
                           phase=Phase.RESTORE):
            with contextlib.suppress(FileExistsError):
                os.mkdir(dest, 0o700)
            root = os.open(dest, _OPEN_DIR)
            try:
                if os.listdir(root):
                    raise RestoreError(f"carried tree {label}: {dest} exists and is not empty",
                                       phase=Phase.RESTORE)
                _build(root, entries, self._blob, self._linked)
                _verify(root, label, entries)
            finally:
                os.close(root)


def _hash_file(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


class _Dirs:
    """Opens an entry's parent from the tree's root one component at a time, never
    following a symlink; keeps the last parent open (siblings come together)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.path, self.fd = ".", root

    def parent(self, rel: str) -> tuple[int, str]:
        head, _, name = rel.rpartition("/")
        head = head or "."
        if head != self.path:
            self.close()
            fd = os.dup(self.root)
            for part in ([] if head == "." else head.split("/")):
                try:
                    nfd = os.open(part, _OPEN_DIR, dir_fd=fd)
                finally:
                    os.close(fd)
                fd = nfd
            self.path, self.fd = head, fd
        return self.fd, name

    def close(self) -> None:
        if self.fd != self.root:
            os.close(self.fd)
        self.path, self.fd = ".", self.root


def _set_meta(fd_or_path: int | str, e: Entry, *, dir_fd: int | None = None,
              name: str = "") -> None:
    """Owner, then mode (chown clears set-id bits), then xattrs (chown clears file
    capabilities), then mtime."""
    if isinstance(fd_or_path, int):
        os.fchown(fd_or_path, e.uid, e.gid)
        os.fchmod(fd_or_path, e.mode)
        for n, v in e.xattrs:
            os.setxattr(fd_or_path, n, v)
        os.utime(fd_or_path, ns=(e.mtime_ns, e.mtime_ns))
        return
    # A symlink: nothing may follow it.
    os.chown(name, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
    for n, v in e.xattrs:
        os.setxattr(fd_or_path, n, v, follow_symlinks=False)
    os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _write_file(fd: int, e: Entry, blob: pathlib.Path) -> None:
    os.ftruncate(fd, e.size)
    if not e.extents:
        return
    src = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos = 0  # the blob is the extents' bytes, concatenated
        for off, length in e.extents:
            os.lseek(fd, off, os.SEEK_SET)
            end = pos + length
            while pos < end:  # the kernel's copy, at fd's position: no buffer of ours
                n = os.sendfile(fd, src, pos, end - pos)
                if not n:
                    raise RestoreError(f"blob {e.digest} is shorter than its extents",
                                       phase=Phase.RESTORE)
                pos += n
    finally:
        os.close(src)


def _link_blob(e: Entry, src: pathlib.Path, name: str, pfd: int, dev: int,
               used: set[str]) -> int | None:
    """A file without holes becomes its blob itself, linked into place, when the blob is
    on the tree's filesystem and no other file took it yet: no copy, and no second copy
    in memory. Returns the opened file, or None to copy instead."""
    if e.extents != ((0, e.size),) or e.digest in used or os.stat(src).st_dev != dev:
        return None
    os.link(src, name, dst_dir_fd=pfd, follow_symlinks=False)
    used.add(e.digest)
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)


def _build(root: int, entries: list[Entry], blob: Callable[[str], pathlib.Path],
           used: set[str]) -> None:
    dirs = _Dirs(root)
    made_dirs: list[Entry] = []
    dev = os.fstat(root).st_dev
    try:
        for e in entries:
            if e.path == ".":
                made_dirs.append(e)
                continue
            pfd, name = dirs.parent(e.path)
            if e.kind == "dir":
                os.mkdir(name, 0o700, dir_fd=pfd)
                made_dirs.append(e)
            elif e.kind == "file":
                fd = _link_blob(e, blob(e.digest), name, pfd, dev, used)
                if fd is None:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=pfd)
                    try:
                        _write_file(fd, e, blob(e.digest))
                    except BaseException:
                        os.close(fd)
                        raise
                try:
                    _set_meta(fd, e)
                finally:
                    os.close(fd)
            elif e.kind == "symlink":
                os.symlink(e.target, name, dir_fd=pfd)
                _set_meta(f"/proc/self/fd/{pfd}/{name}", e, dir_fd=pfd, name=name)
            else:  # hardlink: the target's parent may be elsewhere; open it on its own
                t = _Dirs(root)
                try:
                    tfd, tname = t.parent(e.target)
                    os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd,
                            follow_symlinks=False)
                finally:
                    t.close()
        # Directories last, deepest first: creating their entries changed their mtimes.
        for e in reversed(made_dirs):
            if e.path == ".":
                _set_meta(root, e)
                continue
            pfd, name = dirs.parent(e.path)
            fd = os.open(name, _OPEN_DIR, dir_fd=pfd)
            try:
                _set_meta(fd, e)
            finally:
                os.close(fd)
    finally:
        dirs.close()


def _verify(root: int, label: str, entries: list[Entry]) -> None:
    """Every entry as the manifest says: type, owner, mode, mtime, size, xattrs, link
    targets, and the data extents' BLAKE2b-256."""
    dirs = _Dirs(root)
    inodes: dict[str, int] = {}
    try:
        for e in entries:
            for what in _mismatches(dirs, root, e, inodes):
                raise RestoreError(f"carried tree {label}: {e.path} does not match its "
                                   f"manifest ({what})", phase=Phase.RESTORE)
    finally:
        dirs.close()


def _mismatches(dirs: _Dirs, root: int, e: Entry, inodes: dict[str, int]) -> Iterator[str]:
    if e.path == ".":
        st, pfd, name = os.fstat(root), root, ""
    else:
        pfd, name = dirs.parent(e.path)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    want = {"dir": stat.S_ISDIR, "file": stat.S_ISREG, "hardlink": stat.S_ISREG,
            "symlink": stat.S_ISLNK}[e.kind]
    if not want(st.st_mode):
        yield f"not a {e.kind}"
        return
    if e.kind == "hardlink":
        if inodes.get(e.target) != st.st_ino:
            yield f"not a hard link of {e.target}"
        return
    inodes[e.path] = st.st_ino
    if (st.st_uid, st.st_gid) != (e.uid, e.gid):
        yield f"owner {st.st_uid}:{st.st_gid}, not {e.uid}:{e.gid}"
    if e.kind != "symlink" and stat.S_IMODE(st.st_mode) != e.mode:
        yield f"mode {stat.S_IMODE(st.st_mode):o}, not {e.mode:o}"
    if st.st_mtime_ns != e.mtime_ns:
        yield "mtime"
    if e.kind == "symlink":
        if os.readlink(name, dir_fd=pfd) != e.target:
            yield "symlink target"
        for n, v in e.xattrs:
            if os.getxattr(f"/proc/self/fd/{pfd}/{name}", n, follow_symlinks=False) != v:
                yield f"xattr {n}"
        return
    if e.kind == "dir":
        fd = os.dup(root) if e.path == "." else os.open(name, _OPEN_DIR, dir_fd=pfd)
        try:
            for n, v in e.xattrs:
                if os.getxattr(fd, n) != v:
                    yield f"xattr {n}"
        finally:
            os.close(fd)
        return
    if e.kind == "file":
        if st.st_size != e.size:
            yield f"size {st.st_size}, not {e.size}"
            return
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            h = hashlib.blake2b(digest_size=32)
            for off, length in e.extents:
                done = 0
                while done < length:
                    chunk = os.pread(fd, min(_COPY, length - done), off + done)
                    if not chunk:
                        break
                    h.update(chunk)
                    done += len(chunk)
            if h.hexdigest() != e.digest:
                yield "content hash"
            for n, v in e.xattrs:
                if os.getxattr(fd, n) != v:
                    yield f"xattr {n}"
        finally:
            os.close(fd)
