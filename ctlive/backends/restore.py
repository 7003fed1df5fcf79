"""The destination's entry point: restore a rebuilt dump stopped, by workload kind, under
the receiver's :class:`RestorePolicy`.

The restore spec comes from the source, so it is untrusted input: every backend
validates it here, strictly, and builds what it runs from the receiver's own template
and settings, taking from the spec only what is safe and needed. Every refusal is a
:class:`~ctlive.errors.RestoreSpecError` that names the field and the policy setting
that would allow it. This module also holds the checks the backends share: paths, bind
mounts, OCI hooks, devices, capabilities and namespaces.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

import attrs

from ctlive.backends.workload import Restored
from ctlive.errors import ConfigError, Phase, RestoreError, RestoreSpecError, map_os_errors
from ctlive.images.files import create_private
from ctlive.images.tree_apply import TreeReceiver

__all__ = [
    "DEFAULT_CAPABILITIES",
    "REQUIRED_NAMESPACES",
    "RestorePolicy",
    "restore",
]

DEFAULT_CAPABILITIES = (
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_MKNOD", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETFCAP",
    "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
)
"""The container engines' default capability set (moby, containerd, podman; runc's own
template uses three of them). Nothing here reaches beyond the container: no
CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_NET_ADMIN, CAP_DAC_READ_SEARCH."""

REQUIRED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts")
"""Namespaces a container must have of its own; without one it would share the
receiver's (``RestorePolicy.allow_host_namespaces`` lifts this)."""

_NAMESPACES = frozenset({*REQUIRED_NAMESPACES, "user", "cgroup", "time"})
_HOOK_STAGES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                "poststop")
_CAP = re.compile(r"^CAP_[A-Z_]{1,32}$")


def _flag(inst: Any, attr: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):  # "false" from a config file is truthy
        raise ConfigError(f"RestorePolicy.{attr.name} must be True or False, not {value!r}")


def _absolute(inst: Any, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for p in value:
        if not (isinstance(p, str) and p.startswith("/") and "\0" not in p
                and ".." not in p.split("/")):
            raise ConfigError(f"RestorePolicy.{attr.name}: {p!r} is not an absolute path "
                              "without '..'")


def _capabilities(inst: Any, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    bad = [c for c in value if not (isinstance(c, str) and _CAP.match(c))]
    if bad:
        raise ConfigError(f"RestorePolicy.{attr.name}: {bad!r} are not capability names")


def _optional_path(value: str | os.PathLike[str] | None) -> pathlib.Path | None:
    return None if value is None else pathlib.Path(value)


def _absolute_store(inst: Any, attr: attrs.Attribute[Any], value: pathlib.Path | None) -> None:
    if value is not None and not value.is_absolute():
        raise ConfigError(f"RestorePolicy.store: {value} is not an absolute path")


_BRIDGE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")


def _bridge_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """``{"br0": "br1"}``, pairs, or ``"br0=br1"`` strings, as sorted pairs."""
    items = value.items() if isinstance(value, dict) else value
    pairs = [tuple(v.split("=", 1)) if isinstance(v, str) else tuple(v) for v in items]
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(n, str) and _BRIDGE.match(n) for n in pair):
            raise ConfigError(f"RestorePolicy.bridge_map: {pair!r} is not a pair of "
                              "interface names (SOURCE=LOCAL)")
    return tuple(sorted((str(a), str(b)) for a, b in pairs))


@attrs.frozen
class RestorePolicy:
    """What this receiver lets a source's restore spec ask for; set by the destination's
    operator (``restore(..., policy=)``). The defaults refuse everything that reaches
    outside the container."""

    allow_hooks: bool = attrs.field(default=False, validator=_flag)
    """Run OCI hooks (``hooks.prestart`` …) the source's config names: they run as root
    on this receiver, outside the container."""
    allow_host_mounts: bool = attrs.field(default=False, validator=_flag)
    """Bind mounts of any host path (and mounts of filesystems other than the
    container's own tmpfs, proc, sysfs, devpts, mqueue, cgroup); also a process tree's
    ``mnt[KEY]:PATH`` externals."""
    allow_devices: bool = attrs.field(default=False, validator=_flag)
    """Devices beyond the OCI default set (null, zero, full, random, urandom, tty,
    ptmx, pts), as device nodes or cgroup device rules, and privileged podman
    containers."""
    allowed_bind_sources: tuple[str, ...] = attrs.field(
        default=(), converter=tuple, validator=_absolute)
    """Host paths (absolute) that may be bind-mounted, with everything below them,
    even when ``allow_host_mounts`` is off. Compared after resolving symlinks."""
    store: pathlib.Path | None = attrs.field(default=None, converter=_optional_path,
                                             validator=_absolute_store)
    """The only directory a container's rootfs may be in (after resolving symlinks); a
    relative rootfs is taken relative to it. None: the state directory's own
    ``bundles/``."""
    allowed_capabilities: tuple[str, ...] = attrs.field(
        default=DEFAULT_CAPABILITIES, converter=tuple, validator=_capabilities)
    """Capabilities a container may hold, in any of its sets."""
    no_new_privileges: bool = attrs.field(default=True, validator=_flag)
    """Force ``process.noNewPrivileges`` on (False: take the source's value)."""
    allow_host_namespaces: bool = attrs.field(default=False, validator=_flag)
    """Join existing namespaces by path, or lack one of ``REQUIRED_NAMESPACES`` (and so
    share this receiver's)."""

    bridge_map: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_bridge_pairs)
    """Which bridge of this host a restored container's veth joins when it was a port
    of another name on the source (source name, local name); unmapped names join the
    bridge of the same name, which must exist."""

    allowed_carry_prefixes: tuple[str, ...] = attrs.field(
        default=("/tmp", "/var/tmp", "/dev/shm"), converter=tuple, validator=_absolute)
    """Where a process tree's carried directories may be rebuilt (absolute paths, and
    what is below them; compared after resolving symlinks). They must also be on a
    memory filesystem, outside the state directory, and not exist yet (or be empty)."""

    def bridge_for(self, source_bridge: str) -> str:
        """The bridge here for a veth that was a port of ``source_bridge``."""
        return dict(self.bridge_map).get(source_bridge, source_bridge)

    def store_for(self, state_dir: pathlib.Path) -> pathlib.Path:
        """The rootfs store of a receiver whose state directory is ``state_dir``."""
        return self.store if self.store is not None else state_dir / "bundles"


