"""A migration's two processes for tests whose source and receiver run inside hosts of
`ctlive.testing.hosts` (and, through ``fault_procs.py``, the fault matrix's receiver):
run as ``python host_procs.py receiver|source CONFIG_JSON``, each a process of its own.
``start_receiver`` and ``run_source``/``source_argv`` start them from a test.

The config is JSON. Both roles: ``ctl`` (a directory both sides see: the receiver writes
``rx-addr.json`` there once it listens and touches ``rx-<stage>`` at each receiver stage,
the source writes ``src-result.json``), ``platform`` (the simulated SNP platform's key
file), ``state`` (the side's state directory), ``backend`` (the anyio loop, asyncio by
default) and ``key`` (the side's private key, hex; the fixed test keys by default).

Receiver: ``listen`` and ``port`` (127.0.0.1:7788), ``allow`` (the source's public key,
hex; the test source's by default), ``pause_at`` (a stage where it waits for ``rx-go``),
``fail_before_ready`` (it touches ``rx-restored`` and fails before READY).

Source: ``kind`` (``process`` with ``pid`` and ``carry``, ``runc`` with ``id``, ``podman``
with ``name`` and ``tcp``), ``destination`` ([host, port]), ``max_downtime`` (0.0; three
iterations at most), ``timeouts`` (keyword arguments of ``migrate``: ``connect_timeout``
5 by default). Its result: ``ok``, and the report (``to_dict()``) with ``file_bytes`` per
iteration, ``restored_pid`` and, for podman, ``sizes`` (each dump's bytes by kind of
file); or ``error``, ``message`` and ``in_doubt``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import time
from typing import Any

SRC_KEY, DST_KEY = bytes(range(1, 33)), bytes(range(33, 65))
HERE = pathlib.Path(__file__).resolve()


def block_until(path: pathlib.Path) -> None:
    # Blocking on purpose: the whole process stands still at this point.
    while not path.exists():
        time.sleep(0.02)


class StageHooks:
    """Marks each receiver stage reached (``rx-<stage>`` in ``ctl``), waits for ``rx-go``
    at ``pause_at``, and fails before READY when told to."""

    def __init__(self, ctl: pathlib.Path, pause_at: str | None = None,
                 fail_before_ready: bool = False) -> None:
        self.ctl, self.pause_at, self.fail_before_ready = ctl, pause_at, fail_before_ready

    def on_stage(self, stage: str) -> None:
        from ctlive.errors import RestoreError

        (self.ctl / f"rx-{stage}").touch()
        if stage == self.pause_at:
            block_until(self.ctl / "rx-go")
        if stage == "before-ready" and self.fail_before_ready:
            (self.ctl / "rx-restored").touch()
            raise RestoreError("injected: the receiver fails before READY")


def verifier(platform_file: str) -> Any:
    """An SNP verifier that trusts the simulated platform whose key file is given."""
    from ctlive.attest import SnpPolicy, SnpVerifier
    from ctlive.attest.verifier import simulated_root

    root = simulated_root(platform_file)  # the key file starts with the ARK and the ASK
    measurement = hashlib.sha384(b"ctlive simulated guest").digest()  # the platform's default
    return SnpVerifier(SnpPolicy(measurements=[measurement]), trusted_roots=[root])


async def receiver(cfg: dict[str, Any]) -> None:
    import anyio

    from ctlive.attest import SimulatedSnpPlatform
    from ctlive.identity import Identity
    from ctlive.migration.destination import serve

    ctl = pathlib.Path(cfg["ctl"])
    allow = bytes.fromhex(cfg["allow"]) if cfg.get("allow") else Identity(SRC_KEY).public_key
    hooks = StageHooks(ctl, cfg.get("pause_at"), bool(cfg.get("fail_before_ready")))
    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve(
            (cfg.get("listen", "127.0.0.1"), cfg.get("port", 7788)),
            identity=Identity(bytes.fromhex(cfg.get("key", DST_KEY.hex()))),
            provider=SimulatedSnpPlatform(key_file=cfg["platform"]), allow={allow},
            state_dir=cfg["state"], hooks=hooks, task_status=task_status))
        (ctl / "rx-addr.json").write_text(json.dumps(list(addr)))
        await anyio.sleep_forever()


def _workload(cfg: dict[str, Any], sizes: list[dict[str, int]]) -> Any:
    from ctlive.backends import Process, RuncContainer
    from ctlive.backends.podman import PodmanContainer

    class Recorded(PodmanContainer):
        """Notes what each dump holds, by kind of file."""

        async def _dump(self, images_dir: pathlib.Path, **kw: Any) -> Any:
            res = await super()._dump(images_dir, **kw)
            kinds: dict[str, int] = {}
            for f in images_dir.iterdir():
                kind = ("image" if f.name.startswith("podman-image+") else
                        "volumes" if f.name.startswith("podman+volumes+") else
                        "archive" if f.name.startswith("podman+") else
                        "pages" if f.name.startswith("pages-") else "criu")
                kinds[kind] = kinds.get(kind, 0) + f.stat().st_size
            sizes.append(kinds)
            return res

    if cfg["kind"] == "process":
        return Process(cfg["pid"], carry=cfg.get("carry", ()))
    if cfg["kind"] == "runc":
        return RuncContainer(cfg["id"])
    return Recorded(cfg["name"], tcp_established=cfg.get("tcp"))


async def source(cfg: dict[str, Any]) -> None:
    from ctlive import errors
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.source import migrate

    sizes: list[dict[str, int]] = []
    result: dict[str, Any]
    try:
        report = await migrate(
            _workload(cfg, sizes), tuple(cfg["destination"]),
            identity=Identity(bytes.fromhex(cfg.get("key", SRC_KEY.hex()))),
            attestation=verifier(cfg["platform"]),
            convergence=Convergence(max_iterations=3,
                                    max_downtime=cfg.get("max_downtime", 0.0)),
            state_dir=cfg["state"], **{"connect_timeout": 5, **cfg.get("timeouts", {})})
        result = {"ok": True, **report.to_dict(),
                  "file_bytes": [i.file_bytes for i in report.iterations],
                  "restored_pid": report.destination_summary.get("restored_pid"),
                  "sizes": sizes}
    except errors.CtliveError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                  "in_doubt": isinstance(exc, errors.InDoubtError)}
    (pathlib.Path(cfg["ctl"]) / "src-result.json").write_text(json.dumps(result, default=str))


# --- from a test ----------------------------------------------------------------------

def control(shared: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``shared``/ctl (made) and ``shared``/platform.pem (a simulated platform's key file,
    made unless there)."""
    from ctlive.attest import SimulatedSnpPlatform

    ctl, platform = shared / "ctl", shared / "platform.pem"
    ctl.mkdir(parents=True, exist_ok=True)
    SimulatedSnpPlatform(key_file=platform)
    return ctl, platform


