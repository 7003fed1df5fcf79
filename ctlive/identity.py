"""Long-term X25519 identities (Noise static keys) for sources and receivers."""

from __future__ import annotations

import os
import pathlib

import attrs
from nacl.public import PrivateKey

from ctlive.errors import ConfigError

__all__ = [
    "Identity",
    "load_public_keys",
]

_HEADER = "ctlive-x25519-private-key"


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
        """Read a key file written by :meth:`save` (``~`` is expanded)."""
        p = pathlib.Path(path).expanduser()
        try:
            text = p.read_text().split()
        except OSError as exc:
            raise ConfigError(f"cannot read identity file {p}: {exc}", cause=exc) from exc
        if len(text) != 2 or text[0] != _HEADER:
            raise ConfigError(f"{p} is not a ctlive key file (expected '{_HEADER} <hex>')")
        try:
            key = bytes.fromhex(text[1])
        except ValueError as exc:
            raise ConfigError(f"{p}: key is not hex", cause=exc) from exc
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key to ``path`` with mode 0600, and the public key beside it (.pub)."""
        p = pathlib.Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HEADER} {self.private_key.hex()}\n")
        p.with_name(p.name + ".pub").write_text(self.public_key.hex() + "\n")


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
