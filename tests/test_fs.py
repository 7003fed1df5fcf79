"""ctlive.fs: private directories (0700) and files (0600), whatever the umask."""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
from collections.abc import Iterator

import pytest

from ctlive.errors import StorageError
from ctlive.fs import private_dir, private_tempdir, tighten_tree


def mode(p: pathlib.Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0, 0o022, 0o777])
def test_private_dir_creates_0700_whatever_the_umask(tmp_path: pathlib.Path, mask: int) -> None:
    target = tmp_path / "a" / "b" / "state"
    with umask(mask):
        got = private_dir(target)
    assert got == target and target.is_dir()
    assert mode(target) == mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700


def test_private_dir_tightens_an_existing_directory(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    (d / "keep").write_text("x")
    os.chmod(d, 0o777)
    assert private_dir(str(d)) == d
    assert mode(d) == 0o700 and (d / "keep").read_text() == "x"
    assert private_dir(d) == d  # idempotent


def test_private_dir_refuses_what_is_not_our_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as info:
        private_dir(tmp_path / "file")
    assert info.value.path == str(tmp_path / "file")
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(StorageError):
        private_dir(tmp_path / "link")
    assert mode(real) == 0o755  # not followed
    with pytest.raises(StorageError):
        private_dir(tmp_path / "file" / "below")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_private_dir_refuses_another_users_directory(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(StorageError, match="belongs to uid 65534"):
        private_dir(d)
    assert mode(d) == 0o755


@pytest.mark.parametrize("mask", [0, 0o277])
def test_private_tempdir(tmp_path: pathlib.Path, mask: int) -> None:
    with umask(mask):
        a = private_tempdir("ctlive-test-", tmp_path)
        b = private_tempdir("ctlive-test-", dir=str(tmp_path))
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith("ctlive-test-") and mode(a) == mode(b) == 0o700
    with pytest.raises(StorageError):
        private_tempdir("x", tmp_path / "missing")


def test_tighten_tree(tmp_path: pathlib.Path) -> None:
    top = tmp_path / "images"
    with umask(0):
        (top / "sub" / "deeper").mkdir(parents=True, mode=0o777)
        os.chmod(top, 0o777)
        for f in (top / "pages-1.img", top / "sub" / "core.img", top / "sub" / "deeper" / "x"):
            f.write_text("data")
            os.chmod(f, 0o666)
        os.mkfifo(top / "fifo", 0o666)
    outside = tmp_path / "outside"
    outside.write_text("not ours to change")
    os.chmod(outside, 0o644)
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir(mode=0o755)
    (top / "link").symlink_to(outside)
    (top / "sub" / "dirlink").symlink_to(outside_dir)

    with umask(0):
        tighten_tree(top)

    for d in (top, top / "sub", top / "sub" / "deeper"):
        assert mode(d) == 0o700, d
    for f in (top / "pages-1.img", top / "sub" / "core.img", top / "sub" / "deeper" / "x"):
        assert mode(f) == 0o600, f
    assert mode(outside) == 0o644 and mode(outside_dir) == 0o755  # symlinks not followed
    assert mode(top / "fifo") == 0o666  # not a regular file: left alone
    assert (top / "sub" / "core.img").read_text() == "data"


def test_tighten_tree_refuses_a_symlink_or_a_missing_top(tmp_path: pathlib.Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(StorageError, match="not a directory"):
        tighten_tree(tmp_path / "link")
    assert mode(real) == 0o755
    with pytest.raises(StorageError) as info:
        tighten_tree(tmp_path / "missing")
    assert info.value.path == str(tmp_path / "missing")
