"""``ctlive demo`` (a real migration between two hosts of :mod:`ctlive.testing.hosts` on
this machine, driven by ``ctlive serve`` and ``ctlive migrate``) and ``ctlive bench``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ctlive.attest import INSECURE_BANNER
from ctlive.backends.criu import find_criu
from ctlive.errors import ConfigError
from ctlive.testing.hosts import Host, Network
from ctlive.testing.hostservice import HostService

__all__ = ["register", "run_demo"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive demo`` and ``ctlive bench``."""
    d = sub.add_parser("demo", help="migrate a sample TCP service between two hosts on this "
                       "machine (needs root)")
    d.add_argument("--lanes", type=int, default=1)
    d.add_argument("--mib", type=int, default=32, help="workload size")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)

    # Its options belong to the suite: none are parsed here ("+" is no option prefix).
    b = sub.add_parser("bench", help="the benchmark suite (from a source checkout; needs root)",
                       prefix_chars="+", add_help=False)
    b.add_argument("bench_args", nargs="*", help="arguments of python -m benchmarks")
    b.set_defaults(func=_bench)


def _alive_in(host: Host, pid: int) -> bool:
    """Whether ``pid`` (as ``host`` numbers it) runs there, not stopped and not a zombie."""
    state = host.run(["sh", "-c", f"grep '^State:' /proc/{pid}/status"]).stdout.split()
    return len(state) > 1 and state[1] in ("R", "S", "D")


class _Lines:
    """A subprocess's stderr, echoed line by line with a prefix (plain, unwrapped)."""

    def __init__(self, proc: subprocess.Popen[str], prefix: str, echo: Callable[[str], None]
                 ) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._stream, self._prefix, self._echo = proc.stderr, prefix, echo
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self._stream:
            self.lines.append(line.rstrip("\n"))
            self._echo(f"{self._prefix} {line.rstrip()}")

    def wait_for(self, text: str, timeout: float, proc: subprocess.Popen[str]) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            for line in self.lines:
                if text in line:
                    return line
            time.sleep(0.05)
        raise ConfigError(f"{self._prefix} did not say {text!r}: "
                          + " | ".join(self.lines[-5:]))


