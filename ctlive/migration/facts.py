"""Facts a restore depends on, gathered on each side of a migration for the preflight
(:mod:`ctlive.migration.preflight` compares them). Blocking: run them in a thread."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

from ctlive.backends.workload import process_tree

__all__ = [
    "FEATURE_CHECKS",
    "GLIBC_SELECTED",
    "cpu_flags",
    "cpu_needs",
    "declared_mounts",
    "destination_facts",
    "masked_hwcaps",
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

FEATURE_CHECKS = ("ns_pid", "link_nsid", "cgroupns")
"""CRIU features (``criu check --feature``) a dump may rely on; which ones a dump uses
comes from the workload (:func:`_criu_features`)."""


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


def declared_mounts(spec: Mapping[str, Any]) -> list[str]:
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
    declared = declared_mounts(spec)
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
                                  if f in FEATURE_CHECKS and _criu_check(f))
    facts = {
        "cpu": {"flags": sorted(cpu_flags())},
        "kernel": {"release": platform.release(), "boot_id": _boot_id()},
        "criu": criu,
        "cgroup": _cgroup(),
    }
    facts.update(extra or {})
    return facts
