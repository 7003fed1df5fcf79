"""runc containers: checkpoint on the source, restore into a bundle of our own, with a
config the receiver builds from its own template (:func:`runc_restore_config`)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import time
from typing import Any

import anyio

from ctlive.backends import carry, netns
from ctlive.backends.criu import run_runtime, summarize_log
from ctlive.backends.liveread import live_read_dump
from ctlive.backends.restore import (
    NAME,
    RestorePolicy,
    boolean,
    check_capabilities,
    check_devices,
    check_hooks,
    check_mounts,
    check_namespaces,
    clean_path,
    in_store,
    integer,
    obj,
    only_keys,
    refuse,
    string,
    strings,
    write_private,
)
from ctlive.backends.workload import Backend, DumpMethod, DumpResult, Restored
from ctlive.errors import CheckpointError, CriuError, CtliveError, Phase, RestoreError
from ctlive.fs import private_dir
from ctlive.images.criu_format import read_stats
from ctlive.images.tree_apply import TreeReceiver

__all__ = [
    "RuncContainer",
    "restore_runc",
    "runc_restore_config",
]


class RuncContainer(Backend):
    """A runc container, checkpointed with ``runc checkpoint``.

    Iterations use ``--leave-running``. The final dump first pauses the container
    (cgroup freezer) and then checkpoints it, so it stays frozen and ``resume()``
    (``runc resume``) can bring it back if the migration fails.

    A container that joins a named network namespace (``/run/netns/NAME`` in its
    config) keeps its TCP connections: the namespace is described in the restore spec
    and rebuilt at the destination (:mod:`ctlive.backends.netns`), and its veths' outer
    ends go down from the final dump on (up again on ``resume()``; the namespace is
    deleted by ``kill()``).
    """

    kind = "runc"

    def __init__(self, container_id: str, *, root: str | None = None,
                 live_read: bool = True, tcp_established: bool | None = None,
                 carry_rootfs: bool = True) -> None:
        self.id = container_id
        self.root = root
        self.carry_rootfs = carry_rootfs
        """Pre-copy the bundle's rootfs with the memory (:mod:`ctlive.images.tree`); the
        destination restores from that copy, in a bundle of its own. False: the
        destination must already hold the rootfs at the same path, in its store."""
        self.tcp_established = tcp_established
        """Checkpoint and restore established TCP connections (``--tcp-established``);
        None: when the container joins a named network namespace, the only case in
        which they can survive the move."""
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``runc checkpoint --leave-running``."""
        self._netns_name: str | None = None  # "": none (asked); see _netns

    def _config(self) -> dict[str, Any]:
        """The container's config.json (its bundle directory under ``__bundle``)."""
        try:
            state = json.loads(subprocess.run(
                ["runc"] + (["--root", self.root] if self.root else []) + ["state", self.id],
                capture_output=True, check=True).stdout)
            config: dict[str, Any] = json.loads(
                (pathlib.Path(state["bundle"]) / "config.json").read_text())
        except (subprocess.CalledProcessError, ValueError, KeyError, TypeError) as exc:
            err = getattr(exc, "stderr", b"").decode(errors="replace").strip() or exc
            raise CheckpointError(f"runc container {self.id}: {err}", cause=exc) from exc
        config["__bundle"] = state["bundle"]
        return config

    def _netns(self) -> str | None:
        """The named network namespace the container joins, if any (``runc state``: once)."""
        if self._netns_name is None:
            nss = (self._config().get("linux") or {}).get("namespaces") or []
            paths = [ns["path"] for ns in nss if ns.get("type") == "network" and ns.get("path")]
            self._netns_name = (netns.netns_name(paths[0]) or "") if paths else ""
        return self._netns_name or None

    def _tcp(self) -> list[str]:
        tcp = self.tcp_established
        return ["--tcp-established"] if tcp or (tcp is None and self._netns()) else []

    async def _state(self) -> dict[str, Any]:
        data = json.loads(await run_runtime(["state", self.id], phase=Phase.ITERATE,
                                            root=self.root))
        if not isinstance(data, dict):
            raise CheckpointError(f"runc state of {self.id} is not an object")
        return data

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        if not final and self.live_read:
            return await live_read_dump(int((await self._state())["pid"]), images_dir)
        t = time.monotonic()
        name = self._netns()
        if final and name:
            # CRIU lifts its network lock after a --leave-running dump: keep packets off
            # the frozen sockets (their kernel would ACK what the destination never sees).
            await netns.set_links(await anyio.to_thread.run_sync(netns.describe, name),
                                  up=False)
        if final:
            await run_runtime(["pause", self.id], phase=phase, root=self.root)
        await _criu_step(["checkpoint", "--image-path", str(images_dir), "--work-path",
                          str(images_dir), "--leave-running", *self._tcp(), self.id],
                         images_dir / "dump.log", phase=phase, root=self.root,
                         hint="" if name else _NO_NETNS)
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(time.monotonic() - t, False, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.DUMP)

    async def _resume(self) -> None:
        name = self._netns()
        try:
            await run_runtime(["resume", self.id], phase=Phase.ABORT, root=self.root)
        finally:  # the source copy is the live one again, paused or not
            if name:
                await netns.set_links(await anyio.to_thread.run_sync(netns.describe, name),
                                      up=True, phase=Phase.ABORT)

    async def _kill(self) -> None:
        name = self._netns()
        ns = netns.Namespace(name, ()) if name else None
        if name:  # its veths' names, to delete them too (the kill comes first regardless)
            with contextlib.suppress(CtliveError):
                ns = await anyio.to_thread.run_sync(netns.describe, name)
        await run_runtime(["delete", "--force", self.id], phase=Phase.COMMIT, root=self.root)
        if ns is not None:  # the copy at the destination owns its addresses now
            await netns.remove(ns)

    def carried_trees(self) -> dict[str, str]:
        if not self.carry_rootfs:
            return {}
        try:
            config = self._config()
            return {"rootfs": os.path.realpath(pathlib.Path(config["__bundle"])
                                               / config["root"]["path"])}
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot find the rootfs of runc container {self.id}: "
                                  f"{exc}", phase=Phase.ITERATE) from exc

    def restore_spec(self) -> dict[str, Any]:
        config = self._config()
        bundle = pathlib.Path(config.pop("__bundle"))
        rootfs = pathlib.Path(config["root"]["path"])
        if not rootfs.is_absolute():
            rootfs = bundle / rootfs
        spec: dict[str, Any] = {"id": self.id, "config": config, **(
            {"carry": "rootfs"} if self.carry_rootfs else {"rootfs": str(rootfs)})}
        name = self._netns()
        if name:
            spec["network"] = netns.describe(name).as_dict()
        spec["tcp_established"] = bool(self._tcp())
        return spec


