"""The podman store check of a receiver (``podman_store.check_at_rest``): memory or the
open encrypted spool is accepted, a disk is refused with a message that says why and what
to configure, short enough to reach the source whole (an ERROR frame carries 500
characters)."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

from ctlive.backends import podman_store
from ctlive.errors import DataAtRestError
from ctlive.migration import spool
from ctlive.migration.limits import refusal_code


def test_memory_is_accepted(memory_path: pathlib.Path) -> None:
    podman_store.check_at_rest((str(memory_path / "graph"), str(memory_path / "run")))


def test_a_disk_is_refused_with_why_and_what_to_configure() -> None:
    disk = tempfile.mkdtemp(prefix="ctlive-at-rest-", dir="/var/tmp")
    try:
        if spool.private_at_rest(disk):
            pytest.skip("/var/tmp is memory here")
        for roots, what in (((disk, "/dev/shm"), "graphroot"), (("/dev/shm", disk), "runroot")):
            with pytest.raises(DataAtRestError) as info:
                podman_store.check_at_rest(roots)
            text = str(info.value)
            assert what in text and disk in text and len(text) < 500, text
            for part in ("disk-backed", "plaintext", "unpacked checkpoint", "storage.conf",
                         "CONTAINERS_STORAGE_CONF", "tmpfs", "encrypted spool", "dm-crypt"):
                assert part in text, (part, text)
            assert refusal_code(info.value) == "data-at-rest-refused"
    finally:
        os.rmdir(disk)


def test_inside_an_open_spool_only_while_it_is_open(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: pathlib.Path) -> None:
    """The spool's directory counts while this process holds it open (its key in the
    kernel); ``lock()`` ends that (no fscrypt needed to check the rule)."""
    if spool.private_at_rest(tmp_path):
        pytest.skip("the temporary directory is memory here")
    enc = spool.EncryptedSpool(tmp_path / "spool.img", 16 << 20)
    monkeypatch.setattr(spool, "_OPEN", {os.path.realpath(enc.path)})
    podman_store.check_at_rest((str(enc.path / "graph"), str(enc.path / "run")))
    with pytest.raises(DataAtRestError):
        podman_store.check_at_rest((str(enc.mount / "graph"),))  # outside the spool's dir
    enc.lock()
    with pytest.raises(DataAtRestError):
        podman_store.check_at_rest((str(enc.path / "graph"),))
