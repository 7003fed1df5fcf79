"""Configuration files for the CLI: checked strictly, flags win, `config check` and
`config show`."""

from __future__ import annotations

import pathlib

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
    ("[serve\n", "cannot load config"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_broken_files_name_the_file_and_the_key(text: str, message: str,
                                                tmp_path: pathlib.Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    assert main(["config", "check", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and message in err


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
