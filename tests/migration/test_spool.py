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


def test_sizes() -> None:
    from ctlive.migration.spool import parse_size

    assert parse_size("64G") == 64 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("65536") == 65536 and parse_size(4096) == 4096
    assert parse_size("1.5k") == 1536
    for bad in ("12Q", "", "G", "-1M", "0"):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)


def test_the_state_directory_must_be_memory_or_encrypted(tmp_path: pathlib.Path) -> None:
    from ctlive.migration.spool import check_state_dir

    check_state_dir("/dev/shm/some/state")  # need not exist yet
    with pytest.raises(ConfigError, match="disk-backed") as info:
        check_state_dir(tmp_path / "state")
    assert "plaintext" in str(info.value) and "--spool" in str(info.value)
    assert not (tmp_path / "state").exists()


def test_a_dm_crypt_mapping_is_recognized(tmp_path: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Device-mapper names a dm-crypt mapping's uuid CRYPT-...; any other mapping (LVM,
    a plain disk) is not encryption."""
    from ctlive.migration import spool

    sys_root = tmp_path / "sys"
    for dm, uuid in (("dm-0", "CRYPT-LUKS2-0123-ctlive"), ("dm-1", "LVM-abcdef")):
        (sys_root / "block" / dm / "dm").mkdir(parents=True)
        (sys_root / "block" / dm / "dm" / "uuid").write_text(uuid + "\n")
    for device, want in (("/dev/dm-0", True), ("/dev/dm-1", False), ("/dev/sda1", False),
                         ("/dev/dm-7", False)):
        monkeypatch.setattr(spool, "_mount_of", lambda _p, d=device: ("ext4", d))
        assert spool.dm_crypt_backed("/x", sys_root=str(sys_root)) is want, device
