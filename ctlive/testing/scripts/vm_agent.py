"""The command agent inside a test VM (ctlive.testing.vm): runs what the host asks.

``python vm_agent.py DIR``: DIR is the host directory shared over 9p. The host writes
``DIR/cmd/<n>.json`` (``argv``, ``timeout``, ``env``, ``background``, ``cwd``); the agent
runs each in a thread of its own and writes ``DIR/out/<n>.json`` (``rc``, ``stdout``,
``stderr``, or ``pid`` for a background command, whose output goes to
``DIR/logs/<n>.log``). Files are written aside and renamed, so neither side reads half
of one. No network listener: only the host that owns DIR can ask anything.
"""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any

TAIL = 64 << 10


def _write(path: pathlib.Path, data: dict[str, Any]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _run(root: pathlib.Path, name: str, req: dict[str, Any]) -> None:
    out = root / "out" / name
    env = {**os.environ, **req.get("env", {})}
    cwd = req.get("cwd") or "/"
    try:
        if req.get("background"):
            with open(root / "logs" / (pathlib.Path(name).stem + ".log"), "wb") as log:
                p = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     close_fds=True, start_new_session=True)
            _write(out, {"pid": p.pid})
            return
        r = subprocess.run(req["argv"], stdin=subprocess.DEVNULL, capture_output=True,
                           env=env, cwd=cwd, close_fds=True, timeout=req.get("timeout"))
        _write(out, {"rc": r.returncode, "stdout": r.stdout[-TAIL:].decode(errors="replace"),
                     "stderr": r.stderr[-TAIL:].decode(errors="replace")})
    except subprocess.TimeoutExpired as exc:
        _write(out, {"rc": -9, "stdout": "", "stderr": f"timed out: {exc}"})
    except OSError as exc:
        _write(out, {"rc": -1, "stdout": "", "stderr": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    for sub in ("cmd", "out", "logs"):
        (root / sub).mkdir(exist_ok=True)
    (root / "ready").write_text(str(os.getpid()))
    while True:
        for f in sorted((root / "cmd").glob("*.json")):
            try:
                req = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # still being written
            f.unlink()
            if req.get("argv") == ["poweroff"]:
                os.sync()
                return
            threading.Thread(target=_run, args=(root, f.name, req), daemon=True).start()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
