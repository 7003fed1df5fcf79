"""An encrypted spool for images larger than the guest's memory.

A receiver keeps images in memory by default (inside an SEV-SNP guest that memory is
encrypted), and :func:`check_state_dir` refuses a state directory on a disk. For a
workload larger than memory it can spool to a disk, encrypted with a key made in the
guest and never written anywhere: an ext4 filesystem with fscrypt v2 on a loop device
(this kernel has no dm-crypt; a filesystem on a dm-crypt mapping, LUKS with an ephemeral
key set up by the guest's operator, is accepted too). :meth:`EncryptedSpool.close`
removes the key from the kernel, which makes every byte in the image unreadable, then
unmounts and deletes it.

The ioctls are the kernel's fscrypt UAPI (``linux/fscrypt.h``):
``FS_IOC_ADD_ENCRYPTION_KEY`` (a 64-byte raw key, identified by the kernel),
``FS_IOC_SET_ENCRYPTION_POLICY`` (a v2 policy: AES-256-XTS contents, AES-256-CTS file
names, 16-byte name padding) on an empty directory, and
``FS_IOC_REMOVE_ENCRYPTION_KEY``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import struct
import subprocess
from collections.abc import Iterator

from ctlive.errors import ConfigError, StorageError

__all__ = ["EncryptedSpool", "check_state_dir", "closed_on_error", "dm_crypt_backed",
           "fstype", "memory_backed", "parse_size", "private_at_rest"]


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


_READ, _RW = 2, 3
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_READ, 19, 12)  # the historical size, also for v2
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_RW, 23, 80)
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_RW, 24, 64)
_KEY_SPEC_IDENTIFIER = 2
_AES_256_XTS, _AES_256_CTS, _PAD_16 = 1, 4, 2
_OPEN: set[str] = set()  # the directories of this process's open spools (resolved)


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise StorageError(f"cannot run {cmd[0]}: {exc}", cause=exc) from exc
    if out.returncode != 0:
        raise StorageError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-300:]}")
    return out.stdout


class EncryptedSpool:
    """A directory on an encrypted loop filesystem; ``open()`` returns it. The key lives
    only in the kernel's keyring for the filesystem, made from ``os.urandom`` here."""

    def __init__(self, image: str | os.PathLike[str], size: int) -> None:
        if size < 16 << 20:
            raise ConfigError("an encrypted spool needs at least 16 MiB")
        self.image = pathlib.Path(image)
        self.size = size
        self.mount = self.image.with_name(self.image.name + ".mnt")
        self.path = self.mount / "spool"
        self._identifier: bytes | None = None

    def open(self) -> pathlib.Path:
        """Make, mount and encrypt the spool; returns its (empty, 0700) directory."""
        try:
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, self.size)
            os.close(fd)
            _run(["mkfs.ext4", "-q", "-F", "-O", "encrypt", "-E", "nodiscard", str(self.image)])
            self.mount.mkdir(mode=0o700)
            _run(["mount", "-o", "loop,nodev,nosuid", str(self.image), str(self.mount)])
            self.path.mkdir(mode=0o700)
            self._identifier = self._add_key()
            self._set_policy(self.path, self._identifier)
            _OPEN.add(os.path.realpath(self.path))
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot make the encrypted spool {self.image}: {exc}",
                               path=str(self.image), cause=exc) from exc
        except StorageError:
            self.close()
            raise
        return self.path

    def _add_key(self) -> bytes:
        raw = bytearray(os.urandom(64))
        arg = bytearray(struct.pack("<II32sII32x", _KEY_SPEC_IDENTIFIER, 0, bytes(32),
                                    len(raw), 0)) + raw
        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
        finally:
            os.close(fd)
            raw[:] = bytes(len(raw))  # the kernel has it now; ours goes
            arg[80:] = bytes(len(arg) - 80)
        return bytes(arg[8:24])

    @staticmethod
    def _set_policy(directory: pathlib.Path, identifier: bytes) -> None:
        policy = struct.pack("<BBBB4x16s", 2, _AES_256_XTS, _AES_256_CTS, _PAD_16, identifier)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
        finally:
            os.close(fd)

    def lock(self) -> None:
        """Remove the key from the kernel: every file in the spool becomes unreadable
        (its contents and its name), for good."""
        _OPEN.discard(os.path.realpath(self.path))
        if self._identifier is not None and self.mount.is_dir():
            arg = bytearray(struct.pack("<II16s16xI20x", _KEY_SPEC_IDENTIFIER, 0,
                                        self._identifier, 0))
            with contextlib.suppress(OSError):
                fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY, arg)
                finally:
                    os.close(fd)
        self._identifier = None

    def close(self) -> None:
        """Remove the key (the data becomes unreadable), unmount, delete the image."""
        self.lock()
        if self.mount.is_dir():
            subprocess.run(["umount", str(self.mount)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                self.mount.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()

    def __enter__(self) -> pathlib.Path:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


_MEMORY = ("tmpfs", "ramfs")


def memory_backed(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on tmpfs or ramfs (memory; encrypted inside an SEV guest)."""
    return fstype(path) in _MEMORY


def _mount_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(filesystem type, source device) of the mount holding ``path``."""
    p = os.path.realpath(path)
    best, found = "", ("?", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4]
            if (p == mount_point or p.startswith(mount_point.rstrip("/") + "/")) and len(
                    mount_point) >= len(best):
                sep = fields.index("-")
                best, found = mount_point, (fields[sep + 1], fields[sep + 2])
    return found


def fstype(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem that holds ``path`` (``?`` if none is found)."""
    return _mount_of(path)[0]


def dm_crypt_backed(path: str | os.PathLike[str], sys_root: str = "/sys") -> bool:
    """Whether ``path`` lies on a filesystem whose device is a dm-crypt mapping (LUKS or
    plain): device-mapper's uuid of such a mapping starts with ``CRYPT-``."""
    return _dm_crypt(_mount_of(path)[1], sys_root)


def _dm_crypt(device: str, sys_root: str = "/sys") -> bool:
    name = os.path.basename(os.path.realpath(device))
    if not name.startswith("dm-"):
        return False
    try:
        with open(os.path.join(sys_root, "block", name, "dm", "uuid")) as f:
            return f.read().startswith("CRYPT-")
    except OSError:
        return False


@contextlib.contextmanager
def closed_on_error(spool: EncryptedSpool | None) -> Iterator[None]:
    """Close ``spool`` (if any) when the block raises."""
    try:
        yield
    except BaseException:
        if spool is not None:
            spool.close()
        raise


def _private_fs(path: str | os.PathLike[str]) -> bool:
    """Memory or dm-crypt: the rule of both checks below (one read of mountinfo)."""
    kind, device = _mount_of(path)
    return kind in _MEMORY or _dm_crypt(device)


def _within(path: str | os.PathLike[str], directory: str) -> bool:
    real = os.path.realpath(path)
    return real == directory or real.startswith(directory + "/")


def private_at_rest(path: str | os.PathLike[str]) -> bool:
    """Whether what is written at ``path`` stays out of reach at rest, by the rule of
    :func:`check_state_dir`: memory (tmpfs, ramfs), a filesystem on a dm-crypt mapping, or
    inside an encrypted spool this process holds open."""
    return any(_within(path, d) for d in _OPEN) or _private_fs(path)


def check_state_dir(path: str | os.PathLike[str], spool: EncryptedSpool | None = None) -> None:
    """ConfigError unless a receiver may keep its state in ``path``: memory (tmpfs or
    ramfs), a filesystem on a dm-crypt mapping (LUKS with an ephemeral key, set up by the
    guest's operator), or inside the open encrypted ``spool``. The state directory holds the
    workload's memory images in plaintext; on a disk they would stay readable after the
    migration, outside the guest's encrypted memory."""
    if spool is not None:
        if spool._identifier is None or not _within(path, os.path.realpath(spool.path)):
            raise ConfigError(f"the state directory {path} is not inside the open encrypted "
                              f"spool {spool.path}")
        return
    if not _private_fs(path):
        raise ConfigError(
            f"the receiver's state directory {path} is on a disk-backed filesystem "
            f"({fstype(path)}): it would hold the workload's memory images in plaintext at "
            "rest. Give a directory on a tmpfs or ramfs (--state, e.g. /run/ctlive where /run "
            "is a tmpfs, or a tmpfs mounted for it), or an encrypted spool for images larger "
            "than memory (ctlive serve --spool FILE --spool-size SIZE; serve(spool=...)), or "
            "a filesystem on a dm-crypt (LUKS) mapping")


def parse_size(text: str | int) -> int:
    """Bytes from ``"512M"``, ``"4G"``, ``"1T"``, ``"65536"`` or an integer (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = int(float(t) * scale)
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (expected bytes, or a number with K, M, G or "
                          "T)") from None
    if value <= 0:
        raise ConfigError(f"not a size: {text!r} (must be positive)")
    return value
