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
import re
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
    "summarize_log",
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


# CRIU marks log lines "Error (file.c:line): ..." and "Warn  (file.c:line): ...", after
# a timestamp and, from the restorer, "pie: PID: ".
_MARKED = re.compile(r"\b(Error|Warn) +\([^()\s]+:\d+\): ")
_TIMESTAMP = re.compile(r"^\(\s*[\d.:]+\)\s*")
# Lines CRIU marks as errors but that do not make it fail.
_NON_FATAL = (
    # CRIU tries to raise its own open-file limit to fs.nr_open and carries on without.
    "rlimit: Can't setup RLIMIT_NOFILE",
)
_TAIL_LINES = 15


def _is_error(line: str) -> bool:
    m = _MARKED.search(line)
    return m is not None and m[1] == "Error" and not any(s in line for s in _NON_FATAL)


def summarize_log(text: str) -> str:
    """The line of a CRIU log that says what went wrong, without its timestamp: the first
    line marked as an error ("Error (file.c:line): ...") that is not one CRIU logs and
    carries on from (the rlimit line that leads nearly every log), preferring a specific
    error to CRIU's closing "Dumping FAILED." (or "Restoring FAILED.") line. Empty if no
    line is marked as an error."""
    errors = [_TIMESTAMP.sub("", ln).strip() for ln in text.splitlines() if _is_error(ln)]
    specific = [ln for ln in errors if not ln.endswith("FAILED.")]
    return (specific or errors or [""])[0]


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    """The end of a CRIU log: its last marked lines (errors and warnings, all of them),
    or its last lines if none is marked."""
    all_lines = text.splitlines()
    marked = [ln for ln in all_lines if _MARKED.search(ln)]
    return "\n".join((marked or all_lines)[-lines:])


def _log_error(message: str, log: pathlib.Path, *, phase: Phase, stderr: bytes = b"") -> CriuError:
    """A CriuError whose first line says what CRIU's log ``log`` says went wrong, with
    the log's tail attached (or CRIU's ``stderr``, if it wrote no log)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return CriuError(f"{message} (no log at {log})", phase=phase,
                         log_tail=_tail(stderr.decode(errors="replace")))
    summary = summarize_log(text)
    return CriuError(f"{message}: {summary or 'no error line in the log'} (log: {log})",
                     phase=phase, log_tail=_tail(text))


async def run_criu(args: list[str], *, workdir: pathlib.Path, log: str, phase: Phase) -> None:
    """Run ``criu ARGS -o LOG`` in ``workdir``; failures raise CriuError whose message
    leads with the log's first real error line, then the log tail."""
    criu = find_criu()
    cmd = [criu.path, *args, "-o", log, "-v4"]
    try:
        proc = await anyio.run_process(cmd, cwd=str(workdir), check=False)
    except OSError as exc:
        raise CriuError(f"cannot run CRIU: {exc}", phase=phase, cause=exc) from exc
    if proc.returncode != 0:
        raise _log_error(f"criu {args[0]} failed (exit {proc.returncode})", workdir / log,
                         phase=phase, stderr=proc.stderr)


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