class _RuncRestored(Restored):
    """A runc container restored stopped: discarding it also deletes the container (and
    the network namespace rebuilt for it); resuming it announces its addresses."""

    def __init__(self, pid: int, root: str, container_id: str,
                 network: dict[str, Any] | None = None) -> None:
        super().__init__(pid, container_id=container_id)
        self._root = root
        self._netns = netns.parse(network) if network is not None else None

    @property
    def network(self) -> dict[str, Any] | None:
        """The rebuilt namespace, as JSON (for the receiver's journal)."""
        return self._netns.as_dict() if self._netns is not None else None

    async def resume(self) -> None:
        await super().resume()
        if self._netns is not None:  # traffic may come here now: the source copy is gone
            await netns.announce(self._netns)

    async def discard(self) -> None:
        await super().discard()
        with contextlib.suppress(CtliveError):
            await run_runtime(["delete", "--force", self._id or ""], phase=Phase.ABORT,
                              root=self._root)
        if self._netns is not None:
            await netns.remove(self._netns)


# --- the receiver's config: its own template, and what it takes from the source ---

_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
_ENV = re.compile(r"^[^=]+=", re.DOTALL)
_CPUSET = re.compile(r"^[0-9,-]{0,256}$")
_RLIMIT = re.compile(r"^RLIMIT_(AS|CORE|CPU|DATA|FSIZE|LOCKS|MEMLOCK|MSGQUEUE|NICE|NOFILE|NPROC"
                     r"|RSS|RTPRIO|RTTIME|SIGPENDING|STACK)$")