def run_demo(*, lanes: int = 1, mib: int = 32, json_out: bool = False) -> dict[str, Any]:
    """Run the demo on two hosts of :mod:`ctlive.testing.hosts`; returns the migration
    report (as ``ctlive migrate --json`` prints it) after checking the outcome."""
    if os.geteuid() != 0:
        raise ConfigError("the demo needs root (CRIU checkpoints other processes)")
    find_criu()
    out = sys.stderr if json_out else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    say(f"{INSECURE_BANNER} (there is no SEV hardware here)")
    ctlive = [sys.executable, "-m", "ctlive"]
    with Network() as net:
        a, b = net.host("host-a"), net.host("host-b")
        say(f"two hosts on bridge {net.bridge} ({net.prefix}.0/24): host-a {a.ip} (source), "
            f"host-b {b.ip} (destination, stands for the SEV-SNP guest); each has its own "
            "network, mount, PID and UTS namespaces, private /tmp, /var/tmp and /run, and "
            f"its own bridge {a.bridge} for its containers")
        # Each side's files are its own host's (/run is private to each).
        for h, name in ((a, "source"), (b, "receiver")):
            h.path("/run/ctlive-demo").mkdir(mode=0o700, exist_ok=True)
            r = h.run([*ctlive, "keygen", "-o", f"/run/ctlive-demo/{name}.key"])
            if r.returncode:
                raise ConfigError(f"keygen in {h.name} failed: {r.stderr.strip()}")
        b.path("/run/ctlive-demo/allow.txt").write_text(
            a.path("/run/ctlive-demo/source.key.pub").read_text())
        serve = b.popen([*ctlive, "serve", "--listen", "0.0.0.0:7788",
                         "--key", "/run/ctlive-demo/receiver.key",
                         "--allow", "/run/ctlive-demo/allow.txt", "--state", "/run/ctlive",
                         "--provider", "simulated",
                         "--simulated-chain", "/run/ctlive-demo/chain.pem",
                         *HostService.serve_args(b.bridge)],
                        stderr=subprocess.PIPE, text=True)
        svc: HostService | None = None
        try:
            _Lines(serve, "  [host-b serve]", say).wait_for("listening on", 60, serve)
            # The source trusts this simulated platform only because its policy says so.
            a.path("/run/ctlive-demo/chain.pem").write_bytes(
                b.path("/run/ctlive-demo/chain.pem").read_bytes())
            a.path("/run/ctlive-demo/policy.toml").write_text(
                '[snp]\nallow_any_measurement = true\nsimulated_chain = "chain.pem"\n')
            svc = HostService(a, f"{net.prefix}.100", mib=mib)
            say(f"workload in host-a: pid {svc.host_pid} there, a TCP service on "
                f"{svc.ip}:7000 with {mib} MiB of changing memory, its veth a port of "
                f"host-a's {a.bridge}; a client outside every host has one connection open "
                f"({len(svc.replies)} replies so far)")
            target, *options = svc.migrate_args()
            argv = [*ctlive, "migrate", target, f"{b.ip}:7788", *options,
                    "--key", "/run/ctlive-demo/source.key",
                    "--policy", "/run/ctlive-demo/policy.toml", "--state", "/run/ctlive-src",
                    "--max-downtime", "0.3", "--max-iterations", "6", "--lanes", str(lanes),
                    "--json"]
            say("$ " + " ".join(argv[2:]) + "    (in host-a)")
            mig = a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _Lines(mig, "  [host-a migrate]", say)  # its stderr; stdout is the report
            assert mig.stdout is not None
            stdout = mig.stdout.read()
            mig.wait(timeout=600)
            if mig.returncode != 0:
                raise ConfigError(f"ctlive migrate exited {mig.returncode}")
            report: dict[str, Any] = json.loads(stdout)
            handed_over = len(svc.replies)
            svc.wait_replies(20, timeout=60)
            new_pid = int(report["destination_summary"]["restored_pid"])
            survived = not svc.errors and len(svc.replies) >= handed_over + 20
            src_gone = not _alive_in(a, svc.host_pid)
            ok = survived and src_gone and _alive_in(b, new_pid)
            _summary(say, report, svc)
            say(f"source pid {svc.host_pid} in host-a {'gone' if src_gone else 'STILL RUNNING'}"
                f", restored pid {new_pid} in host-b "
                f"{'running' if _alive_in(b, new_pid) else 'NOT RUNNING'}")
            if not ok:
                raise ConfigError("the demo's checks failed (see above)")
            say("OK: the service moved from host-a to host-b and its client's connection "
                "survived")
            if json_out:
                print(json.dumps(report, indent=2))
            return report
        finally:
            if svc is not None:
                svc.cleanup()
            serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(10)
            serve.kill()


def _summary(say: Callable[[str], None], report: dict[str, Any], svc: HostService) -> None:
    it = report["iterations"]
    say(f"\nmigrated in {report['total_time']:.2f} s, downtime "
        f"{report['downtime'] * 1000:.0f} ms ({len(it)} iterations)")
    for i in it:
        say(f"  iteration {i['index']}{' (final)' if i['final'] else ''}: "
            f"{i['pages_changed']}/{i['pages_total']} pages changed, "
            f"{i['wire_bytes'] / 1e6:.2f} MB on the wire for "
            f"{i['image_bytes'] / 1e6:.1f} MB of image; CRIU frozen "
            f"{(i['frozen_time_us'] or 0) / 1000:.0f} ms")
    for d in report["decisions"]:
        say(f"  after iteration {d['after_iteration']}: {d['reason']}")
    say(f"wire bytes {report['bytes_on_wire'] / 1e6:.2f} MB for "
        f"{report['image_bytes'] / 1e6:.1f} MB of dumped image; attestation: "
        f"{report['attestation'].get('platform')}")
    last = svc.replies[-1][1] if svc.replies else 0
    say(f"TCP client (outside every host): {len(svc.replies)} replies, last {last}, longest "
        f"gap {svc.max_gap() * 1000:.0f} ms, "
        + ("no reset and no lost reply" if not svc.errors else f"ERRORS {svc.errors}"))


def _demo(args: argparse.Namespace) -> int:
    run_demo(lanes=args.lanes, mib=args.mib, json_out=args.json)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The suite lives in the repository (benchmarks/), not in the installed package: run
    # it as ``python -m benchmarks`` in the checkout this package was loaded from.
    checkout = pathlib.Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise ConfigError("ctlive bench runs from a source checkout (benchmarks/ is not "
                          "installed with the package)")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.bench_args],
                          cwd=checkout, check=False).returncode
