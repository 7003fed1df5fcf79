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
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import attrs

from ctlive.backends.workload import Workload
from ctlive.errors import ChannelError, MigrationError, Phase, RemoteProtocolError
from ctlive.migration.facts import (
    GLIBC_SELECTED,
    cpu_flags,
    cpu_needs,
    destination_facts,
    masked_hwcaps,
    source_facts,
)
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

log = get_logger("ctlive.preflight")

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