_SECCOMP_FLAGS = re.compile(r"^SECCOMP_FILTER_FLAG_(TSYNC|LOG)$")
_U32, _U64, _I64 = (1 << 32) - 1, (1 << 64) - 1, (1 << 63) - 1
# runc's own template: always masked / read-only, whatever the source says.
_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
           "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
           "/proc/scsi")
_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_DENY_ALL = {"allow": False, "access": "rwm"}


def runc_restore_config(spec: dict[str, Any], policy: RestorePolicy, *, store: pathlib.Path,
                        bundles: pathlib.Path, migration: str) -> tuple[str, dict[str, Any]]:
    """(container id, config.json) for restoring the runc container that ``spec`` (from
    ``RuncContainer.restore_spec()``: id, config, rootfs) describes, or a
    :class:`~ctlive.errors.RestoreSpecError`.

    The config is the receiver's own template. From the source it takes the process
    (args, env, cwd, user, capabilities within ``policy``, rlimits within this
    receiver's own), the container's own mounts (tmpfs, proc, sysfs, devpts, mqueue,
    cgroup; bind mounts only as ``policy`` allows), its namespaces (no paths), id
    mappings, hostname, extra masked and read-only paths, memory/cpu/pids limits and
    seccomp profile; hooks and devices only as ``policy`` allows. The rootfs must be in
    ``store``; the cgroup (``/ctlive/ID-MIGRATION``) and the CRIU config
    (``bundles/ID/criu.conf``) are the receiver's. A ``network`` description
    (:func:`ctlive.backends.netns.parse`) makes the container join the named network
    namespace the receiver rebuilds from it. Everything else is dropped."""
    only_keys(obj(spec, "spec"), ("id", "config", "rootfs", "network", "tcp_established",
                                  "carry"), "")
    net = netns.parse(spec["network"]) if spec.get("network") is not None else None
    if "tcp_established" in spec:
        boolean(spec["tcp_established"], "tcp_established")
    cid = string(spec.get("id"), "id", max_len=64, pattern=NAME)
    src = obj(spec.get("config"), "config")
    if spec.get("carry") not in (None, "rootfs"):
        refuse("carry", "carry must be \"rootfs\" (the carried rootfs) or absent")
    # A carried rootfs is rebuilt in the receiver's own bundle: root.path is relative.
    rootfs = pathlib.Path("rootfs") if spec.get("carry") else in_store(
        spec.get("rootfs"), "rootfs", store)
    linux = obj(src.get("linux") or {}, "config.linux")
    root = obj(src.get("root") or {}, "config.root")
    hooks = check_hooks(src, policy, "config.")
    nodes, rules = check_devices(linux, policy, "config.")
    own: tuple[str, ...] = (f"{netns.NETNS_DIR}/{net.name}",) if net is not None else ()
    namespaces = check_namespaces(linux, policy, "config.", runtime_paths=own)
    if net is not None:  # the namespace this receiver rebuilt, whatever the config says
        namespaces = [n for n in namespaces if n["type"] != "network"]
        namespaces.append({"type": "network", "path": own[0]})
    out_linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": _resources(obj(linux.get("resources") or {}, "config.linux.resources"),
                                rules),
        "maskedPaths": _paths(_MASKED, linux.get("maskedPaths"), "config.linux.maskedPaths"),
        "readonlyPaths": _paths(_READONLY, linux.get("readonlyPaths"),
                                "config.linux.readonlyPaths"),
        # Its own cgroup: the source's (frozen until COMMIT) may be on this very host.
        "cgroupsPath": f"/ctlive/{cid}-{migration}",
    }
    if nodes:
        out_linux["devices"] = nodes
    for key in ("uidMappings", "gidMappings"):
        if key in linux:
            out_linux[key] = _id_mappings(linux[key], f"config.linux.{key}")
    if linux.get("seccomp") is not None:
        out_linux["seccomp"] = _seccomp(obj(linux["seccomp"], "config.linux.seccomp"), policy)
    config: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": _process(obj(src.get("process"), "config.process"), policy),
        "root": {"path": str(rootfs),
                 "readonly": boolean(root.get("readonly", False), "config.root.readonly")},
        "mounts": check_mounts(src.get("mounts"), policy, "config."),
        "linux": out_linux,
        # runc has no --leave-stopped: CRIU reads this file (the receiver's own).
        "annotations": {"org.criu.config": str(bundles / cid / "criu.conf")},
    }
    for key in ("hostname", "domainname"):
        if src.get(key) is not None:
            config[key] = string(src[key], f"config.{key}", max_len=64, pattern=_HOSTNAME)
    if hooks:
        config["hooks"] = hooks
    return cid, config