async def restore(kind: str, images_dir: pathlib.Path, spec: dict[str, Any], *,
                  external_map: dict[str, str] | None = None,
                  policy: RestorePolicy | None = None,
                  trees: TreeReceiver | None = None) -> Restored:
    """Restore a dump stopped; returns the handle the two-phase commit drives. Every
    failure is a ctlive error (an ``OSError`` becomes :class:`RestoreError`); a spec
    that asks for what ``policy`` (None: ``RestorePolicy()``, the defaults) refuses, or
    is malformed, is a :class:`~ctlive.errors.RestoreSpecError`.

    ``external_map`` renames external resources for this host, e.g.
    ``{"veth[eth0]:vh0": "veth[eth0]:vh1"}`` when the outer end of the workload's veth
    has another name here; its keys are also the externals a spec may name beyond the
    plain forms (see ``restore_process``). ``trees`` holds the carried trees received
    with the dump: runc and process trees materialize and verify them first."""
    # The backends use this module's checks, so they are imported here, not at the top.
    from ctlive.backends.podman import restore_podman
    from ctlive.backends.process import restore_process
    from ctlive.backends.runc import restore_runc

    restorers: dict[str, Callable[[pathlib.Path, dict[str, Any], dict[str, str], RestorePolicy],
                                  Awaitable[Restored]]] = {
        "process": restore_process, "runc": restore_runc, "podman": restore_podman}
    if trees is not None and trees.labels and kind in ("process", "runc"):
        # Only then: a restorer that cannot take trees never has any to take.
        restorers[kind] = functools.partial(restorers[kind], trees=trees)  # type: ignore[call-arg]
    restorer = restorers.get(kind) if isinstance(kind, str) else None
    if restorer is None:
        refuse("kind", f"this receiver cannot restore workloads of kind {kind!r} "
                       f"(it knows {', '.join(sorted(restorers))})")
    if not isinstance(spec, dict):
        refuse("spec", f"the restore spec is a {type(spec).__name__}, not an object")
    if trees is not None and trees.labels and kind not in ("process", "runc"):
        refuse("kind", f"a {kind} workload cannot carry directory trees")
    with map_os_errors(RestoreError, f"restoring the {kind} workload", phase=Phase.RESTORE):
        return await restorer(images_dir, spec, external_map or {}, policy or RestorePolicy())


