"""The preflight: before any image byte moves, the source and the destination exchange
what a restore depends on, and a migration that cannot work is refused while the
workload runs on untouched.

It runs over the attested channel, after attestation (PREFLIGHT and PREFLIGHT_REPLY,
docs/protocol.md). The source sends its facts (:func:`source_facts`); the destination
answers with its own (:func:`destination_facts`, extensible: ``extra`` facts such as the
podman images it holds) and its verdict (:func:`compare`); the source checks the
comparison itself too and raises :class:`PreflightError` naming every difference.

What is compared (docs/backends.md, "Preflight"):

- CPU features: the ones the workload's code paths need. glibc picks its string, memory
  and math routines by the CPU it starts on (ifunc, glibc-hwcaps), so the workload needs
  each of :data:`GLIBC_SELECTED` that its CPU has, less those its ``GLIBC_TUNABLES``
  (``glibc.cpu.hwcaps=-AVX512F,...``) masked. A destination that lacks one restores a
  tree that dies of ``invalid opcode``.
- the CRIU version (the destination's must read the source's images: same or newer) and
  the CRIU features the dump relies on (``criu check --feature``); kernel releases are
  reported, not compared (CRIU handles the difference).
- mounts that must be external: across kernels (another boot id), a ``devtmpfs`` in the
  workload's mount namespace is the source kernel's own and must be declared external,
  and a cgroup v1 mount needs the same v1 hierarchy at the destination.
- the cgroup version (v1, v2, hybrid): containers' cgroup settings depend on it.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import attrs

from ctlive.backends.workload import Workload, process_tree
from ctlive.errors import ChannelError, MigrationError, Phase, RemoteProtocolError
from ctlive.ops.logs import get_logger
from ctlive.protocol.frames import Abort, Error, Event, Preflight, PreflightReply
from ctlive.transport.session import Session

__all__ = [
    "DESTINATION_FACTS",
    "GLIBC_SELECTED",
    "Difference",
    "PreflightError",
    "PreflightResult",
    "answer",
    "compare",
    "cpu_flags",
    "cpu_needs",
    "destination_facts",
    "exchange",
    "first_frame",
    "masked_hwcaps",
    "parse_differences",
    "refusals",
    "source_facts",
]

GLIBC_SELECTED: dict[str, str] = {
    "SSE2": "sse2", "SSE3": "pni", "SSSE3": "ssse3", "SSE4_1": "sse4_1", "SSE4_2": "sse4_2",
    "POPCNT": "popcnt", "LZCNT": "abm", "MOVBE": "movbe", "BMI1": "bmi1", "BMI2": "bmi2",
    "FMA": "fma", "FMA4": "fma4", "AVX": "avx", "AVX2": "avx2", "XSAVE": "xsave",
    "XSAVEC": "xsavec", "RTM": "rtm", "AVX512F": "avx512f", "AVX512CD": "avx512cd",
    "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
    "AVX512ER": "avx512er", "AVX512PF": "avx512pf",
}
"""glibc's ``glibc.cpu.hwcaps`` names of the CPU features whose presence makes it pick
code that faults without them, and their ``/proc/cpuinfo`` flags. (Hints such as ERMS
or FSRM change speed, not correctness, and are left out.)"""

log = get_logger("ctlive.preflight")

_FEATURE_CHECKS = ("ns_pid", "link_nsid", "cgroupns")
"""CRIU features (``criu check --feature``) a dump may rely on; which ones a dump uses
comes from the workload (:func:`_criu_features`)."""


class PreflightError(MigrationError):
    """The preflight refused the migration before any image byte was sent: the source
    workload runs on. ``differences`` lists what differs (each names the fact)."""

    def __init__(self, message: str, *, differences: tuple[Difference, ...] = (),
                 cause: BaseException | None = None) -> None:
        super().__init__(message, phase=Phase.PREFLIGHT, cause=cause)
        self.differences = differences


@attrs.frozen
class Difference:
    """One difference between the two sides: ``fact`` (``cpu``, ``criu``, ``mounts``,
    ``cgroup``, ``kernel``), what it is, and whether it refuses the migration."""

    fact: str
    message: str
    refuse: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The wire form (PREFLIGHT_REPLY's ``differences``)."""
        return {"fact": self.fact, "message": self.message, "refuse": self.refuse}


@attrs.frozen
class PreflightResult:
    """Both sides' facts and the differences found (none refuse: it passed)."""

    source: dict[str, Any]
    destination: dict[str, Any]
    differences: tuple[Difference, ...]

    def summary(self) -> dict[str, Any]:
        """What the report keeps: the destination's kernel, CRIU and CPU, and the notes."""
        d = self.destination
        return {"kernel": _get(d, "kernel", "release"), "criu": _get(d, "criu", "version"),
                "cgroup": _get(d, "cgroup", "version"),
                "cpu_needs": _get(self.source, "cpu", "needs"),
                "notes": [x.message for x in self.differences]}


