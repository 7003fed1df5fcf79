"""Key files: Identity.save/load and ``ctlive keygen`` keep private keys private and
never overwrite one by accident."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import pytest

from ctlive.cli import main
from ctlive.errors import ConfigError
from ctlive.identity import Identity


def mode(p: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_save_and_load_round_trip(tmp_path: pathlib.Path) -> None:
    ident = Identity.generate()
    key = tmp_path / "new-dir" / "receiver.key"
    old = os.umask(0)
    try:
        ident.save(key)
    finally:
        os.umask(old)
    assert mode(key) == 0o600 and mode(key.with_name("receiver.key.pub")) == 0o644
    assert mode(key.parent) == 0o700
    assert Identity.load(key) == ident
    assert key.with_name("receiver.key.pub").read_text() == ident.public_key.hex() + "\n"
    assert [p.name for p in sorted(key.parent.iterdir())] == ["receiver.key",
                                                              "receiver.key.pub"]


@pytest.mark.parametrize("bad", [0o640, 0o604, 0o644, 0o660, 0o606, 0o666, 0o700, 0o610])
def test_load_refuses_a_key_others_can_use(tmp_path: pathlib.Path, bad: int) -> None:
    key = tmp_path / "k.key"
    Identity.generate().save(key)
    os.chmod(key, bad)
    with pytest.raises(ConfigError) as info:
        Identity.load(key)
    message = str(info.value)
    assert f"mode {bad:04o}" in message
    assert f"chmod 600 {key}" in message


@pytest.mark.parametrize("fine", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path: pathlib.Path, fine: int) -> None:
    key = tmp_path / "k.key"
    ident = Identity.generate()
    ident.save(key)
    os.chmod(key, fine)
    assert Identity.load(key) == ident


def test_load_checks_the_file_a_symlink_points_to(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "k.key"
    Identity.generate().save(key)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    assert Identity.load(link) == Identity.load(key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        Identity.load(link)


def test_save_refuses_to_overwrite(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "k.key"
    first = Identity.generate()
    first.save(key)
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate().save(key)
    assert Identity.load(key) == first
    assert key.with_name("k.key.pub").read_text() == first.public_key.hex() + "\n"
    # also a dangling symlink, or anything else in the way
    (tmp_path / "dangling.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists"):
        first.save(tmp_path / "dangling.key")
    assert not (tmp_path / "nowhere").exists()


def test_save_with_force_replaces(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "k.key"
    Identity.generate().save(key)
    os.chmod(key, 0o644)
    second = Identity.generate()
    second.save(key, force=True)
    assert Identity.load(key) == second and mode(key) == 0o600
    assert key.with_name("k.key.pub").read_text() == second.public_key.hex() + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.key.pub"]  # no temps


def test_save_never_overwrites_a_key_that_appears_meanwhile(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "k.key"
    first = Identity.generate()
    first.save(key)
    # The early check misses it (as if the file appeared just after it): the hard link
    # that puts the new key in place still refuses to overwrite.
    monkeypatch.setattr("ctlive.identity.os.path.lexists", lambda p: False)
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate().save(key)
    monkeypatch.undo()
    assert Identity.load(key) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.key.pub"]


def test_save_without_hard_links(tmp_path: pathlib.Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("ctlive.identity.os.link", no_links)
    ident = Identity.generate()
    ident.save(tmp_path / "k.key")
    assert Identity.load(tmp_path / "k.key") == ident
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate().save(tmp_path / "k.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.key.pub"]


def test_save_into_an_unwritable_place(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write identity file"):
        Identity.generate().save(tmp_path / "file" / "k.key")


def test_load_errors_are_config_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read identity file"):
        Identity.load(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"\xff\xfe not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not a ctlive key file"):
        Identity.load(junk)


# --- ctlive keygen -------------------------------------------------------------------------


def test_keygen_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "receiver.key"
    assert main(["keygen", "-o", str(key)]) == 0
    public = capsys.readouterr().out.strip()
    first = Identity.load(key)
    assert first.public_key.hex() == public
    assert mode(key) == 0o600 and mode(tmp_path / "receiver.key.pub") == 0o644

    assert main(["keygen", "-o", str(key)]) == 2
    err = capsys.readouterr().err
    assert f"{key} already exists" in err and "--force" in err
    assert Identity.load(key) == first  # untouched

    assert main(["keygen", "-o", str(key), "--force"]) == 0
    replaced = Identity.load(key)
    assert replaced != first and replaced.public_key.hex() == capsys.readouterr().out.strip()


def ctlive_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "ctlive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ctlive"]


def test_keygen_as_a_subprocess(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "source.key"

    def keygen(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ctlive_command(), "keygen", "-o", str(key), *extra],
                              capture_output=True, text=True, timeout=60, check=False)

    made = keygen()
    assert made.returncode == 0, made.stderr
    before = key.read_bytes()
    assert Identity.load(key).public_key.hex() == made.stdout.strip()

    refused = keygen()
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert refused.stdout == ""
    assert key.read_bytes() == before

    forced = keygen("--force")
    assert forced.returncode == 0, forced.stderr
    assert key.read_bytes() != before
    assert Identity.load(key).public_key.hex() == forced.stdout.strip()