def _process(p: dict[str, Any], policy: RestorePolicy) -> dict[str, Any]:
    f = "config.process"
    if p.get("terminal"):
        refuse(f"{f}.terminal", f"a terminal ({f}.terminal) needs a console socket this "
                                "receiver does not provide")
    user = obj(p.get("user") or {}, f"{f}.user")
    out: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": integer(user.get("uid", 0), f"{f}.user.uid", 0, _U32),
                 "gid": integer(user.get("gid", 0), f"{f}.user.gid", 0, _U32)},
        "args": strings(p.get("args"), f"{f}.args", max_len=1 << 17),
        "env": strings(p.get("env", []), f"{f}.env", max_len=1 << 17, pattern=_ENV),
        "cwd": clean_path(p.get("cwd", "/"), f"{f}.cwd"),
        "noNewPrivileges": True if policy.no_new_privileges
        else boolean(p.get("noNewPrivileges", False), f"{f}.noNewPrivileges"),
    }
    if not out["args"]:
        refuse(f"{f}.args", f"{f}.args is empty")
    if "umask" in user:
        out["user"]["umask"] = integer(user["umask"], f"{f}.user.umask", 0, 0o777)
    if "additionalGids" in user:
        gids = user["additionalGids"]
        if not isinstance(gids, list) or len(gids) > 64:
            refuse(f"{f}.user.additionalGids", f"{f}.user.additionalGids must be a list")
        out["user"]["additionalGids"] = [integer(g, f"{f}.user.additionalGids[{i}]", 0, _U32)
                                         for i, g in enumerate(gids)]
    caps = check_capabilities(p, policy, "config.")
    if caps is not None:
        out["capabilities"] = caps
    if p.get("rlimits") is not None:
        out["rlimits"] = _rlimits(p["rlimits"])
    return out


def _rlimits(value: Any) -> list[dict[str, Any]]:
    """Known limits, each once, soft <= hard, hard no higher than this receiver's own."""
    f = "config.process.rlimits"
    if not isinstance(value, list) or len(value) > 16:
        refuse(f, f"{f} must be a list of at most 16 limits")
    out: list[dict[str, Any]] = []
    for i, r in enumerate(value):
        r = obj(r, f"{f}[{i}]")
        only_keys(r, ("type", "hard", "soft"), f"{f}[{i}]")
        kind = string(r.get("type"), f"{f}[{i}].type", pattern=_RLIMIT)
        if any(o["type"] == kind for o in out):
            refuse(f"{f}[{i}].type", f"{kind} appears twice in {f}")
        hard = integer(r.get("hard"), f"{f}[{i}].hard", 0, _U64)
        soft = integer(r.get("soft"), f"{f}[{i}].soft", 0, hard)
        res = getattr(resource, kind, None)
        ceiling = resource.getrlimit(res)[1] if res is not None else resource.RLIM_INFINITY
        if ceiling != resource.RLIM_INFINITY and hard > ceiling:
            refuse(f"{f}[{i}].hard", f"{kind} hard limit {hard} ({f}[{i}].hard) is above "
                                     f"this receiver's own ({ceiling})")
        out.append({"type": kind, "hard": hard, "soft": soft})
    return out


