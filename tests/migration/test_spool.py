"""The encrypted spool (ext4 + fscrypt v2 on a loop device) and the memory check."""

from __future__ import annotations

import os
import pathlib

import pytest

from ctlive.errors import ConfigError
from ctlive.migration.spool import EncryptedSpool, memory_backed

MARKER = b"ctlive-plaintext-marker-" * 64


@pytest.fixture
def spool(tmp_path: pathlib.Path) -> EncryptedSpool:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    return EncryptedSpool(tmp_path / "spool.img", 32 << 20)


def test_files_in_the_spool_are_not_plaintext_on_disk(spool: EncryptedSpool) -> None:
    with spool as d:
        assert d.is_dir() and oct(d.stat().st_mode & 0o777) == "0o700"
        (d / "pages-1.img").write_bytes(MARKER * 100)
        (d / "secret-name.img").write_bytes(b"x")
        assert (d / "pages-1.img").read_bytes() == MARKER * 100
        os.sync()
        raw = spool.image.read_bytes()
        assert MARKER not in raw and b"secret-name" not in raw
    # Closed: the key is gone, the image deleted, nothing mounted.
    assert not spool.image.exists() and not spool.mount.exists()


def test_removing_the_key_makes_the_data_unreadable(spool: EncryptedSpool) -> None:
    d = spool.open()
    try:
        (d / "f").write_bytes(MARKER)
        os.sync()
        spool.lock()
        os.system("echo 2 > /proc/sys/vm/drop_caches")
        names = os.listdir(d)
        assert "f" not in names  # names are ciphertext now
        with pytest.raises(OSError):
            (d / names[0]).read_bytes()
    finally:
        spool.close()
    assert not spool.image.exists()


def test_memory_check(tmp_path: pathlib.Path) -> None:
    assert memory_backed("/dev/shm")
    assert memory_backed("/proc") is False
    with pytest.raises(ConfigError):
        EncryptedSpool(tmp_path / "tiny.img", 1 << 20)
