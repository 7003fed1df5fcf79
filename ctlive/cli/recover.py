"""``ctlive recover``, ``ctlive status`` and ``ctlive discard``: the journals' commands."""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import anyio

from ctlive.errors import ConfigError

__all__ = ["register"]

EXIT_IN_DOUBT = 4
"""``ctlive recover`` left a migration in doubt (its destination could not be reached)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive recover``, ``ctlive status`` and ``ctlive discard``."""
    from ctlive.migration.recovery import DEFAULT_SOURCE_STATE

    r = sub.add_parser(
        "recover", help="resolve every unfinished migration in the source's journal",
        description="After a crash of the process that ran `ctlive migrate`: finish "
        "migrations decided to commit (COMMIT until acknowledged), resume the others once "
        "their destination confirmed the abort. Exit 0 when all are resolved, "
        f"{EXIT_IN_DOUBT} when some stay in doubt.")
    r.add_argument("--state", type=pathlib.Path, default=pathlib.Path(DEFAULT_SOURCE_STATE),
                   help=f"the source's state directory (default {DEFAULT_SOURCE_STATE})")
    r.add_argument("--key", type=pathlib.Path, required=True, help="this source's identity")
    r.add_argument("--policy", type=pathlib.Path, required=True,
                   help="SNP policy (TOML) the destination must satisfy")
    r.add_argument("--force-resume", action="store_true",
                   help="resume workloads whose destination cannot be reached although it "
                   "may hold a ready copy (only when that destination is gone for good)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_recover)

    s = sub.add_parser("status", help="list the migrations in a journal and their states")
    s.add_argument("--state", type=pathlib.Path, default=pathlib.Path(DEFAULT_SOURCE_STATE),
                   help="a source's or a receiver's state directory "
                   f"(default {DEFAULT_SOURCE_STATE})")
    s.add_argument("--all", action="store_true", help="finished migrations too")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    d = sub.add_parser("discard", help="receiver: discard a READY copy that waits for COMMIT")
    d.add_argument("migration_id")
    d.add_argument("--state", type=pathlib.Path, default=pathlib.Path("/run/ctlive"),
                   help="the receiver's state directory (default /run/ctlive)")
    d.set_defaults(func=_discard)


def _journal(state: pathlib.Path, role: str) -> object:
    from ctlive.migration.journal import Journal

    if not (state / "journal.sqlite").is_file():
        raise ConfigError(f"no journal in {state} (give the state directory with --state)")
    return Journal(state, role)


def _recover(args: argparse.Namespace) -> int:
    from ctlive.attest import SnpPolicy
    from ctlive.identity import Identity
    from ctlive.migration.recovery import recover

    if not (args.state / "journal.sqlite").is_file():
        raise ConfigError(f"no journal in {args.state} (give the state directory with --state)")
    done = anyio.run(lambda: recover(identity=Identity.load(args.key),
                                     attestation=SnpPolicy.from_toml(args.policy),
                                     state_dir=args.state, force_resume=args.force_resume))
    if args.json:
        print(json.dumps([{"migration_id": r.migration_id, "before": r.before,
                           "after": r.after, "action": r.action, "in_doubt": r.in_doubt}
                          for r in done], indent=2))
    else:
        if not done:
            print("nothing to recover")
        for r in done:
            print(f"{r.migration_id}: {r.before} -> {r.after}: {r.action}")
    return EXIT_IN_DOUBT if any(r.in_doubt for r in done) else 0


def _status(args: argparse.Namespace) -> int:
    from ctlive.migration.journal import Journal

    journal = _journal(args.state, "source")
    assert isinstance(journal, Journal)
    try:
        entries = journal.entries() if args.all else journal.unfinished()
    finally:
        journal.close()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print("no unfinished migrations" if not args.all else "no migrations")
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.updated).isoformat(timespec="seconds")
        where = e.data.get("destination") or e.data.get("kind", "")
        print(f"{e.migration_id}  {e.role:<11} {e.state:<17} {when}  {where}")
    return 0


def _discard(args: argparse.Namespace) -> int:
    from ctlive.migration.journal import DestinationState, Journal

    journal = _journal(args.state, "destination")
    assert isinstance(journal, Journal)
    try:
        e = journal.get(args.migration_id)
        if e is None:
            raise ConfigError(f"no migration {args.migration_id} in {args.state}")
        if e.state == DestinationState.COMMITTED:
            raise ConfigError(f"{args.migration_id} was committed: its copy is the workload")
        if e.state == DestinationState.DISCARDED:
            print(f"{args.migration_id} is already discarded")
            return 0
        journal.record(args.migration_id, DestinationState.DISCARD_REQUESTED,
                       requested_by="ctlive discard")
    finally:
        journal.close()
    print(f"{args.migration_id}: discard requested; the receiver carries it out within a "
          "second (or at its next start)", file=sys.stderr)
    return 0