def _get(facts: Mapping[str, Any], table: str, key: str) -> Any:
    sub = facts.get(table)
    return sub.get(key) if isinstance(sub, dict) else None


# -- gathering -----------------------------------------------------------------------------

def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this machine (the first processor's ``flags``)."""
    text = cpuinfo if cpuinfo is not None else pathlib.Path("/proc/cpuinfo").read_text()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def masked_hwcaps(environ: Mapping[str, str]) -> set[str]:
    """The cpuinfo flags a process's ``GLIBC_TUNABLES`` told glibc not to use."""
    out = set()
    for tunable in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = tunable.partition("=")
        if name.strip() != "glibc.cpu.hwcaps":
            continue
        for item in value.split(","):
            item = item.strip()
            if item.startswith("-") and item[1:] in GLIBC_SELECTED:
                out.add(GLIBC_SELECTED[item[1:]])
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for entry in raw.split(b"\0"):
        k, sep, v = entry.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def cpu_needs(flags: set[str], pids: list[int]) -> set[str]:
    """The CPU features the processes ``pids`` rely on: each one's glibc-selected flags
    less what its tunables mask (all of them when no process can be read)."""
    selected = flags & set(GLIBC_SELECTED.values())
    if not pids:
        return selected
    needs: set[str] = set()
    for pid in pids:
        needs |= selected - masked_hwcaps(_environ(pid))
    return needs


def _mounts(pid: int) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of ``pid``'s mount namespace."""
    out: list[tuple[str, str]] = []
    try:
        text = pathlib.Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if " - " in line and len(fields) > 4:
            fstype = line.split(" - ", 1)[1].split()[0]
            out.append((fields[4].replace("\\040", " "), fstype))
    return out


def _cgroup() -> dict[str, Any]:
    """This machine's cgroup version and its v1 controllers."""
    mounts = _mounts(os.getpid())
    v1 = sorted({os.path.basename(m) for m, t in mounts if t == "cgroup"})
    v2 = any(t == "cgroup2" for _, t in mounts)
    version = "hybrid" if v1 and v2 else "1" if v1 else "2"
    return {"version": version, "v1": v1}


def _criu_check(feature: str) -> bool:
    from ctlive.backends.criu import find_criu

    try:
        return subprocess.run([find_criu().path, "check", "--feature", feature],
                              capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _criu_facts(features: list[str]) -> dict[str, Any]:
    from ctlive.backends.criu import find_criu
    from ctlive.errors import CriuError

    try:
        criu = find_criu()
    except CriuError as exc:
        return {"version": None, "error": str(exc)[:300], "features": features}
    return {"version": ".".join(map(str, criu.version)), "features": features,
            "dirty_tracking": criu.dirty_tracking}


def _criu_features(pid: int | None, spec: Mapping[str, Any]) -> list[str]:
    """The CRIU features the workload's dump relies on."""
    used = {"ns_pid"}  # every workload lives in a PID namespace of its own
    if any(str(e).startswith("veth[") for e in spec.get("external", []) or []):
        used.add("link_nsid")
    if pid is not None:
        try:
            if os.readlink(f"/proc/{pid}/ns/cgroup") != os.readlink("/proc/self/ns/cgroup"):
                used.add("cgroupns")
        except OSError:
            pass
    return sorted(used)


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _declared_mounts(spec: Mapping[str, Any]) -> list[str]:
    """Mount points the restore spec declares external (``mnt[KEY]:...``, KEY the mount
    point at the source)."""
    out = []
    for e in spec.get("external", []) or []:
        e = str(e)
        if e.startswith("mnt[") and "]" in e:
            out.append("/" + e[4:e.index("]")].strip("/"))
    return out


def source_facts(kind: str, spec: Mapping[str, Any], pid: int | None) -> dict[str, Any]:
    """What the source tells the destination (blocking: run it in a thread). ``pid`` is
    the workload's root process when known (a process tree), else None."""
    flags = cpu_flags()
    pids: list[int] = []
    mounts: list[tuple[str, str]] = []
    if pid is not None:
        pids = process_tree(pid)
        mounts = _mounts(pid)
    declared = _declared_mounts(spec)
    return {
        "kind": kind,
        "cpu": {"flags": sorted(flags), "needs": sorted(cpu_needs(flags, pids))},
        "kernel": {"release": platform.release(), "boot_id": _boot_id()},
        "criu": _criu_facts(_criu_features(pid, spec)),
        "mounts": {"devtmpfs": sorted(m for m, t in mounts if t == "devtmpfs"
                                      and m not in declared),
                   "cgroup_v1": sorted(m for m, t in mounts if t == "cgroup"),
                   "external": declared},
        "cgroup": _cgroup(),
    }


def destination_facts(wanted_features: list[str],
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the destination answers with (blocking): its own facts, which of the CRIU
    features the source asked about pass here, and ``extra`` facts its owner adds."""
    criu = _criu_facts([])
    if criu.get("version") is not None:
        criu["features"] = sorted(f for f in wanted_features
                                  if f in _FEATURE_CHECKS and _criu_check(f))
    facts = {
        "cpu": {"flags": sorted(cpu_flags())},
        "kernel": {"release": platform.release(), "boot_id": _boot_id()},
        "criu": criu,
        "cgroup": _cgroup(),
    }
    facts.update(extra or {})
    return facts


# -- comparing -----------------------------------------------------------------------------

def _strings(facts: Mapping[str, Any], table: str, key: str, side: str) -> list[str]:
    """A list of strings from the peer's facts; a malformed one is a protocol error."""
    sub = facts.get(table, {})
    value = sub.get(key, []) if isinstance(sub, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) \
            or len(value) > 4096:
        raise RemoteProtocolError(f"preflight: the {side}'s {table}.{key} is not a list of "
                                  "strings")
    return value


def _version(v: Any) -> tuple[int, ...] | None:
    if not isinstance(v, str):
        return None
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return None


def compare(src: Mapping[str, Any], dst: Mapping[str, Any]) -> list[Difference]:
    """Every difference between the source's and the destination's facts that matters
    for a restore; those with ``refuse`` set make the migration impossible."""
    out: list[Difference] = []
    needs = _strings(src, "cpu", "needs", "source")
    have = set(_strings(dst, "cpu", "flags", "destination"))
    missing = sorted(set(needs) - have)
    if missing:
        hw = sorted(k for k, v in GLIBC_SELECTED.items() if v in missing)
        out.append(Difference("cpu", f"CPU features missing at the destination: "
                              f"{', '.join(missing)}. The workload's glibc uses them; start "
                              "it with GLIBC_TUNABLES=glibc.cpu.hwcaps="
                              f"{','.join('-' + h for h in hw)} to make it portable"))
    sv, dv = _version(_get(src, "criu", "version")), _version(_get(dst, "criu", "version"))
    if dv is None:
        out.append(Difference("criu", "the destination has no usable CRIU: "
                              f"{_get(dst, 'criu', 'error') or 'no version reported'}"))
    elif sv is not None and dv[:2] < sv[:2]:
        out.append(Difference("criu", f"the destination's CRIU {_get(dst, 'criu', 'version')}"
                              f" is older than the source's {_get(src, 'criu', 'version')}, "
                              "which wrote the images"))
    else:
        lacking = sorted(set(_strings(src, "criu", "features", "source"))
                         - set(_strings(dst, "criu", "features", "destination")))
        if lacking:
            out.append(Difference("criu", "CRIU features the dump uses that the destination "
                                  f"lacks (criu check --feature): {', '.join(lacking)}"))
    same_kernel = (_get(src, "kernel", "boot_id") or None) == _get(dst, "kernel", "boot_id")
    if not same_kernel:
        devs = _strings(src, "mounts", "devtmpfs", "source")
        if devs:
            out.append(Difference("mounts", "mounts that must be external (another kernel "
                                  f"restores): devtmpfs at {', '.join(devs)}; dump with "
                                  "--external 'mnt[/dev]:dev' and restore with "
                                  "'mnt[dev]:/dev'"))
        v1 = _strings(src, "mounts", "cgroup_v1", "source")
        dst_v1 = set(_strings(dst, "cgroup", "v1", "destination"))
        gone = [m for m in v1 if os.path.basename(m) not in dst_v1]
        if gone:
            out.append(Difference("mounts", "cgroup v1 mounts in the workload's mount "
                                  f"namespace that the destination cannot mount: "
                                  f"{', '.join(gone)} (it has cgroup "
                                  f"{_get(dst, 'cgroup', 'version')}); keep them out of the "
                                  "dumped mount namespace"))
        sk, dk = _get(src, "kernel", "release"), _get(dst, "kernel", "release")
        if sk != dk:
            out.append(Difference("kernel", f"kernel {sk} at the source, {dk} at the "
                                  "destination", refuse=False))
    scg, dcg = _get(src, "cgroup", "version"), _get(dst, "cgroup", "version")
    if scg != dcg:
        container = src.get("kind") in ("runc", "podman")
        out.append(Difference("cgroup", f"cgroup {scg} at the source, {dcg} at the "
                              "destination" + (": a container's cgroup settings do not carry"
                                               " over" if container else ""),
                              refuse=container))
    return out


def refusals(differences: list[Difference] | tuple[Difference, ...]) -> list[Difference]:
    """The differences that refuse the migration."""
    return [d for d in differences if d.refuse]


def parse_differences(value: Any) -> tuple[Difference, ...]:
    """PREFLIGHT_REPLY's ``differences`` from the peer (untrusted)."""
    if not isinstance(value, list) or len(value) > 256:
        raise RemoteProtocolError("preflight: differences must be a list")
    out = []
    for d in value:
        if not (isinstance(d, dict) and isinstance(d.get("fact"), str)
                and isinstance(d.get("message"), str) and isinstance(d.get("refuse"), bool)):
            raise RemoteProtocolError("preflight: a difference must be {fact, message, refuse}")
        out.append(Difference(d["fact"][:64], d["message"][:2000], d["refuse"]))
    return tuple(out)


# -- the exchange --------------------------------------------------------------------------

async def exchange(session: Session, workload: Workload) -> PreflightResult:
    """Source: send the facts, read the destination's, compare both ways; raises
    :class:`PreflightError` naming every difference that refuses the migration (before
    any image byte: the caller's workload runs on, untouched)."""
    pid = getattr(workload, "pid", None)
    facts = await anyio.to_thread.run_sync(
        source_facts, workload.kind, workload.restore_spec(),
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None)
    await session.send(Preflight(facts))
    reply = await session.receive()
    if isinstance(reply, Error):
        raise PreflightError(f"the destination failed the preflight: {reply.code}: "
                             f"{reply.message}")
    if not isinstance(reply, PreflightReply):
        raise RemoteProtocolError(f"expected PREFLIGHT_REPLY, got {type(reply).__name__}")
    found = {d.message: d for d in (*parse_differences(reply.differences),
                                    *compare(facts, reply.facts))}
    diffs = tuple(found.values())
    refused = refusals(diffs)
    if refused or reply.verdict != "ok":
        what = "; ".join(d.message for d in refused) or "it gave no reason"
        log.warning("preflight refused: %s", what, extra={"verdict": "refused"})
        raise PreflightError(f"preflight refused: {what}", differences=diffs)
    for d in diffs:
        log.info("preflight: %s", d.message)
    return PreflightResult(facts, dict(reply.facts), diffs)


async def answer(session: Session, request: Preflight,
                 extra: Mapping[str, Any] | None = None) -> bool:
    """Destination: reply to the source's PREFLIGHT with this machine's facts (plus
    ``extra``) and the verdict; returns whether it passed."""
    criu = request.facts.get("criu")
    wanted = criu.get("features", []) if isinstance(criu, dict) else []
    facts = await anyio.to_thread.run_sync(
        destination_facts, [f for f in wanted if isinstance(f, str)][:16], extra)
    try:
        diffs = compare(request.facts, facts)
    except RemoteProtocolError as exc:
        await session.send_error("bad-preflight", str(exc))
        raise
    refused = refusals(diffs)
    await session.send(PreflightReply(facts, "refused" if refused else "ok",
                                      [d.as_dict() for d in diffs]))
    if refused:
        log.warning("preflight refused: %s", "; ".join(d.message for d in refused),
                    extra={"verdict": "refused"})
    return not refused


def _podman_images() -> list[str]:
    from ctlive.backends.podman_store import podman_images

    return podman_images()


DESTINATION_FACTS: dict[str, Callable[[], Any]] = {"podman_images": _podman_images}
"""Facts a receiver adds to its PREFLIGHT_REPLY, by name (e.g. ``podman_images``: the
image digests it already holds, so that the source sends a base image only when it is
missing). Each provider is called in a worker thread and must return JSON data."""


async def first_frame(session: Session) -> Event | None:
    """Destination: the session's first frame after the preflight. A PREFLIGHT is
    answered (with :data:`DESTINATION_FACTS`) and the next frame returned; None when
    the source then stopped (ABORT: a refusal, or ``ctlive migrate --check``)."""
    first = await session.receive()
    if not isinstance(first, Preflight):
        return first
    extra = {}
    for name, provider in DESTINATION_FACTS.items():
        extra[name] = await anyio.to_thread.run_sync(provider)
    passed = await answer(session, first, extra)
    try:
        nxt = await session.receive()
    except ChannelError:
        if passed:
            raise
        return None  # refused: the source may just hang up
    if isinstance(nxt, Abort):
        log.info("the source stopped after the preflight: %s", nxt.reason[:200])
        return None
    return nxt
