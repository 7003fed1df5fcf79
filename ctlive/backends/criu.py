"""Finding, checking and running CRIU.

ctlive looks for CRIU in ``$CTLIVE_CRIU``, then in the private prefix that
``scripts/install-criu`` fills (``/opt/ctlive/criu``), then on ``PATH``. It needs
version 4.2 or newer (older ones fail on current kernels) and a passing
``criu check``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess

import anyio
import attrs

from ctlive.errors import CheckpointError, CriuError, CriuNotFoundError, Phase

__all__ = [
    "DEFAULT_PREFIX",
    "MIN_VERSION",
    "Criu",
    "find_criu",
    "run_criu",
    "run_runtime",
]

DEFAULT_PREFIX = pathlib.Path(os.environ.get("CTLIVE_CRIU_PREFIX", "/opt/ctlive/criu"))
MIN_VERSION = (4, 2)
_FIX = "run `sudo scripts/install-criu` from the ctlive source tree (or set CTLIVE_CRIU)"


@attrs.frozen
class Criu:
    """A usable CRIU binary and what it can do here."""

    path: str
    version: tuple[int, ...]
    dirty_tracking: bool
    """Whether ``pre-dump`` works (soft-dirty tracking in the kernel)."""


def _version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except OSError as exc:
        raise CriuNotFoundError(f"cannot run {path}: {exc}; {_FIX}", cause=exc) from exc
    for line in out.splitlines():
        if line.startswith("Version:"):
            return tuple(int(x) for x in line.split()[1].split(".") if x.isdigit())
    raise CriuNotFoundError(f"{path} did not report a version; {_FIX}")


@functools.cache
def find_criu() -> Criu:
    """The CRIU to use; raises CriuNotFoundError saying what to run."""
    candidates = [os.environ.get("CTLIVE_CRIU"), str(DEFAULT_PREFIX / "usr/sbin/criu"),
                  shutil.which("criu")]
    tried = []
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        v = _version(c)
        if v < MIN_VERSION:
            tried.append(f"{c} is version {'.'.join(map(str, v))}")
            continue
        check = subprocess.run([c, "check"], capture_output=True, text=True, timeout=60,
                               check=False)
        if check.returncode != 0:
            raise CriuNotFoundError(
                f"`{c} check` fails on this kernel: {check.stderr.strip()[-500:]}")
        dirty = subprocess.run([c, "check", "--feature", "mem_dirty_track"],
                               capture_output=True, timeout=60, check=False).returncode == 0
        return Criu(c, v, dirty)
    detail = "; ".join(tried) or "none found"
    raise CriuNotFoundError(f"no CRIU >= 4.2 ({detail}); {_FIX}")


def _log_tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in text if "Error" in ln]
    return "\n".join((errors or text)[-lines:])


async def run_criu(args: list[str], *, workdir: pathlib.Path, log: str, phase: Phase) -> None:
    """Run ``criu ARGS -o LOG`` in ``workdir``; failures raise CriuError with the log tail."""
    criu = find_criu()
    cmd = [criu.path, *args, "-o", log, "-v4"]
    try:
        proc = await anyio.run_process(cmd, cwd=str(workdir), check=False)
    except OSError as exc:
        raise CriuError(f"cannot run CRIU: {exc}", phase=phase, cause=exc) from exc
    if proc.returncode != 0:
        raise CriuError(f"criu {args[0]} failed (exit {proc.returncode})", phase=phase,
                        log_tail=_log_tail(workdir / log))


async def run_runtime(args: list[str], *, phase: Phase, root: str | None = None,
                      tool: str = "runc") -> str:
    cmd = [tool] + (["--root", root] if root else []) + args
    env = dict(os.environ)
    # runc finds CRIU as `criu` on PATH; prefer the private install.
    env["PATH"] = f"{pathlib.Path(find_criu().path).parent}:{env.get('PATH', '')}"
    try:
        proc = await anyio.run_process(cmd, check=False, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise CheckpointError(f"cannot run runc: {exc}", phase=phase, cause=exc) from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise CriuError(f"{tool} {args[0]} failed: {err}", phase=phase)
    return proc.stdout.decode(errors="replace")
