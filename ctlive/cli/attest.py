"""``ctlive attest verify`` and ``ctlive attest report``."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ctlive.attest import (
    AttestationReport,
    Evidence,
    SnpPolicy,
    SnpVerifier,
    auto_provider,
    parse_report,
)
from ctlive.errors import AttestationError, ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``attest`` command group."""
    p = sub.add_parser("attest", help="inspect and verify SEV-SNP attestation reports")
    asub = p.add_subparsers(dest="attest_command", required=True, metavar="SUBCOMMAND")
    v = asub.add_parser("verify", help="verify a report (or ctlive evidence file)")
    v.add_argument("report", type=pathlib.Path, help="1184-byte report, or a ctlive evidence file")
    key = v.add_mutually_exclusive_group()
    key.add_argument("--vcek", type=pathlib.Path, help="VCEK certificate (DER or PEM)")
    key.add_argument("--vlek", type=pathlib.Path, help="VLEK certificate (DER or PEM)")
    v.add_argument("--chain", type=pathlib.Path, help="PEM with the ASK (or ASVK) then the ARK")
    pol = v.add_mutually_exclusive_group()
    pol.add_argument("--policy", type=pathlib.Path, help="policy TOML file")
    pol.add_argument("--no-policy", action="store_true",
                     help="check only signature, chain and certificate bindings")
    v.add_argument("--now", help="ISO date-time for certificate validity (default: now)")
    v.set_defaults(func=_verify)
    r = asub.add_parser("report", help="print this guest's attestation report")
    r.add_argument("--provider", choices=["configfs", "sev-guest"])
    r.add_argument("--report-data", default="00" * 64, help="64 bytes of hex")
    r.add_argument("-o", "--output", type=pathlib.Path, help="write the evidence to a file")
    r.set_defaults(func=_report)


def _evidence(args: argparse.Namespace) -> Evidence:
    data = args.report.read_bytes()
    ev = Evidence.from_bytes(data) if data.startswith(b"CTLEVID1") else Evidence(report=data)
    extra: dict[str, bytes] = {}
    if args.vcek:
        extra["vcek"] = args.vcek.read_bytes()
    if args.vlek:
        extra["vlek"] = args.vlek.read_bytes()
    if args.chain:
        try:
            certs = x509.load_pem_x509_certificates(args.chain.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{args.chain}: not a PEM certificate chain") from exc
        der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
        if len(der) != 2:
            raise ConfigError(f"{args.chain}: expected the ASK (or ASVK) and the ARK")
        extra["asvk" if args.vlek else "ask"] = der[0]
        extra["ark"] = der[1]
    fields = {k: getattr(ev, k) for k in ("report", "vcek", "vlek", "ask", "asvk", "ark")}
    fields.update(extra)
    return Evidence(**fields)


def summary(rep: AttestationReport) -> list[tuple[str, str]]:
    """Readable fields of a report."""
    pol = rep.policy
    flags = [n for n in ("smt_allowed", "migrate_ma", "debug", "single_socket")
             if getattr(pol, n)]
    return [
        ("version", str(rep.version)),
        ("product", rep.product.value if rep.product else "unknown (v2: from chain)"),
        ("guest_svn", str(rep.guest_svn)),
        ("policy", f"0x{pol.raw:x} abi {pol.abi_major}.{pol.abi_minor} "
                   f"[{', '.join(flags) or 'no flags'}]"),
        ("vmpl", str(rep.vmpl)),
        ("signing key", rep.signing_key.name),
        ("measurement", rep.measurement.hex()),
        ("report_data", rep.report_data.hex()),
        ("host_data", rep.host_data.hex()),
        ("family_id", rep.family_id.hex()),
        ("image_id", rep.image_id.hex()),
        ("id_key_digest", rep.id_key_digest.hex()),
        ("chip_id", rep.chip_id.hex()),
        ("current_tcb", str(rep.current_tcb)),
        ("reported_tcb", str(rep.reported_tcb)),
        ("committed_tcb", str(rep.committed_tcb)),
        ("launch_tcb", str(rep.launch_tcb)),
        ("firmware", "current %d.%d.%d" % rep.current_version
         + ", committed %d.%d.%d" % rep.committed_version),
    ]


def _print(rows: list[tuple[str, str]], title: str) -> None:
    print(title)
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"  {k:<{width}}  {val}")


def _verify(args: argparse.Namespace) -> int:
    ev = _evidence(args)
    rep = parse_report(ev.report)
    _print(summary(rep), f"report {args.report}")
    if args.policy:
        policy = SnpPolicy.from_toml(args.policy)
    else:
        policy = SnpPolicy.inspection()
    now = None
    if args.now:
        try:
            now = datetime.datetime.fromisoformat(args.now)
        except ValueError as exc:
            raise ConfigError(f"--now: not an ISO date-time: {args.now}") from exc
        if now.tzinfo is None:
            now = now.replace(tzinfo=datetime.UTC)
    verifier = SnpVerifier(policy, now=now)
    try:
        checked = verifier.check_evidence(ev, apply_policy=not args.no_policy)
    except AttestationError as exc:
        print(f"\nverdict: REFUSED — {type(exc).__name__}: {exc}")
        return 1
    _print(checked.verdicts, "\nchecks")
    which = "no policy (crypto and bindings only)" if args.no_policy else (
        f"policy {args.policy}" if args.policy else "default policy (measurement not pinned)")
    print(f"\nverdict: ACCEPTED under {which}")
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        data = bytes.fromhex(args.report_data)
    except ValueError as exc:
        raise ConfigError("--report-data must be hex") from exc
    if len(data) != 64:
        raise ConfigError("--report-data must be 64 bytes")
    evidence = auto_provider(args.provider).get_evidence(data)
    ev = Evidence.from_bytes(evidence)
    _print(summary(parse_report(ev.report)), "this guest's report")
    if args.output:
        args.output.write_bytes(evidence)
        print(f"evidence written to {args.output}", file=sys.stderr)
    return 0
