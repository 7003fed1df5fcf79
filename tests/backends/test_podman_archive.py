"""A podman checkpoint archive as ctlive carries it: every member travels (named volumes
too), and the destination checks members, the tars inside and the base image as the
untrusted input they are."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import stat
import tarfile
from collections.abc import Callable

import pytest

from ctlive.backends import podman_archive as pa
from ctlive.errors import CheckpointError, RestoreSpecError


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:  # type: ignore[call-overload]
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
          dev: tuple[int, int] = (0, 0)) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.devmajor, info.devminor = dev
    return info


def files(**named: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(entry(n), d) for n, d in named.items()]


def test_every_member_travels_and_the_archive_comes_back(tmp_path: pathlib.Path) -> None:
    volume = tar_bytes(files(log=b"1\n2\n"))
    src = tmp_path / "export.tar"
    src.write_bytes(tar_bytes([(entry("checkpoint", tarfile.DIRTYPE), b""),
                               (entry("volumes", tarfile.DIRTYPE), b""),
                               *files(**{"checkpoint/pages-1.img": b"p", "config.dump": b"{}",
                                         "volumes/data.tar": volume,
                                         "rootfs-diff.tar": tar_bytes(files(a=b"x")),
                                         "deleted.files": b'["/etc/motd"]'})]))
    flat = tmp_path / "flat"
    flat.mkdir()
    pa.flatten(src, flat)
    assert sorted(p.name for p in flat.iterdir()) == [
        "pages-1.img", "podman+config.dump", "podman+deleted.files",
        "podman+rootfs-diff.tar+00000", "podman+volumes+data.tar+00000"]
    (flat / f"{pa.IMAGE_PREFIX}{'0' * 64}.tar").write_bytes(b"loaded on its own")
    assert pa.check_members(flat, allow_devices=False) == ["data"]
    out = tmp_path / "restore.tar"
    pa.unflatten(flat, out)
    with tarfile.open(out) as t:
        got = {m.name: t.extractfile(m).read() for m in t if m.isfile()}  # type: ignore[union-attr]
    assert got["volumes/data.tar"] == volume and got["checkpoint/pages-1.img"] == b"p"
    assert not any(n.startswith(pa.IMAGE_PREFIX) for n in got)


def test_a_volume_travels_in_chunks_that_stay_put_when_a_file_grows(
        tmp_path: pathlib.Path) -> None:
    vol, flat = tmp_path / "vol", tmp_path / "flat"
    (vol / "sub").mkdir(parents=True)
    flat.mkdir()
    big = bytes(range(256)) * (pa.CHUNK // 128)  # two chunks' worth, written first
    (vol / "sub" / "blob").write_bytes(big)
    os.utime(vol / "sub" / "blob", ns=(1, 1))
    try:
        os.setxattr(vol / "sub" / "blob", "user.origin", b"\xffsource")
    except OSError:
        pytest.skip("no user xattrs on this filesystem")
    (vol / "log").write_text("1\n")
    pa.tree_tar(vol, flat, "volumes/data.tar")
    (vol / "sub" / "new").write_text("")  # a directory's mtime changes: it comes last
    before = {p.name: p.read_bytes() for p in flat.iterdir()}
    assert len(before) == 3 and pa.check_members(flat, allow_devices=False) == ["data"]
    with open(vol / "log", "a") as f:
        f.write("2\n")
    pa.tree_tar(vol, flat, "volumes/data.tar")
    after = {p.name: p.read_bytes() for p in flat.iterdir()}
    # The old blob comes before the growing log: only the last chunk changed.
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == ["podman+volumes+data.tar+00002"]
    out = tmp_path / "restore.tar"
    pa.unflatten(flat, out)
    with tarfile.open(out) as t, tarfile.open(fileobj=t.extractfile("volumes/data.tar")) as inner:
        assert inner.extractfile("sub/blob").read() == big  # type: ignore[union-attr]
        xattr = inner.getmember("sub/blob").pax_headers["SCHILY.xattr.user.origin"]
        assert xattr.encode("utf-8", "surrogateescape") == b"\xffsource"
        assert inner.extractfile("log").read() == b"1\n2\n"  # type: ignore[union-attr]
    (flat / "podman+volumes+data.tar+00001").unlink()
    refused(flat, "archive.podman+volumes+data.tar", "chunks are not")


def test_a_member_ctlive_cannot_carry_is_an_error_not_a_loss(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "export.tar"
    src.write_bytes(tar_bytes(files(**{"secrets/deep/key": b"k"})))
    (tmp_path / "flat").mkdir()
    with pytest.raises(CheckpointError, match="cannot carry"):
        pa.flatten(src, tmp_path / "flat")


def refused(flat: pathlib.Path, field: str, match: str) -> None:
    with pytest.raises(RestoreSpecError, match=match) as info:
        pa.check_members(flat, allow_devices=False)
    assert info.value.field == field


BAD_VOLUMES: list[tuple[str, list[tuple[tarfile.TarInfo, bytes]], str]] = [
    ("dotdot", files(**{"../../etc/cron.d/x": b"x"}), "climbs out"),
    ("absolute", files(**{"/etc/passwd": b"x"}), "climbs out"),
    ("through-symlink", [(entry("d", tarfile.SYMTYPE, "/etc"), b""), *files(**{"d/passwd": b"x"})],
     "through a symlink"),
    ("hardlink-out", [(entry("h", tarfile.LNKTYPE, "../../etc/shadow"), b"")], "climbs out"),
    ("device", [(entry("sda", tarfile.BLKTYPE, dev=(8, 0)), b"")], "allow_devices"),
    ("char-device", [(entry("mem", tarfile.CHRTYPE, dev=(1, 1)), b"")], "allow_devices"),
]


@pytest.mark.parametrize(("members", "match"), [b[1:] for b in BAD_VOLUMES],
                         ids=[b[0] for b in BAD_VOLUMES])
def test_a_volume_tar_is_checked(tmp_path: pathlib.Path,
                                 members: list[tuple[tarfile.TarInfo, bytes]],
                                 match: str) -> None:
    (tmp_path / "podman+volumes+data.tar+00000").write_bytes(tar_bytes(members))
    refused(tmp_path, "archive.podman+volumes+data.tar", match)


def test_overlay_whiteouts_pass_and_compressed_tars_do_not(tmp_path: pathlib.Path) -> None:
    whiteout = [(entry("etc/gone", tarfile.CHRTYPE, dev=(0, 0)), b"")]
    (tmp_path / "podman+rootfs-diff.tar+00000").write_bytes(tar_bytes(whiteout))
    assert pa.check_members(tmp_path, allow_devices=False) == []
    (tmp_path / "podman+rootfs-diff.tar+00000").write_bytes(tar_bytes(files(a=b"x"), "w:gz"))
    refused(tmp_path, "archive.podman+rootfs-diff.tar", "not an uncompressed tar")
    (tmp_path / "podman+rootfs-diff.tar+00000").rename(tmp_path / "podman+rootfs-diff.tar")
    refused(tmp_path, "archive.podman+rootfs-diff.tar", "must travel in chunks")


def test_the_rootfs_diff_is_the_upper_directory_without_overlay_internals(
        tmp_path: pathlib.Path) -> None:
    upper, flat = tmp_path / "upper", tmp_path / "flat"
    (upper / "etc").mkdir(parents=True)
    flat.mkdir()
    (upper / "etc" / "motd").write_text("hello\n")
    os.mknod(upper / "etc" / "gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
    try:
        os.setxattr(upper / "etc", "trusted.overlay.opaque", b"y")
    except OSError:
        pytest.skip("no trusted xattrs here")
    pa.tree_tar(upper, flat, "rootfs-diff.tar", overlay=True)
    out = tmp_path / "restore.tar"
    pa.unflatten(flat, out)
    with tarfile.open(out) as t, tarfile.open(fileobj=t.extractfile("rootfs-diff.tar")) as diff:
        assert diff.getnames() == ["etc/motd", "etc", "."]
        assert not any("overlay" in k for k in diff.getmember("etc").pax_headers)


CASES: list[tuple[str, Callable[[pathlib.Path], None], str, str]] = [
    ("unknown", lambda d: (d / "podman+pod.options").write_text("{}"), "archive.podman+pod.options",
     "does not read"),
    ("deleted-dotdot", lambda d: (d / "podman+deleted.files").write_text('["/../../etc"]'),
     "archive.podman+deleted.files[0]", "climbs out"),
    ("bind-mounts-type", lambda d: (d / "podman+bind.mounts").write_text('{"a": 1}'),
     "archive.podman+bind.mounts", "list of at most"),
    ("image-name", lambda d: (d / "podman-image+latest.tar").write_bytes(b""),
     "archive.podman-image+latest.tar", "named by its id"),
]


@pytest.mark.parametrize(("make", "field", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_members_are_checked(tmp_path: pathlib.Path, make: Callable[[pathlib.Path], None],
                             field: str, match: str) -> None:
    make(tmp_path)
    refused(tmp_path, field, match)


def docker_archive(tmp_path: pathlib.Path, *, tags: list[str] | None = None,
                   tamper: bool = False, extra: list[tuple[tarfile.TarInfo, bytes]] = ()
                   ) -> tuple[pathlib.Path, str]:
    """A docker-archive as `podman image save` writes it: config named by its digest."""
    layer = tar_bytes(files(**{"bin/sh": b"\x7fELF"}))
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [
        f"sha256:{hashlib.sha256(layer).hexdigest()}"]}}).encode()
    image_id = hashlib.sha256(config).hexdigest()
    manifest = json.dumps([{"Config": f"{image_id}.json", "RepoTags": tags or [],
                            "Layers": ["l1.tar"]}]).encode()
    members = [*files(**{f"{image_id}.json": config, "l1.tar": layer + (b"!" if tamper else b""),
                         "manifest.json": manifest}),
               (entry("abc/layer.tar", tarfile.SYMTYPE, "../l1.tar"), b""), *extra]
    path = tmp_path / "image.tar"
    path.write_bytes(tar_bytes(members))
    return path, image_id


def test_the_image_is_checked_against_its_digest(tmp_path: pathlib.Path) -> None:
    path, image_id = docker_archive(tmp_path)
    pa.check_image(path, image_id)
    with pytest.raises(RestoreSpecError, match="digest differs"):
        pa.check_image(path, "1" * 64)
    for kw, match in (({"tamper": True}, "does not match its digest"),
                      ({"tags": ["docker.io/library/busybox:latest"]}, "carries tags"),
                      ({"extra": [(entry("x", tarfile.SYMTYPE, "../../etc/passwd"), b"")]},
                       "points outside"),
                      ({"extra": [(entry("d", tarfile.CHRTYPE, dev=(1, 3)), b"")]},
                       "not a file or directory")):
        path, image_id = docker_archive(tmp_path, **kw)  # type: ignore[arg-type]
        with pytest.raises(RestoreSpecError, match=match):
            pa.check_image(path, image_id)
    path.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(RestoreSpecError, match="not a docker-archive"):
        pa.check_image(path, image_id)


def podman_specs(tmp_path: pathlib.Path, netns_path: str) -> pathlib.Path:
    """spec.dump and config.dump of a container that joins ``netns_path``."""
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "mounts": [],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
                      + [{"type": "network", "path": netns_path}]}}
    d = tmp_path / "img"
    d.mkdir()
    (d / "podman+spec.dump").write_text(json.dumps(spec))
    (d / "podman+config.dump").write_text(json.dumps({"createNetNS": False}))
    return d


def test_only_the_namespace_the_receiver_rebuilt_may_be_joined(tmp_path: pathlib.Path) -> None:
    from ctlive.backends import RestorePolicy
    from ctlive.backends.podman import check_podman_archive, podman_restore_name

    d = podman_specs(tmp_path, "/run/netns/pm-1")
    storage = ("/var/lib/containers/storage", "/run/containers/storage")

    def check(own: str | None) -> None:
        check_podman_archive(d, RestorePolicy(), storage=storage, store=tmp_path, own_netns=own)

    check("/run/netns/pm-1")
    for own in (None, "/run/netns/other"):
        with pytest.raises(RestoreSpecError, match="joining the existing network namespace"):
            check(own)
    with pytest.raises(RestoreSpecError, match="true or false") as info:
        podman_restore_name({"name": "pm-1", "tcp_established": "yes"})
    assert info.value.field == "tcp_established"
    with pytest.raises(RestoreSpecError) as info:
        podman_restore_name({"name": "pm-1", "network": {"name": "--all", "interfaces": []}})
    assert info.value.field.startswith("network")
