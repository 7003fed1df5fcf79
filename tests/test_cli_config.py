"""Configuration files for the CLI: checked strictly, flags win, `config check` and
`config show`."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from ctlive.cli import build_parser, main

CASES = [
    ('[serve]\nmax_sessions = "8"\n', '[serve] max_sessions: expected an integer, found "8"'),
    ("[serve]\nmax_sesions = 8\n", "[serve] max_sesions: unknown key"),
    ("[srve]\n", "[srve]: unknown table"),
    ('[migrate]\ncipher = "DES"\n', '[migrate] cipher: expected one of AESGCM, ChaChaPoly'),
    ('[serve]\nallow_hooks = "false"\n', "[serve] allow_hooks: expected true or false"),
    ("[serve]\nidle_timeout = true\n", "[serve] idle_timeout: expected a number"),
    ('[serve]\nallow_bind = "/srv"\n', "[serve] allow_bind: expected an array of strings"),
    ("[serve]\nlisten = 7788\n", "[serve] listen: expected a string, found 7788"),
    ('[serve]\nspool_size = "12Q"\n', '[serve] spool_size: expected a size such as 64G'),
    ('[serve]\nspool_size = true\n', "[serve] spool_size: expected a string or an integer"),
    ("[migrate]\nmin_shrink = [1]\n", "[migrate] min_shrink: expected a number, found [1]"),
    ('[migrate]\nnetwork_lock = "none"\n',
     "[migrate] network_lock: expected one of iptables, nftables, skip"),
    ('[serve]\nexternal_map = "veth[a]=b"\n', "[serve] external_map: expected an array"),
    ("[serve\n", "cannot load config"),
    ("[serve]\nwindow = \n", "(at line 2, column 10)"),  # where the syntax broke
]
CTLIVE = str(pathlib.Path(sys.executable).with_name("ctlive"))


@pytest.mark.parametrize(("text", "message"), CASES)
def test_broken_files_name_the_file_and_the_key(text: str, message: str,
                                                tmp_path: pathlib.Path) -> None:
    """`ctlive config check FILE` as a user runs it: exit 2, and one line that names the
    file, the key (or where the syntax broke) and what was expected."""
    f = tmp_path / "c.toml"
    f.write_text(text)
    out = subprocess.run([CTLIVE, "config", "check", str(f)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("ctlive: error: ") and out.stderr.count("\n") == 1
    assert str(f) in out.stderr and message in out.stderr, out.stderr


def test_config_check_of_a_missing_file_and_a_good_one(tmp_path: pathlib.Path) -> None:
    missing = subprocess.run([CTLIVE, "config", "check", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert f"cannot load config {tmp_path / 'nope.toml'}" in missing.stderr
    assert "No such file" in missing.stderr
    good = tmp_path / "good.toml"
    good.write_text('[serve]\nlisten = "0.0.0.0:7788"\nspool = "/var/lib/ctlive/spool.img"\n'
                    'spool_size = "64G"\nexternal_map = ["veth[eth0]=vh7"]\n'
                    "allow_new_privileges = false\n"
                    '[migrate]\nmin_shrink = 0.2\nsmoothing = 1\nrestore_rate = 2e9\n'
                    'freeze_cost = 0.5\nmetrics = "127.0.0.1:9789"\n')
    ok = subprocess.run([CTLIVE, "config", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == f"{good}: ok\n", ok.stderr
    shown = subprocess.run([CTLIVE, "config", "show", "--config", str(good)],
                           capture_output=True, text=True).stdout
    assert f"spool_size = {64 << 30}" in shown and "smoothing = 1.0" in shown
    assert 'external_map = ["veth[eth0]=vh7"]' in shown and "max_handshakes = 32" in shown


def test_a_good_file_checks_and_shows(tmp_path: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[serve]\nmax_sessions = 8\nallow_bind = ["/srv/data"]\n'
                 '[migrate]\nlanes = 2\n')
    assert main(["config", "check", str(f)]) == 0
    assert main(["config", "show", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "max_sessions = 8" in out and "lanes = 2" in out
    assert "max_handshakes = 32" in out  # defaults shown too
    assert 'allow_bind = ["/srv/data"]' in out


def test_flags_override_the_file(tmp_path: pathlib.Path) -> None:
    from ctlive.cli.config import apply

    f = tmp_path / "c.toml"
    f.write_text("[migrate]\nlanes = 2\nmax_iterations = 5\n")
    parser = build_parser()
    argv = ["migrate", "pid:1", "h:1", "--config", str(f), "--lanes", "3"]
    args = parser.parse_args(argv)
    apply(args.parser, args, argv[1:], "migrate")
    assert args.lanes == 3 and args.max_iterations == 5 and args.max_downtime == 0.3


def test_every_option_of_serve_and_migrate_is_reachable_from_the_file() -> None:
    """The file's keys are the parsers' own options: nothing a flag sets is missing."""
    from ctlive.cli.config import _actions

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    serve = set(_actions(sub["serve"]))  # type: ignore[index]
    migrate = set(_actions(sub["migrate"]))  # type: ignore[index]
    assert {"listen", "state", "key", "allow", "window", "max_sessions", "max_handshakes",
            "max_migrations", "max_image_bytes", "max_state_bytes", "handshake_timeout",
            "idle_timeout", "ready_alert_after", "discard_ready_after", "restore_store",
            "allow_hooks", "metrics", "log_format"} <= serve
    assert {"key", "policy", "state", "lanes", "cipher", "max_downtime", "max_iterations",
            "connect_timeout", "ready_timeout", "commit_timeout", "abort_timeout",
            "progress_timeout", "workdir", "tcp_established", "json"} <= migrate


# Every parameter of the Python API, and the CLI option (its TOML key) that sets it. A
# parameter added to migrate(), serve() or one of their option classes without a knob
# here fails test_every_parameter_has_a_knob.
MIGRATE_KNOBS = {
    "source": "target", "destination": "destination", "identity": "key",
    "attestation": "policy", "lanes": "lanes", "cipher": "cipher", "workdir": "workdir",
    "connect_timeout": "connect_timeout", "ready_timeout": "ready_timeout",
    "commit_timeout": "commit_timeout", "abort_timeout": "abort_timeout",
    "progress_timeout": "progress_timeout", "state_dir": "state",
}
MIGRATE_PYTHON_ONLY = {
    "convergence": "an object with decide(): its fields are the knobs (CONVERGENCE_KNOBS)",
    "on_progress": "a callable; the CLI's progress lines and --metrics are its consumer",
    "progress_channel": "an anyio memory stream, for Python consumers",
}
CONVERGENCE_KNOBS = {f: f for f in ("max_iterations", "max_downtime", "min_shrink",
                                    "smoothing", "restore_rate", "freeze_cost",
                                    "predump_freeze_cost")}
WORKLOAD_KNOBS = {  # the target's options: Process, RuncContainer, PodmanContainer
    "pid": "target", "container_id": "target", "name": "target",
    "tcp_established": "tcp_established", "external": "external", "shell_job": "shell_job",
    "network_lock": "network_lock", "live_read": "criu_precopy", "root": "runc_root",
    "carry": "carry", "carry_rootfs": "no_carry_rootfs",
}
SERVE_KNOBS = {
    "listen": "listen", "identity": "key", "provider": "provider", "allow": "allow",
    "state_dir": "state", "window": "window", "ready_alert_after": "ready_alert_after",
    "discard_ready_after": "discard_ready_after", "external_map": "external_map",
    "metrics": "metrics", "spool": "spool", "spool_size": "spool_size",
}
SERVE_PYTHON_ONLY = {
    "limits": "an object: its fields are the knobs (LIMITS_KNOBS)",
    "restore_policy": "an object: its fields are the knobs (RESTORE_POLICY_KNOBS)",
    "on_refusal": "a callable; the CLI logs and counts refusals (logs, metrics)",
    "on_session_error": "a callable; the CLI logs session errors",
    "post_restore": "Python code run inside the receiver (host-side plumbing)",
    "post_resume": "Python code run inside the receiver (moving traffic)",
    "task_status": "anyio's startup handshake; the CLI prints the address instead",
    "hooks": "a test hook (ctlive.testing.hooks.FaultHooks)",
    "registry": "a prometheus_client registry object; the CLI serves its own (--metrics)",
}
LIMITS_KNOBS = {f: f for f in ("max_sessions", "max_handshakes", "max_sessions_per_peer",
                               "handshake_timeout", "idle_timeout", "max_migrations",
                               "max_image_bytes", "max_state_bytes")}
RESTORE_POLICY_KNOBS = {
    "allow_hooks": "allow_hooks", "allow_host_mounts": "allow_host_mounts",
    "allow_devices": "allow_devices", "allowed_bind_sources": "allow_bind",
    "store": "restore_store", "allowed_capabilities": "allow_capability",
    "no_new_privileges": "allow_new_privileges",
    "allow_host_namespaces": "allow_host_namespaces", "bridge_map": "bridge_map",
    "allowed_carry_prefixes": "carry_prefix",
}


def _parameters(obj: object) -> set[str]:
    import inspect

    import attrs

    if attrs.has(obj):  # type: ignore[arg-type]
        return {a.name for a in attrs.fields(obj)}  # type: ignore[arg-type]
    target = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
    return {n for n in inspect.signature(target).parameters if n != "self"}


def test_every_parameter_has_a_knob() -> None:
    """Each parameter of migrate(), serve() and their option classes is either set by a
    CLI option (and so by the TOML file, which takes the same keys), or listed above as
    Python-only, with the reason."""
    from ctlive.backends import PodmanContainer, Process, RestorePolicy, RuncContainer
    from ctlive.cli.config import _actions
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.destination import serve
    from ctlive.migration.limits import ReceiverLimits
    from ctlive.migration.source import migrate

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert isinstance(sub, dict)
    dests = {c: set(_actions(sub[c])) | {"target", "destination"} for c in ("migrate", "serve")}
    cases = [
        (migrate, "migrate", MIGRATE_KNOBS, MIGRATE_PYTHON_ONLY),
        (Convergence, "migrate", CONVERGENCE_KNOBS, {}),
        (Process, "migrate", WORKLOAD_KNOBS, {}),
        (RuncContainer, "migrate", WORKLOAD_KNOBS, {}),
        (PodmanContainer, "migrate", WORKLOAD_KNOBS, {}),
        (serve, "serve", SERVE_KNOBS, SERVE_PYTHON_ONLY),
        (ReceiverLimits, "serve", LIMITS_KNOBS, {}),
        (RestorePolicy, "serve", RESTORE_POLICY_KNOBS, {}),
    ]
    for obj, command, knobs, python_only in cases:
        name = getattr(obj, "__name__", str(obj))
        missing = _parameters(obj) - set(knobs) - set(python_only)
        assert not missing, f"{name}: no CLI/TOML knob for {sorted(missing)}"
        for param in _parameters(obj) & set(knobs):
            assert knobs[param] in dests[command], \
                f"{name}({param}): ctlive {command} has no option {knobs[param]}"


def test_options_checked_before_anything_runs(tmp_path: pathlib.Path) -> None:
    """Exit 2 and a message naming the option, for settings that the file's types cannot
    catch: a --metrics address, options only a pid: target takes, a disk --state."""
    key, policy = tmp_path / "k", tmp_path / "p.toml"
    subprocess.run([CTLIVE, "keygen", "-o", str(key)], check=True, capture_output=True)
    policy.write_text("[snp]\nallow_any_measurement = true\n")
    base = ["--key", str(key), "--policy", str(policy), "--state", str(tmp_path / "src")]
    busy = socket.socket()  # a port in use
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for target, extra, message in [
        (f"pid:{os.getpid()}", ["--metrics", "nowhere"], "--metrics"),
        (f"pid:{os.getpid()}", ["--metrics", f"127.0.0.1:{busy.getsockname()[1]}"],
         "cannot serve metrics on 127.0.0.1:"),
        ("runc:web", ["--external", "veth[eth0]:vh0"], "go with a pid: TARGET"),
        ("podman:db", ["--carry", str(tmp_path)], "go with a pid: TARGET"),
        ("podman:db", ["--no-carry-rootfs"], "--no-carry-rootfs goes with a runc: TARGET"),
    ]:
        out = subprocess.run([CTLIVE, "migrate", target, "127.0.0.1:9", *base, *extra],
                             capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr, (target, out.stderr)
    busy.close()
    serve = subprocess.run([CTLIVE, "serve", "--key", str(key), "--allow", str(key),
                            "--state", str(tmp_path / "rx"), "--external-map", "veth0"],
                           capture_output=True, text=True)
    assert serve.returncode == 2 and "disk-backed" in serve.stderr
    assert not (tmp_path / "rx").exists()


def test_serve_on_a_port_in_use(tmp_path: pathlib.Path, memory_path: pathlib.Path) -> None:
    key = tmp_path / "k"
    subprocess.run([CTLIVE, "keygen", "-o", str(key)], check=True, capture_output=True)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([CTLIVE, "serve", "--listen", f"127.0.0.1:{port}", "--key",
                              str(key), "--allow", f"{key}.pub", "--state",
                              str(memory_path / "rx"), "--provider", "simulated"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"ctlive: error: cannot listen on 127.0.0.1:{port}: Address already in use" in \
        out.stderr and "Traceback" not in out.stderr


def test_config_show_output_is_a_valid_config_file(tmp_path: pathlib.Path) -> None:
    """An operator can start from `ctlive config show > ctlive.toml`: it checks, and
    loading it changes no setting."""
    shown = subprocess.run([CTLIVE, "config", "show"], capture_output=True, text=True,
                           check=True).stdout
    f = tmp_path / "ctlive.toml"
    f.write_text(shown)
    ok = subprocess.run([CTLIVE, "config", "check", str(f)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run([CTLIVE, "config", "show", "--config", str(f)],
                           capture_output=True, text=True, check=True).stdout
    assert "[serve]" in shown and "[migrate]" in shown
    assert again == shown