def wait_for(path: pathlib.Path, proc: Any, what: str, timeout: float = 30) -> None:
    """Until ``path`` exists; fails after ``timeout`` s or when ``proc`` has ended."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and proc.poll() is None, what
        time.sleep(0.05)


def start_receiver(host: Any, shared: pathlib.Path, **cfg: Any) -> Any:
    """The receiver inside ``host`` (on 0.0.0.0:7788, its state on the host's own
    /run/ctlive unless ``cfg`` says otherwise), once it listens; its process."""
    ctl, platform = control(shared)
    conf = {"ctl": str(ctl), "platform": str(platform), "listen": "0.0.0.0", "port": 7788,
            "state": "/run/ctlive", **cfg}
    proc = host.popen([sys.executable, str(HERE), "receiver", json.dumps(conf)])
    wait_for(ctl / "rx-addr.json", proc, "the receiver did not start")
    return proc


def source_argv(destination: Any, shared: pathlib.Path, **cfg: Any) -> list[str]:
    """The command line of a source migrating to ``destination`` (a host; port 7788),
    its state in /run/ctlive-src of the host it runs in unless ``cfg`` says otherwise."""
    ctl, platform = control(shared)
    conf = {"ctl": str(ctl), "platform": str(platform), "destination": [destination.ip, 7788],
            "state": "/run/ctlive-src", **cfg}
    return [sys.executable, str(HERE), "source", json.dumps(conf)]


def source_result(shared: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((shared / "ctl" / "src-result.json").read_text())
    return out


def run_source(host: Any, destination: Any, shared: pathlib.Path, *, ok: bool | None = True,
               timeout: float = 180, **cfg: Any) -> dict[str, Any]:
    """The source inside ``host`` to its end; its result, checked to be ``ok`` (unless
    None) with the source's stderr in the message."""
    out = host.run(source_argv(destination, shared, **cfg), timeout=timeout)
    result = source_result(shared)
    assert ok is None or result["ok"] == ok, (result, out.stderr[-3000:])
    return result


if __name__ == "__main__":
    import anyio

    role, conf = sys.argv[1], json.loads(sys.argv[2])
    anyio.run({"receiver": receiver, "source": source}[role], conf,
              backend=conf.get("backend", "asyncio"))
