"""Long-term X25519 identities (Noise static keys) for sources and receivers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import tempfile

import attrs
from nacl.public import PrivateKey

from ctlive.errors import ConfigError

__all__ = [
    "Identity",
    "load_public_keys",
]

_HEADER = "ctlive-x25519-private-key"
_KEY_MODE = 0o600


@attrs.frozen(repr=False)
class Identity:
    """A static X25519 key pair. The private half never appears in ``repr``."""

    private_key: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    """32 raw bytes of the X25519 private key."""

    def __attrs_post_init__(self) -> None:
        if len(self.private_key) != 32:
            raise ConfigError("an X25519 private key is 32 bytes")

    @property
    def public_key(self) -> bytes:
        """The 32-byte X25519 public key."""
        return bytes(PrivateKey(self.private_key).public_key)

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key.hex()})"

    @classmethod
    def generate(cls) -> Identity:
        """Make a fresh random identity."""
        return cls(bytes(PrivateKey.generate()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file written by :meth:`save` (``~`` is expanded).

        The file must not be readable, writable or executable by anyone but its owner
        (mode 0600 or narrower), or ConfigError says the mode found and the fix."""
        p = pathlib.Path(path).expanduser()
        try:
            with p.open("rb") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & ~_KEY_MODE:
                    raise ConfigError(
                        f"{p} has mode {mode:04o}: a private key file must be readable and "
                        f"writable by its owner only (0600 or narrower); fix: chmod 600 {p}")
                raw = f.read(4096)
        except OSError as exc:
            raise ConfigError(f"cannot read identity file {p}: {exc}", cause=exc) from exc
        text = raw.decode("ascii", errors="replace").split()
        if len(text) != 2 or text[0] != _HEADER:
            raise ConfigError(f"{p} is not a ctlive key file (expected '{_HEADER} <hex>')")
        try:
            key = bytes.fromhex(text[1])
        except ValueError as exc:
            raise ConfigError(f"{p}: key is not hex", cause=exc) from exc
        return cls(key)

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write the private key to ``path`` (mode 0600) and the public key beside it
        (``path.pub``, mode 0644), each atomically: a temporary file in the same
        directory, flushed to disk, then renamed over the name, so a crash leaves the
        old file or the new one, never half of one. A missing directory is created 0700.

        An existing key file is never overwritten unless ``force`` is true
        (ConfigError)."""
        p = pathlib.Path(path).expanduser()
        if not force and os.path.lexists(p):
            raise ConfigError(_exists(p))
        try:
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            written = _write_atomically(p, f"{_HEADER} {self.private_key.hex()}\n",
                                        _KEY_MODE, replace=force)
            if written:
                _write_atomically(p.with_name(p.name + ".pub"), self.public_key.hex() + "\n",
                                  0o644, replace=True)
        except OSError as exc:
            raise ConfigError(f"cannot write identity file {p}: {exc}", cause=exc) from exc
        if not written:  # it appeared meanwhile
            raise ConfigError(_exists(p))


def _exists(p: pathlib.Path) -> str:
    return f"{p} already exists; not overwriting a private key (pass force=True to replace it)"


def _write_atomically(p: pathlib.Path, text: str, mode: int, *, replace: bool) -> bool:
    """Write ``text`` to a temporary file beside ``p`` with ``mode``, sync it, and move it
    to ``p``: over an existing file if ``replace``, else not if ``p`` exists (a hard link
    never overwrites; where links are not supported, a check then a rename). Returns
    whether ``p`` was written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp made it 0600 minus the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system
                if os.path.lexists(p):
                    return False
                os.rename(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def load_public_keys(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """Read an allow-list: one hex X25519 public key per line, ``#`` comments allowed."""
    p = pathlib.Path(path).expanduser()
    keys: set[bytes] = set()
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read key list {p}: {exc}", cause=exc) from exc
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError as exc:
            raise ConfigError(f"{p}:{n}: not a hex key", cause=exc) from exc
        if len(key) != 32:
            raise ConfigError(f"{p}:{n}: an X25519 public key is 32 bytes, got {len(key)}")
        keys.add(key)
    return frozenset(keys)
