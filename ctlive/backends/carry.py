"""A process tree's carried directories at the destination: where they may be rebuilt
(the receiver's :class:`~ctlive.backends.restore.RestorePolicy`), rebuilding them, and
checking, before CRIU runs, that every regular file the dump will reopen is here with
the size CRIU recorded (``files.img``)."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
from typing import Any

from ctlive.backends.restore import RestorePolicy, clean_path, refuse, within
from ctlive.errors import ImageFormatError, Phase, RestoreError
from ctlive.images.criu_format import decode_message, read_entries
from ctlive.images.tree_apply import TreeReceiver
from ctlive.migration.spool import memory_backed

__all__ = ["FILES_MAGIC", "carried_paths", "check_open_files", "expect_trees",
           "materialize_carried", "open_files", "remove_carried"]

FILES_MAGIC = 0x56303138
"""CRIU's ``files.img`` type magic."""
_REMAP_FPATH_MAGIC = 0x59133954
_MNTS_MAGIC = 0x55563928
_TMPFS = 5  # CRIU's fstype enum: it restores a tmpfs's contents itself
_MAX_FILES = 1 << 16


def carried_paths(value: Any, policy: RestorePolicy, state_dir: pathlib.Path) -> list[str]:
    """The absolute paths of a process spec's ``carry`` list, each allowed by
    ``policy.allowed_carry_prefixes``, on a memory filesystem, outside the receiver's
    state directory and apart from each other; else a RestoreSpecError."""
    if not isinstance(value, list) or len(value) > 64:
        refuse("carry", "carry must be a list of at most 64 paths")
    out: list[str] = []
    for i, p in enumerate(value):
        field = f"carry[{i}]"
        path = clean_path(p, field)
        if not any(within(path, root) and os.path.realpath(path) != os.path.realpath(root)
                   for root in policy.allowed_carry_prefixes):
            refuse(field, f"carried directory {path} ({field}) is outside the places this "
                          "receiver rebuilds carried files (RestorePolicy."
                          f"allowed_carry_prefixes: {', '.join(policy.allowed_carry_prefixes)})")
        if within(path, str(state_dir)) or within(str(state_dir), path):
            refuse(field, f"carried directory {path} ({field}) overlaps this receiver's state "
                          f"directory {state_dir}")
        if not memory_backed(path):
            refuse(field, f"carried directory {path} ({field}) is not on a memory filesystem "
                          "(tmpfs): carried files would rest on disk here; allow a tmpfs path "
                          "(RestorePolicy.allowed_carry_prefixes)")
        if any(within(path, o) or within(o, path) for o in out):
            refuse(field, f"carried directory {path} ({field}) overlaps another one")
        out.append(path)
    return out


def expect_trees(trees: TreeReceiver | None, labels: set[str]) -> None:
    """The source sent exactly the carried trees its spec names."""
    got = set(trees.labels) if trees is not None else set()
    if got != labels:
        names = ", ".join(sorted(got)) or "none"
        wanted = ", ".join(sorted(labels)) or "none"
        raise RestoreError(f"the carried trees received ({names}) are not those the restore "
                           f"spec names ({wanted})", phase=Phase.RESTORE)


def materialize_carried(trees: TreeReceiver, where: dict[str, str]) -> list[str]:
    """Rebuild and verify each tree ``label`` at ``where[label]`` (parents made 0755);
    returns the directories made, which the caller removes if the restore fails."""
    made: list[str] = []
    try:
        for label, path in where.items():
            if os.path.lexists(path) and (not os.path.isdir(path) or os.path.islink(path)
                                          or os.listdir(path)):
                raise RestoreError(f"carried directory {path} already exists here and is not "
                                   "empty: refusing to overwrite it", phase=Phase.RESTORE)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            made.append(path)
            trees.materialize(label, pathlib.Path(path))
    except BaseException:
        remove_carried(made)
        raise
    trees.discard_blobs()
    return made


def remove_carried(paths: list[str]) -> None:
    """Remove carried directories this receiver made (a discarded copy's)."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def _checked_mounts(images_dir: pathlib.Path) -> set[int] | None:
    """Mount ids whose files must be here (the root mount of a dumped mount namespace
    when it is not a tmpfs), or None when no mount namespace was dumped (every file is
    this host's)."""
    mounts = sorted(images_dir.glob("mountpoints-*.img"))
    if not mounts:
        return None
    ids: set[int] = set()
    for m in mounts:
        for off, msg in read_entries(m, _MNTS_MAGIC):
            f = decode_message(msg, str(m), off)
            if f.get(7) == [b"/"] and f.get(1, [0])[-1] != _TMPFS and f.get(6) == [b"/"]:
                ids.update(v for v in f.get(2, []) if isinstance(v, int))
    return ids


def open_files(images_dir: pathlib.Path) -> list[tuple[str, int | None]]:
    """(path, size) of every regular file the dump reopens by path: ``files.img``'s
    regular-file entries, less the ones CRIU rebuilds itself (remapped ghost or linked
    files, files on a tmpfs it dumped). The size is None where CRIU did not record one
    (it does for mapped files, not for plain descriptors). Bounds-checked: a malformed
    image is an ImageFormatError."""
    files = images_dir / "files.img"
    if not files.exists():
        return []
    remapped = set()
    remap = images_dir / "remap-fpath.img"
    if remap.exists():
        for off, msg in read_entries(remap, _REMAP_FPATH_MAGIC):
            remapped.update(decode_message(msg, str(remap), off).get(1, []))
    mounts = _checked_mounts(images_dir)
    out = []
    for off, msg in read_entries(files, FILES_MAGIC):
        f = decode_message(msg, str(files), off)
        if f.get(1) != [1] or not f.get(3) or not isinstance(f[3][0], bytes):
            continue  # not a regular-file entry
        reg = decode_message(f[3][0], str(files), off)
        mode, size, name = reg.get(10, [0])[-1], reg.get(8), reg.get(6)
        if (not isinstance(mode, int) or not stat.S_ISREG(mode) or not name
                or not isinstance(name[0], bytes) or reg.get(1, [None])[-1] in remapped):
            continue
        recorded = size[-1] if size and isinstance(size[-1], int) else None
        raw = reg.get(7, [1])[-1]  # sint32, zigzag: absent means -1
        mnt = (raw >> 1) ^ -(raw & 1) if isinstance(raw, int) else -1
        if mounts is not None and mnt not in mounts:
            continue
        path = os.fsdecode(name[0])
        if "\0" in path:
            raise ImageFormatError("a file name in files.img holds a NUL", path=str(files),
                                   offset=off)
        out.append(("/" + path.lstrip("/"), recorded))
        if len(out) > _MAX_FILES:
            raise ImageFormatError(f"more than {_MAX_FILES} open files", path=str(files))
    return out


def check_open_files(images_dir: pathlib.Path, carried: list[str]) -> None:
    """RestoreError naming every file the dump reopens that is missing here or has
    another size than CRIU recorded (where it recorded one), and whether it was
    carried."""
    bad = []
    for path, size in dict.fromkeys(open_files(images_dir)):
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and size in (None, st.st_size):
                continue
            why = (f"{st.st_size} bytes here, {size} in the dump" if stat.S_ISREG(st.st_mode)
                   else "not a regular file here")
        except OSError:
            why = "missing here"
        was = "carried" if any(within(path, c) for c in carried) else (
            "not carried: add its directory to Process(carry=[...])")
        bad.append(f"{path} ({why}; {was})")
    if bad:
        raise RestoreError(f"{len(bad)} files the process has open are not as it left them: "
                           + "; ".join(bad[:20]), phase=Phase.RESTORE)