def _paths(defaults: tuple[str, ...], extra: Any, field: str) -> list[str]:
    """The receiver's paths, then the source's others (masking more is always safe)."""
    more = [clean_path(p, f"{field}[{i}]")
            for i, p in enumerate(strings(extra or [], field, max_items=256))]
    return [*defaults, *(p for p in dict.fromkeys(more) if p not in defaults)]


def _resources(res: dict[str, Any], rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Device rules (the receiver's deny-all first), and memory/cpu/pids limits."""
    out: dict[str, Any] = {"devices": [_DENY_ALL, *(r for r in rules if r != _DENY_ALL)]}
    f = "config.linux.resources"
    fields = {"memory": {"limit": (-1, _I64), "reservation": (-1, _I64), "swap": (-1, _I64)},
              "cpu": {"shares": (0, _U64), "quota": (-1, _I64), "period": (0, _U64)},
              "pids": {"limit": (-1, _I64)}}
    for group, limits in fields.items():
        if res.get(group) is None:
            continue
        g = obj(res[group], f"{f}.{group}")
        taken: dict[str, Any] = {k: integer(g[k], f"{f}.{group}.{k}", lo, hi)
                                 for k, (lo, hi) in limits.items() if k in g}
        if group == "cpu":
            taken |= {k: string(g[k], f"{f}.cpu.{k}", pattern=_CPUSET)
                      for k in ("cpus", "mems") if k in g}
        out[group] = taken
    return out


def _id_mappings(value: Any, field: str) -> list[dict[str, int]]:
    if not isinstance(value, list) or len(value) > 340:
        refuse(field, f"{field} must be a list of at most 340 mappings")
    out = []
    for i, m in enumerate(value):
        m = obj(m, f"{field}[{i}]")
        only_keys(m, ("containerID", "hostID", "size"), f"{field}[{i}]")
        out.append({k: integer(m.get(k), f"{field}[{i}].{k}", 0 if k != "size" else 1, _U32)
                    for k in ("containerID", "hostID", "size")})
    return out


def _seccomp(sc: dict[str, Any], policy: RestorePolicy) -> dict[str, Any]:
    """The source's seccomp profile (it only restricts the container), but no listener:
    that would hand its notifications to a process on this receiver."""
    f = "config.linux.seccomp"
    for key in ("listenerPath", "listenerMetadata"):
        if sc.get(key) and not policy.allow_hooks:
            refuse(f"{f}.{key}", f"a seccomp listener ({f}.{key}) is a program on this "
                                 "receiver; not allowed (RestorePolicy.allow_hooks)")
    keys = ("defaultAction", "defaultErrnoRet", "architectures", "syscalls", "listenerPath",
            "listenerMetadata")
    out: dict[str, Any] = {k: sc[k] for k in keys if k in sc}
    if "flags" in sc:
        out["flags"] = strings(sc["flags"], f"{f}.flags", max_items=8, pattern=_SECCOMP_FLAGS)
    return out


_NO_NETNS = ("the container's network namespace is not a named one (/run/netns/NAME in its "
             "config): its addresses and routes, and so its TCP connections, cannot move")


async def _criu_step(args: list[str], log: pathlib.Path, *, phase: Phase, root: str | None,
                     hint: str) -> None:
    """``runc checkpoint`` / ``runc restore``: on failure, the error says what CRIU's log
    says went wrong (runc only names the log, which may be wiped with the images), and
    ``hint`` when it is about the network."""
    try:
        await run_runtime(args, phase=phase, root=root)
    except CriuError as exc:
        try:
            reason = summarize_log(log.read_text(errors="replace"))
        except OSError:
            reason = ""
        if not reason:
            raise
        if hint and ("Network is unreachable" in reason or "tcp-established" in reason):
            reason += f" ({hint})"
        raise CriuError(f"runc {args[0]} failed: {reason}", phase=phase, cause=exc) from exc


async def restore_runc(images_dir: pathlib.Path, spec: dict[str, Any],
                       external_map: dict[str, str], policy: RestorePolicy, *,
                       trees: TreeReceiver | None = None) -> Restored:
    """Restore a runc container stopped, into a bundle of the receiver's own: the config
    :func:`runc_restore_config` builds (nothing is written before the spec passed), and
    a CRIU config that says ``leave-stopped``. A carried rootfs (``trees``) is rebuilt
    and verified as ``BUNDLE/rootfs`` first."""
    # Outside the per-migration directory, which is wiped after COMMIT; the container
    # keeps running from them.
    state_dir = images_dir.parent.parent
    bundles = state_dir / "bundles"
    cid, config = runc_restore_config(spec, policy, store=policy.store_for(state_dir),
                                      bundles=bundles, migration=images_dir.parent.name)
    net = netns.parse(spec["network"]) if spec.get("network") is not None else None
    if net is not None:  # refused before anything is written
        await netns.check_bridges(net, policy.bridge_for)
    bundle = private_dir(bundles / cid)
    await _carry_rootfs(bundle, cid, spec, trees, str(state_dir / "runc"))
    write_private(bundle / "criu.conf", "leave-stopped\n")
    write_private(bundle / "config.json", json.dumps(config))
    root = str(state_dir / "runc")
    tcp = ["--tcp-established"] if spec.get("tcp_established") else []
    if net is not None:  # before the restore: CRIU reconnects the sockets inside it
        await netns.rebuild(net, policy.bridge_for)
    try:
        await _criu_step(["restore", "--detach", "--image-path", str(images_dir),
                          "--work-path", str(images_dir), *tcp, "--bundle", str(bundle), cid],
                         images_dir / "restore.log", phase=Phase.RESTORE, root=root,
                         hint="" if net else _NO_NETNS)
        state = json.loads(await run_runtime(["state", cid], phase=Phase.RESTORE, root=root))
    except BaseException:
        if spec.get("carry"):
            shutil.rmtree(bundle / "rootfs", ignore_errors=True)
        if net is not None:
            with anyio.CancelScope(shield=True):
                await netns.remove(net)
        raise
    return _RuncRestored(int(state["pid"]), root, cid, net.as_dict() if net else None)


async def _carry_rootfs(bundle: pathlib.Path, cid: str, spec: dict[str, Any],
                        trees: TreeReceiver | None, root: str) -> None:
    """Rebuild and verify the carried rootfs as ``bundle/rootfs`` (one a discarded copy
    left there goes first, unless a container of that id runs here)."""
    carry.expect_trees(trees, {"rootfs"} if spec.get("carry") else set())
    if trees is None or not spec.get("carry"):
        return
    try:
        await run_runtime(["state", cid], phase=Phase.RESTORE, root=root)
    except CtliveError:
        pass  # none of that id: what is left in the bundle is a discarded copy's
    else:
        raise RestoreError(f"a runc container {cid} already runs on this receiver",
                           phase=Phase.RESTORE)
    await anyio.to_thread.run_sync(shutil.rmtree, bundle / "rootfs", True)
    await anyio.to_thread.run_sync(carry.materialize_carried, trees,
                                   {"rootfs": str(bundle / "rootfs")})