# --- checks the backends share ----------------------------------------------


def write_private(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 whatever the umask, never through a symlink."""
    with create_private(path) as f:
        f.write(text.encode())


def refuse(field: str, message: str) -> NoReturn:
    """Raise the :class:`RestoreSpecError` for ``field``."""
    raise RestoreSpecError(f"restore spec refused: {message}", field=field, phase=Phase.RESTORE)


def only_keys(value: dict[str, Any], allowed: Iterable[str], field: str) -> None:
    """Refuse keys of ``value`` outside ``allowed``."""
    extra = sorted(set(value) - set(allowed))
    if extra:
        where = f"{field}." if field else ""
        refuse(f"{where}{extra[0]}", f"unknown field {where}{extra[0]} (this receiver "
                                     f"takes only {', '.join(sorted(allowed))})")


def obj(value: Any, field: str) -> dict[str, Any]:
    """``value`` if it is a JSON object."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        refuse(field, f"{field} must be an object")
    return value


def string(value: Any, field: str, *, max_len: int = 4096, pattern: re.Pattern[str] | None
           = None) -> str:
    """``value`` if it is a string without NUL, at most ``max_len`` long, matching
    ``pattern`` (if given)."""
    if not isinstance(value, str) or "\0" in value or len(value) > max_len:
        refuse(field, f"{field} must be a string of at most {max_len} characters")
    if pattern is not None and not pattern.match(value):
        refuse(field, f"{field} {value[:80]!r} is not of the accepted form")
    return value


def strings(value: Any, field: str, *, max_items: int = 4096, max_len: int = 4096,
            pattern: re.Pattern[str] | None = None) -> list[str]:
    """``value`` if it is a list of at most ``max_items`` such strings."""
    if not isinstance(value, list) or len(value) > max_items:
        refuse(field, f"{field} must be a list of at most {max_items} strings")
    return [string(v, f"{field}[{i}]", max_len=max_len, pattern=pattern)
            for i, v in enumerate(value)]


def boolean(value: Any, field: str) -> bool:
    """``value`` if it is a JSON boolean."""
    if not isinstance(value, bool):
        refuse(field, f"{field} must be true or false")
    return value


def integer(value: Any, field: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        refuse(field, f"{field} must be an integer from {lo} to {hi}")
    return value


def clean_path(value: Any, field: str) -> str:
    """``value`` if it is an absolute path with no ``..`` component (normalized)."""
    p = string(value, field)
    if not p.startswith("/"):
        refuse(field, f"{field} {p[:80]!r} is not an absolute path")
    if ".." in p.split("/"):
        refuse(field, f"{field} {p[:80]!r} climbs out of its directory ('..')")
    return os.path.normpath(p)


def within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it, both with symlinks resolved."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return rel == "." or not (rel == ".." or rel.startswith("../"))


def in_store(value: Any, field: str, store: pathlib.Path) -> pathlib.Path:
    """The directory ``value`` names (relative: in ``store``), resolved; refused unless
    it exists and lies inside ``store`` (not ``store`` itself)."""
    p = string(value, field)
    if ".." in p.split("/"):
        refuse(field, f"{field} {p[:80]!r} climbs out of its directory ('..')")
    path = pathlib.Path(p) if p.startswith("/") else store / p
    real, root = pathlib.Path(os.path.realpath(path)), pathlib.Path(os.path.realpath(store))
    if real == root or not real.is_relative_to(root):
        refuse(field, f"{field} {p[:80]!r} is outside this receiver's store {store} "
                      "(RestorePolicy.store)")
    if not real.is_dir():
        refuse(field, f"{field} {p[:80]!r} is not a directory in this receiver's store")
    return real


def bind_allowed(source: str, policy: RestorePolicy, extra_roots: Iterable[str] = ()) -> bool:
    """Whether host path ``source`` may be bind-mounted under ``policy`` (``extra_roots``:
    directories the runtime itself manages, e.g. podman's storage)."""
    return policy.allow_host_mounts or any(
        within(source, root) for root in (*policy.allowed_bind_sources, *extra_roots))


def check_hooks(config: dict[str, Any], policy: RestorePolicy, where: str) -> dict[str, Any]:
    """The OCI hooks of ``config``: refused unless the policy allows them; validated."""
    hooks = obj(config.get("hooks") or {}, f"{where}hooks")
    only_keys(hooks, _HOOK_STAGES, f"{where}hooks")
    taken: dict[str, Any] = {}
    for stage, entries in sorted(hooks.items()):
        field = f"{where}hooks.{stage}"
        if not isinstance(entries, list):
            refuse(field, f"{field} must be a list")
        if entries and not policy.allow_hooks:
            refuse(field, f"OCI hooks ({field}) are not allowed on this receiver "
                          "(RestorePolicy.allow_hooks)")
        taken[stage] = []
        for i, h in enumerate(entries):
            h = obj(h, f"{field}[{i}]")
            only_keys(h, ("path", "args", "env", "timeout"), f"{field}[{i}]")
            hook: dict[str, Any] = {"path": clean_path(h.get("path"), f"{field}[{i}].path")}
            for key in ("args", "env"):
                if key in h:
                    hook[key] = strings(h[key], f"{field}[{i}].{key}")
            if "timeout" in h:
                hook["timeout"] = integer(h["timeout"], f"{field}[{i}].timeout", 1, 3600)
            taken[stage].append(hook)
    return {k: v for k, v in taken.items() if v}


def check_capabilities(process: dict[str, Any], policy: RestorePolicy,
                       where: str) -> dict[str, list[str]] | None:
    """``process.capabilities``, refused if any set holds a capability the policy does
    not allow."""
    if process.get("capabilities") is None:
        return None
    field = f"{where}process.capabilities"
    caps = obj(process["capabilities"], field)
    sets = ("bounding", "effective", "inheritable", "permitted", "ambient")
    only_keys(caps, sets, field)
    allowed = set(policy.allowed_capabilities)
    taken = {}
    for name in sets:
        if name in caps:
            values = strings(caps[name], f"{field}.{name}", max_items=64, pattern=_CAP)
            beyond = sorted(set(values) - allowed)
            if beyond:
                refuse(f"{field}.{name}", f"capability {beyond[0]} ({field}.{name}) is "
                                          "beyond this receiver's allowed set "
                                          "(RestorePolicy.allowed_capabilities)")
            taken[name] = values
    return taken


# (type, major, minor) of the OCI default devices (and runc's /dev/pts, ptmx, console).
_DEFAULT_DEVICES = {("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                    ("c", 5, 0), ("c", 5, 1), ("c", 5, 2), ("c", 136, None)}


def _default_device(kind: Any, major: Any, minor: Any) -> bool:
    return (kind, major, minor) in _DEFAULT_DEVICES or (kind, major, None) in _DEFAULT_DEVICES


def check_devices(linux: dict[str, Any], policy: RestorePolicy, where: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(device nodes, cgroup device rules) to take from ``linux``: devices beyond the
    default set are refused unless the policy allows them; default nodes are left to
    the runtime, which creates them anyway; deny rules are always taken."""
    nodes: list[dict[str, Any]] = []
    for i, d in enumerate(linux.get("devices") or []):
        field = f"{where}linux.devices[{i}]"
        d = obj(d, field)
        only_keys(d, ("path", "type", "major", "minor", "fileMode", "uid", "gid"), field)
        kind = string(d.get("type"), f"{field}.type", pattern=re.compile(r"^[cbup]$"))
        major = integer(d.get("major", 0), f"{field}.major", 0, 1 << 32)
        minor = integer(d.get("minor", 0), f"{field}.minor", 0, 1 << 32)
        path = clean_path(d.get("path"), f"{field}.path")
        if _default_device(kind, major, minor):
            continue
        if not policy.allow_devices:
            refuse(field, f"device {path} ({kind} {major}:{minor}, {field}) is not allowed on "
                          "this receiver (RestorePolicy.allow_devices)")
        nodes.append(d)
    resources = obj(linux.get("resources") or {}, f"{where}linux.resources")
    rules: list[dict[str, Any]] = []
    for i, r in enumerate(resources.get("devices") or []):
        field = f"{where}linux.resources.devices[{i}]"
        r = obj(r, field)
        only_keys(r, ("allow", "type", "major", "minor", "access"), field)
        allow = boolean(r.get("allow"), f"{field}.allow")
        if "type" in r:
            string(r["type"], f"{field}.type", pattern=re.compile(r"^[abc]$"))
        for key in ("major", "minor"):
            if key in r:
                integer(r[key], f"{field}.{key}", -1, 1 << 32)
        if "access" in r:
            string(r["access"], f"{field}.access", pattern=re.compile(r"^[rwm]{1,3}$"))
        if allow and not policy.allow_devices and not _default_device(
                r.get("type"), r.get("major"), r.get("minor")):
            refuse(field, f"a cgroup rule allowing devices {r.get('type', 'a')} "
                          f"{r.get('major', '*')}:{r.get('minor', '*')} ({field}) is not "
                          "allowed on this receiver (RestorePolicy.allow_devices)")
        rules.append(r)
    return nodes, rules


_OWN_FILESYSTEMS = ("tmpfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A container's (runc id, podman name) or an own filesystem's name."""
_OPTION = re.compile(r"^[\x21-\x7e]{1,256}$")


def check_mounts(mounts: Any, policy: RestorePolicy, where: str, *,
                 runtime_roots: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The mounts to take: the container's own filesystems, and bind mounts of host
    paths only where the policy allows them (``runtime_roots``: directories whose
    files the runtime itself binds in, such as podman's storage)."""
    field = f"{where}mounts"
    if mounts is None:
        return []
    if not isinstance(mounts, list) or len(mounts) > 256:
        refuse(field, f"{field} must be a list of at most 256 mounts")
    taken = []
    for i, m in enumerate(mounts):
        f = f"{field}[{i}]"
        m = obj(m, f)
        only_keys(m, ("destination", "type", "source", "options"), f)
        dest = clean_path(m.get("destination"), f"{f}.destination")
        kind = string(m.get("type", "none"), f"{f}.type", max_len=64)
        options = strings(m.get("options", []), f"{f}.options", max_items=64,
                          pattern=_OPTION)
        source = string(m.get("source", kind), f"{f}.source")
        if kind == "bind" or {"bind", "rbind"} & set(options):
            source = clean_path(source, f"{f}.source")
            if not bind_allowed(source, policy, runtime_roots):
                refuse(f"{f}.source", f"bind mount of host path {source} into {dest} "
                                      f"({f}.source) is not allowed on this receiver "
                                      "(RestorePolicy.allow_host_mounts, "
                                      "RestorePolicy.allowed_bind_sources)")
        elif ((kind not in _OWN_FILESYSTEMS or not NAME.match(source))
              and not policy.allow_host_mounts):
            refuse(f, f"a {kind[:20]} mount of {source[:80]!r} into {dest} ({f}) is not one of "
                      f"the container's own filesystems ({', '.join(_OWN_FILESYSTEMS)}) and not "
                      "allowed on this receiver (RestorePolicy.allow_host_mounts)")
        taken.append({"destination": dest, "type": kind, "source": source,
                      "options": options})
    return taken


def check_namespaces(linux: dict[str, Any], policy: RestorePolicy, where: str, *,
                     runtime_paths: Iterable[str] = ()) -> list[dict[str, str]]:
    """``linux.namespaces``: known types, each once; no joining an existing namespace
    by path (but under ``runtime_paths``, the runtime's own), and every one of
    ``REQUIRED_NAMESPACES``, unless the policy allows host namespaces."""
    field = f"{where}linux.namespaces"
    items = linux.get("namespaces") or []
    if not isinstance(items, list) or len(items) > 16:
        refuse(field, f"{field} must be a list of namespaces")
    taken: list[dict[str, str]] = []
    for i, ns in enumerate(items):
        f = f"{field}[{i}]"
        ns = obj(ns, f)
        only_keys(ns, ("type", "path"), f)
        kind = string(ns.get("type"), f"{f}.type", max_len=16)
        if kind not in _NAMESPACES or any(t["type"] == kind for t in taken):
            refuse(f"{f}.type", f"{f}.type {kind!r} is unknown or repeated")
        entry = {"type": kind}
        if "path" in ns:
            path = clean_path(ns["path"], f"{f}.path")
            if not policy.allow_host_namespaces and not any(
                    within(path, root) for root in runtime_paths):
                refuse(f"{f}.path", f"joining the existing {kind} namespace {path} "
                                    f"({f}.path) is not allowed on this receiver "
                                    "(RestorePolicy.allow_host_namespaces)")
            entry["path"] = path
        taken.append(entry)
    missing = [n for n in REQUIRED_NAMESPACES if all(t["type"] != n for t in taken)]
    if missing and not policy.allow_host_namespaces:
        refuse(field, f"the container would share this receiver's {missing[0]} namespace "
                      f"({field} lacks it; RestorePolicy.allow_host_namespaces)")
    return taken
