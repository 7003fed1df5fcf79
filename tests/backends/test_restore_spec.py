"""The restore spec is untrusted input: the receiver builds the runc config from its own
template, checks podman's archive metadata and the process options, and refuses what
its RestorePolicy does not allow, each refusal a RestoreSpecError naming the field."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import resource
import shutil
from collections.abc import Callable
from typing import Any

import anyio
import attrs
import pytest

from ctlive.backends import RestorePolicy, restore
from ctlive.backends.podman import _TOP, check_podman_archive, podman_restore_name
from ctlive.backends.process import process_restore_args
from ctlive.backends.restore import DEFAULT_CAPABILITIES
from ctlive.backends.runc import runc_restore_config
from ctlive.errors import ConfigError, RestoreError, RestoreSpecError

Spec = dict[str, Any]
CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
KERNEL_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
]


def runc_spec(rootfs: pathlib.Path) -> Spec:
    """What RuncContainer.restore_spec() sends for tests/helpers' RuncBundle: `runc
    spec`'s config, not a terminal, a counting shell, a writable root."""
    caps = {k: list(CAPS) for k in ("bounding", "effective", "permitted", "ambient")}
    return {"id": "ctlive-test-1", "rootfs": str(rootfs), "config": {
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                    "args": ["sh", "-c", "i=0; while true; do i=$((i+1)); done"],
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"], "cwd": "/",
                    "capabilities": caps, "noNewPrivileges": True,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
        "root": {"path": "rootfs", "readonly": False}, "hostname": "runc",
        "mounts": copy.deepcopy(KERNEL_MOUNTS),
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]},
                  "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                  "maskedPaths": ["/proc/kcore", "/sys/firmware"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]}}}


@pytest.fixture
def store(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "store" / "c1" / "rootfs").mkdir(parents=True)
    return tmp_path / "store"


def build(spec: Spec, store: pathlib.Path, policy: RestorePolicy | None = None) -> Spec:
    cid, config = runc_restore_config(spec, policy or RestorePolicy(), store=store,
                                      bundles=store.parent / "bundles", migration="m1")
    assert cid == spec["id"]
    return config


def refused(field: str, match: str, fn: Callable[[], object]) -> RestoreSpecError:
    with pytest.raises(RestoreSpecError, match=match) as info:
        fn()
    assert info.value.field == field
    assert str(info.value).startswith("[restore] restore spec refused: ")
    assert isinstance(info.value, RestoreError)
    return info.value


def test_a_normal_runc_spec_is_accepted_into_the_receivers_template(
        store: pathlib.Path) -> None:
    spec = runc_spec(store / "c1" / "rootfs")
    spec["config"]["annotations"] = {"org.criu.config": "/etc/evil.conf"}
    spec["config"]["process"]["noNewPrivileges"] = False
    spec["config"]["linux"]["sysctl"] = {"kernel.core_pattern": "|/tmp/x"}
    config = build(spec, store)
    src = spec["config"]
    assert config["root"] == {"path": str((store / "c1" / "rootfs").resolve()), "readonly": False}
    assert config["process"]["args"] == src["process"]["args"]
    assert config["process"]["env"] == src["process"]["env"]
    assert config["process"]["capabilities"] == src["process"]["capabilities"]
    assert config["process"]["rlimits"] == src["process"]["rlimits"]
    assert config["process"]["noNewPrivileges"] is True  # forced on
    assert config["mounts"] == [dict(m, options=m.get("options", [])) for m in KERNEL_MOUNTS]
    assert config["linux"]["namespaces"] == src["linux"]["namespaces"]
    assert config["linux"]["cgroupsPath"] == "/ctlive/ctlive-test-1-m1"
    # The receiver's own masks come first; the annotations are its own; no sysctl.
    assert config["linux"]["maskedPaths"][:2] == ["/proc/acpi", "/proc/asound"]
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert config["annotations"] == {
        "org.criu.config": str(store.parent / "bundles" / "ctlive-test-1" / "criu.conf")}
    assert "sysctl" not in config["linux"] and "hooks" not in config
    nnp = build(spec, store, RestorePolicy(no_new_privileges=False))
    assert nnp["process"]["noNewPrivileges"] is False


def test_the_spec_of_a_real_runc_container_is_accepted(tmp_path: pathlib.Path) -> None:
    """RuncContainer.restore_spec() of a running container, as the e2e test makes it."""
    from criu_harness import RuncBundle

    from ctlive.backends.runc import RuncContainer

    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("needs root and runc")
    name = f"ctlive-spec-{os.getpid()}"
    box = RuncBundle(tmp_path, name)
    try:
        carried = json.loads(json.dumps(RuncContainer(name).restore_spec()))
        spec = json.loads(json.dumps(RuncContainer(name, carry_rootfs=False).restore_spec()))
    finally:
        box.cleanup()
    # By default the rootfs is carried: the source's path does not travel, and the config
    # names the rootfs in the receiver's own bundle.
    assert "rootfs" not in carried and carried["carry"] == "rootfs"
    assert build(carried, tmp_path / "state" / "bundles")["root"]["path"] == "rootfs"
    config = build(spec, tmp_path, RestorePolicy(store=tmp_path))
    assert config["root"]["path"] == str((box.bundle / "rootfs").resolve())
    assert config["process"]["args"] == spec["config"]["process"]["args"]
    # Outside the default store (the state directory's bundles/) it is refused.
    refused("rootfs", "outside this receiver's store",
            lambda: build(spec, tmp_path / "state" / "bundles"))


def _hook(c: Spec) -> None:
    c["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "id > /x"]}]}


def _bind_root(c: Spec) -> None:
    c["mounts"].append({"destination": "/host", "type": "bind", "source": "/",
                        "options": ["rbind", "rw"]})


def _bind_by_option(c: Spec) -> None:
    c["mounts"].append({"destination": "/etc2", "type": "none", "source": "/etc",
                        "options": ["bind"]})


def _block_device_mount(c: Spec) -> None:
    c["mounts"].append({"destination": "/mnt", "type": "ext4", "source": "/dev/sda1"})


def _device_node(c: Spec) -> None:
    c["linux"]["devices"] = [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]


def _device_rule(c: Spec) -> None:
    c["linux"]["resources"]["devices"].append({"allow": True, "access": "rwm"})


def _cap_sys_admin(c: Spec) -> None:
    c["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")


def _host_netns(c: Spec) -> None:
    c["linux"]["namespaces"][1]["path"] = "/proc/1/ns/net"


def _no_netns(c: Spec) -> None:
    del c["linux"]["namespaces"][1]


def _seccomp_listener(c: Spec) -> None:
    c["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_NOTIFY", "listenerPath": "/run/agent"}


REFUSALS: list[tuple[str, Callable[[Spec], None], str, str, RestorePolicy | None]] = [
    ("hook", _hook, "config.hooks.prestart",
     r"OCI hooks \(config.hooks.prestart\) are not allowed on this receiver "
     r"\(RestorePolicy.allow_hooks\)", RestorePolicy(allow_hooks=True)),
    ("host-bind-mount", _bind_root, "config.mounts[7].source",
     r"bind mount of host path / into /host .*RestorePolicy.allow_host_mounts",
     RestorePolicy(allow_host_mounts=True)),
    ("bind-by-option", _bind_by_option, "config.mounts[7].source", "host path /etc",
     RestorePolicy(allowed_bind_sources=("/etc",))),
    ("other-filesystem", _block_device_mount, "config.mounts[7]",
     "not one of the container's own filesystems", RestorePolicy(allow_host_mounts=True)),
    ("device-node", _device_node, "config.linux.devices[0]",
     r"device /dev/sda \(b 8:0.*RestorePolicy.allow_devices", RestorePolicy(allow_devices=True)),
    ("device-rule", _device_rule, "config.linux.resources.devices[1]",
     r"allowing devices a \*:\*", RestorePolicy(allow_devices=True)),
    ("capability", _cap_sys_admin, "config.process.capabilities.bounding",
     r"capability CAP_SYS_ADMIN .*RestorePolicy.allowed_capabilities",
     RestorePolicy(allowed_capabilities=(*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"))),
    ("namespace-path", _host_netns, "config.linux.namespaces[1].path",
     "joining the existing network namespace /proc/1/ns/net",
     RestorePolicy(allow_host_namespaces=True)),
    ("missing-namespace", _no_netns, "config.linux.namespaces",
     "would share this receiver's network namespace", RestorePolicy(allow_host_namespaces=True)),
    ("seccomp-listener", _seccomp_listener, "config.linux.seccomp.listenerPath",
     "seccomp listener", RestorePolicy(allow_hooks=True)),
]


@pytest.mark.parametrize(("mutate", "field", "match", "allowing"),
                         [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_reaches_outside_the_container_is_refused_unless_allowed(
        store: pathlib.Path, mutate: Callable[[Spec], None], field: str, match: str,
        allowing: RestorePolicy | None) -> None:
    spec = runc_spec(store / "c1" / "rootfs")
    mutate(spec["config"])
    refused(field, match, lambda: build(spec, store))
    if allowing is not None:
        config = build(spec, store, attrs.evolve(allowing, store=store))
        assert json.dumps(config)  # taken, as JSON


def test_default_devices_are_left_to_the_runtime(store: pathlib.Path) -> None:
    spec = runc_spec(store / "c1" / "rootfs")
    spec["config"]["linux"]["devices"] = [
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 438}]
    assert "devices" not in build(spec, store)["linux"]


def test_a_bind_source_is_checked_after_resolving_symlinks(
        store: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "escape").symlink_to("/etc")
    policy = RestorePolicy(allowed_bind_sources=(str(tmp_path / "data"),))
    spec = runc_spec(store / "c1" / "rootfs")
    spec["config"]["mounts"].append({"destination": "/data", "type": "bind",
                                     "source": str(tmp_path / "data" / "sub")})
    build(spec, store, policy)
    spec["config"]["mounts"][-1]["source"] = str(tmp_path / "data" / "escape")
    refused("config.mounts[7].source", "bind mount of host path",
            lambda: build(spec, store, policy))


def _rootfs_cases(store: pathlib.Path) -> list[tuple[str, str]]:
    (store / "link").symlink_to("/usr")
    return [("/", "outside this receiver's store"),
            (str(store.parent), "outside this receiver's store"),
            (str(store), "outside this receiver's store"),
            (str(store / "c1" / ".." / ".." / "etc"), r"climbs out of its directory \('..'\)"),
            ("../etc", "climbs out"),
            (str(store / "link"), "outside this receiver's store"),
            (str(store / "missing"), "is not a directory in this receiver's store"),
            (5, "must be a string")]  # type: ignore[list-item]


def test_the_rootfs_must_be_in_the_store(store: pathlib.Path) -> None:
    for rootfs, match in _rootfs_cases(store):
        spec = runc_spec(store / "c1" / "rootfs")
        spec["rootfs"] = rootfs
        refused("rootfs", match, lambda spec=spec: build(spec, store))  # type: ignore[misc]
    spec = runc_spec(store / "c1" / "rootfs")
    spec["rootfs"] = "c1/rootfs"  # relative: in the store
    assert build(spec, store)["root"]["path"] == str((store / "c1" / "rootfs").resolve())


def _set(path: str, value: Any) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


MALFORMED = [
    ("id", 5, "id", "must be a string"),
    ("id", "--root", "id", "is not of the accepted form"),
    ("id", "../../x", "id", "is not of the accepted form"),
    ("id", "a/b", "id", "is not of the accepted form"),
    ("config", [], "config", "must be an object"),
    ("extra", 1, "extra", "unknown field extra"),
    ("config.process.args", "sh", "config.process.args", "must be a list"),
    ("config.process.args", [], "config.process.args", "is empty"),
    ("config.process.env", [1], "config.process.env[0]", "must be a string"),
    ("config.process.env", ["NOEQUALS"], "config.process.env[0]", "not of the accepted form"),
    ("config.process.user", {"uid": -1}, "config.process.user.uid", "integer from 0"),
    ("config.process.user", {"uid": True}, "config.process.user.uid", "integer from 0"),
    ("config.process.cwd", "tmp", "config.process.cwd", "not an absolute path"),
    ("config.process.terminal", True, "config.process.terminal", "console socket"),
    ("config.process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 11}],
     "config.process.rlimits[0].soft", "integer from 0 to 10"),
    ("config.process.rlimits", [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}],
     "config.process.rlimits[0].type", "not of the accepted form"),
    ("config.process.capabilities", {"bounding": "CAP_KILL"},
     "config.process.capabilities.bounding", "must be a list"),
    ("config.mounts.0.destination", "proc", "config.mounts[0].destination", "absolute"),
    ("config.mounts.0.destination", "/proc/../etc", "config.mounts[0].destination", "climbs"),
    ("config.linux.namespaces", [{"type": "pid"}, {"type": "pid"}],
     "config.linux.namespaces[1].type", "unknown or repeated"),
    ("config.hostname", "a b", "config.hostname", "not of the accepted form"),
    ("config.hooks", {"onBoot": []}, "config.hooks.onBoot", "unknown field"),
    ("config.mounts.0", {"destination": "/proc", "type": "proc", "uidMappings": []},
     "config.mounts[0].uidMappings", "unknown field"),
    ("config.linux.resources.devices", [{"allow": True, "type": "c", "major": "1"}],
     "config.linux.resources.devices[0].major", "integer from -1"),
    ("config.root", {"readonly": "yes"}, "config.root.readonly", "true or false"),
]


@pytest.mark.parametrize(("path", "value", "field", "match"), MALFORMED,
                         ids=[f"{m[0]}={m[1]!r}" for m in MALFORMED])
def test_malformed_runc_specs_are_refused(store: pathlib.Path, path: str, value: Any,
                                          field: str, match: str) -> None:
    spec = runc_spec(store / "c1" / "rootfs")
    _set(path, value)(spec)
    refused(field, match, lambda: build(spec, store))


@pytest.mark.parametrize("kind", ["RLIMIT_NOFILE", "RLIMIT_RTPRIO"])
def test_rlimits_stay_within_the_receivers_own(store: pathlib.Path, kind: str) -> None:
    hard = resource.getrlimit(getattr(resource, kind))[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip(f"{kind} is unlimited here")
    spec = runc_spec(store / "c1" / "rootfs")
    spec["config"]["process"]["rlimits"] = [{"type": kind, "hard": hard + 1, "soft": 0}]
    refused("config.process.rlimits[0].hard", "above this receiver's own",
            lambda: build(spec, store))


def test_unknown_kinds_and_non_object_specs_are_refused(tmp_path: pathlib.Path) -> None:
    refused("kind", "cannot restore workloads of kind 'vm'",
            lambda: anyio.run(restore, "vm", tmp_path, {}))
    refused("spec", "not an object", lambda: anyio.run(restore, "runc", tmp_path, []))


def test_restore_passes_the_policy_down_and_writes_nothing_before_it_passed(
        tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    (state / "bundles" / "c1" / "rootfs").mkdir(parents=True)
    images = state / "mid1" / "final"
    images.mkdir(parents=True)
    spec = runc_spec(state / "bundles" / "c1" / "rootfs")
    _hook(spec["config"])

    async def go(policy: RestorePolicy | None) -> None:
        await restore("runc", images, spec, policy=policy)

    refused("config.hooks.prestart", "allow_hooks", lambda: anyio.run(go, None))
    refused("rootfs", "outside", lambda: anyio.run(
        go, RestorePolicy(allow_hooks=True, store=tmp_path / "elsewhere")))
    assert not (state / "bundles" / "ctlive-test-1").exists()


def test_podman_spec_names() -> None:
    assert podman_restore_name({"name": "web-1.a_b"}) == "web-1.a_b"
    refused("name", "must be a string", lambda: podman_restore_name({"name": 5}))
    refused("name", "accepted form", lambda: podman_restore_name({"name": "--privileged"}))
    refused("name", "must be a string", lambda: podman_restore_name({}))
    refused("rootfs", "unknown field", lambda: podman_restore_name({"name": "a", "rootfs": "/"}))


STORAGE = ("/var/lib/containers/storage", "/run/containers/storage")
USERDATA = "/run/containers/storage/overlay-containers/abc/userdata"


def podman_metadata() -> tuple[Spec, Spec]:
    """(spec.dump, config.dump) as podman 4 exports them, trimmed."""
    oci = runc_spec(pathlib.Path("/"))["config"]
    oci["mounts"] += [{"destination": f"/etc/{f}", "type": "bind", "source": f"{USERDATA}/{f}",
                       "options": ["bind", "rprivate"]} for f in ("hosts", "resolv.conf")]
    oci["linux"]["namespaces"][1]["path"] = "/run/netns/netns-1234"
    config = {"privileged": False, "createNetNS": True, "logPath": f"{USERDATA}/ctr.log",
              "conmonPidFile": f"{USERDATA}/conmon.pid", "mounts": [f"{USERDATA}/shm"],
              "spec": copy.deepcopy(oci)}
    del config["spec"]["linux"]["namespaces"][1]["path"]
    return oci, config


def write_archive(d: pathlib.Path, spec: Spec, config: Spec) -> pathlib.Path:
    d.mkdir(exist_ok=True)
    (d / f"{_TOP}spec.dump").write_text(json.dumps(spec))
    (d / f"{_TOP}config.dump").write_text(json.dumps(config))
    return d


def test_a_normal_podman_archive_passes_with_no_new_privileges_forced(
        tmp_path: pathlib.Path) -> None:
    spec, config = podman_metadata()
    spec["process"]["noNewPrivileges"] = False
    d = write_archive(tmp_path / "img", spec, config)
    check_podman_archive(d, RestorePolicy(), storage=STORAGE, store=tmp_path)
    assert json.loads((d / f"{_TOP}spec.dump").read_text())["process"]["noNewPrivileges"]
    assert json.loads((d / f"{_TOP}config.dump").read_text())["spec"]["process"][
        "noNewPrivileges"]


def _in_spec(fn: Callable[[Spec], None]) -> Callable[[Spec, Spec], None]:
    return lambda spec, config: fn(spec)


PODMAN_REFUSALS: list[tuple[str, Callable[[Spec, Spec], None], str, str]] = [
    ("hook", _in_spec(_hook), "spec.dump.hooks.prestart", "RestorePolicy.allow_hooks"),
    ("host-bind", _in_spec(_bind_root), "spec.dump.mounts[9].source", "host path /"),
    ("device", _in_spec(_device_node), "spec.dump.linux.devices[0]", "allow_devices"),
    ("capability", lambda s, c: _cap_sys_admin(c["spec"]),
     "config.dump.spec.process.capabilities.bounding", "CAP_SYS_ADMIN"),
    ("privileged", lambda s, c: c.update(privileged=True), "config.dump.privileged",
     "privileged"),
    ("log-path", lambda s, c: c.update(logPath="/etc/cron.d/x"), "config.dump.logPath",
     "outside podman's storage"),
    ("host-volume", lambda s, c: c["mounts"].append("/etc"), "config.dump.mounts[1]",
     "host path /etc"),
    ("shared-netns", lambda s, c: c.update(NetNsCtr="other"), "config.dump.NetNsCtr",
     "sharing a namespace"),
    ("netns-path", lambda s, c: c.update(createNetNS=False),
     "spec.dump.linux.namespaces[1].path", "joining the existing network namespace"),
    ("rootfs", lambda s, c: c.update(rootfs="/"), "config.dump.rootfs", "outside"),
]


@pytest.mark.parametrize(("mutate", "field", "match"), [r[1:] for r in PODMAN_REFUSALS],
                         ids=[r[0] for r in PODMAN_REFUSALS])
def test_podman_archive_metadata_is_checked(tmp_path: pathlib.Path,
                                            mutate: Callable[[Spec, Spec], None], field: str,
                                            match: str) -> None:
    spec, config = podman_metadata()
    mutate(spec, config)
    d = write_archive(tmp_path / "img", spec, config)
    refused(field, match, lambda: check_podman_archive(d, RestorePolicy(), storage=STORAGE,
                                                       store=tmp_path))


def test_a_podman_archive_without_its_spec_is_refused(tmp_path: pathlib.Path) -> None:
    d = write_archive(tmp_path / "img", *podman_metadata())
    (d / f"{_TOP}spec.dump").unlink()
    refused("spec.dump", "has no spec.dump",
            lambda: check_podman_archive(d, RestorePolicy(), storage=STORAGE, store=tmp_path))


def test_process_specs() -> None:
    policy = RestorePolicy()
    assert process_restore_args({}, {}, policy) == []
    spec = {"tcp_established": True, "external": ["veth[ceth0]:vh0"], "shell_job": True}
    assert process_restore_args(spec, {}, policy) == [
        "--tcp-established", "--external", "veth[ceth0]:vh0", "--shell-job"]
    # The operator's map renames, and lets a spec name what it maps.
    mapped = {"veth[ceth0]:vh0": "veth[ceth0]:vh1@br0", "dev[8/0]:disk": "dev[8/0]:sdb"}
    spec["external"] = ["veth[ceth0]:vh0", "dev[8/0]:disk"]
    assert process_restore_args(spec, mapped, policy)[1:5] == [
        "--external", "veth[ceth0]:vh1@br0", "--external", "dev[8/0]:sdb"]
    assert process_restore_args({"external": ["mnt[/data]:/srv/data"]}, {},
                                RestorePolicy(allowed_bind_sources=("/srv",))) == [
        "--external", "mnt[/data]:/srv/data"]


PROCESS_REFUSALS = [
    ({"tcp_established": "yes"}, "tcp_established", "true or false"),
    ({"shell_job": 1}, "shell_job", "true or false"),
    ({"external": "veth[a]:b"}, "external", "must be a list"),
    ({"external": [5]}, "external[0]", "must be a string"),
    ({"external": ["veth[ceth0]:vh0@br0"]}, "external[0]", "not one this receiver accepts"),
    ({"external": ["veth[eth0;reboot]:x"]}, "external[0]", "not one this receiver accepts"),
    ({"external": ["dev[8/0]:sda"]}, "external[0]", "not one this receiver accepts"),
    ({"external": ["mnt[/data]:/etc"]}, "external[0]", "binds host path /etc"),
    ({"external": ["mnt[/data]:/srv/../etc"]}, "external[0]", "climbs out"),
    ({"external": ["veth[a]:b"] * 65}, "external", "at most 64"),
    ({"root": "/"}, "root", "unknown field root"),
]


@pytest.mark.parametrize(("spec", "field", "match"), PROCESS_REFUSALS,
                         ids=[str(r[0])[:40] for r in PROCESS_REFUSALS])
def test_bad_process_specs_are_refused(spec: Spec, field: str, match: str) -> None:
    refused(field, match, lambda: process_restore_args(
        spec, {}, RestorePolicy(allowed_bind_sources=("/srv",))))


def test_policy_defaults_and_validation(tmp_path: pathlib.Path) -> None:
    p = RestorePolicy()
    assert (p.allow_hooks, p.allow_host_mounts, p.allow_devices, p.allow_host_namespaces) == (
        False, False, False, False)
    assert p.allowed_bind_sources == () and p.store is None and p.no_new_privileges
    assert "CAP_SYS_ADMIN" not in p.allowed_capabilities
    assert p.store_for(tmp_path) == tmp_path / "bundles"
    assert RestorePolicy(store=str(tmp_path)).store_for(tmp_path / "x") == tmp_path  # type: ignore[arg-type]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.allow_hooks = True  # type: ignore[misc]
    with pytest.raises(ConfigError, match="absolute"):
        RestorePolicy(allowed_bind_sources=("srv",))
    with pytest.raises(ConfigError, match="absolute"):
        RestorePolicy(allowed_bind_sources=("/srv/../etc",))
    with pytest.raises(ConfigError, match="store: relative is not an absolute path"):
        RestorePolicy(store=pathlib.Path("relative"))
    with pytest.raises(ConfigError, match="allow_hooks must be True or False"):
        RestorePolicy(allow_hooks="false")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capability names"):
        RestorePolicy(allowed_capabilities=("sys_admin",))
