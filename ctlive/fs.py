"""Private directories and files: what ctlive keeps on disk is its owner's alone.

Checkpoint images hold the workload's whole memory, so every directory ctlive
creates for them (and for its state) is mode 0700 and every file in them 0600,
whatever the process's umask. OS errors become :class:`~ctlive.errors.StorageError`
naming the path.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import tempfile
from collections.abc import Iterator

from ctlive.errors import StorageError

__all__ = ["private_dir", "private_tempdir", "tighten_tree"]

_DIR_MODE = 0o700
_FILE_MODE = 0o600


@contextlib.contextmanager
def _storage(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what} {os.fspath(path)}: {exc}", path=os.fspath(path),
                           cause=exc) from exc


def private_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """Make sure ``path`` is a directory only we can use (mode 0700), and return it.

    A missing directory is created 0700 whatever the umask (and so is each missing
    parent). An existing one must be a real directory (not a symlink) owned by us; it is
    tightened to 0700. One owned by another user raises StorageError, as does anything
    that is not a directory. Pass only a directory meant for ctlive alone (``/run/ctlive``,
    not ``/run``): an existing one loses every permission for group and others.
    """
    p = pathlib.Path(path)
    missing = []
    q = p
    while not os.path.lexists(q) and q != q.parent:
        missing.append(q)
        q = q.parent
    with _storage("cannot create the private directory", p):
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                os.mkdir(d, _DIR_MODE)
                os.chmod(d, _DIR_MODE)  # the umask may have taken bits away
    with _storage("cannot use the private directory", p):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise StorageError(
                    f"{p} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}); "
                    "refusing to keep private files in it", path=str(p))
            if stat.S_IMODE(st.st_mode) != _DIR_MODE:
                os.fchmod(fd, _DIR_MODE)
        finally:
            os.close(fd)
    return p


def private_tempdir(prefix: str, dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """A new, uniquely named directory (``prefix`` + random) in ``dir`` (default: the
    system's temporary directory), mode 0700. ``tempfile.mkdtemp`` already creates it
    0700 (minus the umask, which could only take bits away: they are put back); the
    caller removes it."""
    with _storage("cannot create a private directory in", dir or tempfile.gettempdir()):
        d = tempfile.mkdtemp(prefix=prefix, dir=dir)
        os.chmod(d, _DIR_MODE)
    return pathlib.Path(d)


def tighten_tree(path: str | os.PathLike[str]) -> None:
    """Set every directory from ``path`` down to 0700 and every regular file to 0600,
    e.g. after CRIU wrote images there with its own umask.

    Symlinks are neither followed nor changed (nor are sockets, FIFOs or devices).
    Each directory is tightened before its entries are, so no other user can swap an
    entry for a symlink in between. ``path`` must be a directory (not a symlink to one).
    """
    top = os.fspath(path)
    with _storage("cannot tighten", top):
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            raise StorageError(f"{top} is not a directory (or is a symlink); not tightening",
                               path=top)

        def fail(exc: OSError) -> None:
            raise exc

        for _dirpath, _dirs, files, dirfd in os.fwalk(top, onerror=fail, follow_symlinks=False):
            os.fchmod(dirfd, _DIR_MODE)
            for name in files:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != _FILE_MODE:
                    os.chmod(name, _FILE_MODE, dir_fd=dirfd)
