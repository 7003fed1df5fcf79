"""``ctlive serve`` and ``ctlive keygen``."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
from typing import Any

import anyio

from ctlive.errors import ConfigError, CtliveError
from ctlive.ops.logs import add_arguments as add_log_arguments

__all__ = ["register"]


def _keygen(args: argparse.Namespace) -> int:
    from ctlive.identity import Identity

    out: pathlib.Path = args.output.expanduser()
    if not args.force and os.path.lexists(out):
        raise ConfigError(f"{out} already exists; not overwriting a private key "
                          "(ctlive keygen --force replaces it)")
    ident = Identity.generate()
    ident.save(out, force=args.force)
    print(ident.public_key.hex())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctlive serve`` and ``ctlive keygen``."""
    k = sub.add_parser("keygen", help="make an X25519 identity (writes KEY and KEY.pub)")
    k.add_argument("-o", "--output", type=pathlib.Path, required=True,
                   help="the private key file (mode 0600); KEY.pub gets the public key")
    k.add_argument("--force", action="store_true",
                   help="replace an existing key file (the old key is lost)")
    k.set_defaults(func=_keygen)

    s = sub.add_parser("serve", help="receive migrations (run inside the SEV-SNP guest)")
    s.add_argument("--listen", default="0.0.0.0:7788")
    s.add_argument("--state", type=pathlib.Path, default=pathlib.Path("/run/ctlive"),
                   help="the receiver's state: images, journal (memory: a tmpfs or ramfs; "
                   "a directory on disk is refused)")
    s.add_argument("--spool", type=pathlib.Path, metavar="FILE",
                   help="keep the state in an encrypted spool in FILE instead (fscrypt v2 "
                   "on a loop device, a key made here and never written; for images larger "
                   "than memory; docs/backends.md)")
    s.add_argument("--spool-size", type=_size, default=4 << 30, metavar="SIZE",
                   help="the spool's size, e.g. 64G (default 4G)")
    s.add_argument("--config", type=pathlib.Path, metavar="FILE",
                   help="settings from the [serve] table of FILE (flags override it)")
    s.add_argument("--key", type=pathlib.Path, help="this receiver's identity (required)")
    s.add_argument("--allow", type=pathlib.Path,
                   help="file of allowed source public keys, hex, one per line (required)")
    s.add_argument("--window", type=int, default=64 << 20,
                   help="bytes of CHANGE payload a source may have in flight")
    s.add_argument("--discard-ready-after", type=float, default=None,
                   help="discard a READY copy that long after READY (default: never)")
    s.add_argument("--provider", choices=["configfs", "sev-guest", "simulated"],
                   help="attestation evidence: the guest's configfs-tsm or /dev/sev-guest "
                   "(default: whichever exists), or a SIMULATED platform (INSECURE: tests "
                   "and demos only)")
    s.add_argument("--simulated-chain", type=pathlib.Path, metavar="CHAIN.pem",
                   help="with --provider simulated: write the simulated platform's ARK+ASK "
                   "here, for a source policy's simulated_chain")
    s.add_argument("--external-map", action="append", default=[], metavar="RESOURCE=NAME",
                   help="rename an external resource for this host, e.g. veth[eth0]=vh7 "
                   "(repeatable; serve(external_map=...))")
    lim = s.add_argument_group("limits (defaults: ctlive.migration.limits.ReceiverLimits)")
    lim.add_argument("--max-sessions", type=int, default=16)
    lim.add_argument("--max-sessions-per-peer", type=int, default=None)
    lim.add_argument("--max-handshakes", type=int, default=32,
                     help="connections not yet authenticated")
    lim.add_argument("--max-migrations", type=int, default=4)
    lim.add_argument("--max-image-bytes", type=int, default=32 << 30,
                     help="largest image of one migration")
    lim.add_argument("--max-state-bytes", type=int, default=None,
                     help="all images in the state directory (default: 90%% of its filesystem)")
    lim.add_argument("--handshake-timeout", type=float, default=10.0)
    lim.add_argument("--idle-timeout", type=float, default=600.0,
                     help="cut off an authenticated peer that sends nothing this long")
    lim.add_argument("--ready-alert-after", type=float, default=600.0,
                     help="alert (never discard) when a READY copy waits this long for COMMIT")
    rp = s.add_argument_group("what a source's restore spec may ask for (default: nothing "
                              "beyond the container's own; ctlive.backends.RestorePolicy)")
    rp.add_argument("--restore-store", type=pathlib.Path, metavar="DIR",
                    help="where container root filesystems may be (default: STATE/bundles)")
    rp.add_argument("--allow-hooks", action="store_true", help="OCI hooks")
    rp.add_argument("--allow-host-mounts", action="store_true", help="bind mounts of host paths")
    rp.add_argument("--allow-bind", action="append", default=[], metavar="PATH",
                    help="one host path sources may bind-mount (repeatable)")
    rp.add_argument("--allow-devices", action="store_true",
                    help="devices beyond the OCI default set")
    rp.add_argument("--allow-capability", action="append", default=[], metavar="CAP",
                    help="a capability beyond the default set, e.g. CAP_NET_ADMIN "
                    "(repeatable)")
    rp.add_argument("--allow-new-privileges", action="store_true",
                    help="keep a process's setuid gains (default: noNewPrivileges on)")
    rp.add_argument("--allow-host-namespaces", action="store_true",
                    help="namespaces shared with other containers or given by path")
    rp.add_argument("--carry-prefix", action="append", default=[], metavar="DIR",
                    help="where a process tree's carried directories may be rebuilt "
                    "(repeatable; default /tmp, /var/tmp, /dev/shm)")
    rp.add_argument("--bridge-map", action="append", default=[], metavar="SOURCE=LOCAL",
                    help="a restored container's veth that was a port of bridge SOURCE joins "
                    "LOCAL here (default: the bridge of the same name; repeatable)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP here (docs/operations.md)")
    add_log_arguments(s)
    s.set_defaults(func=_serve, parser=s)

def _size(text: str) -> int:
    from ctlive.migration.spool import parse_size

    try:
        return parse_size(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            "a size such as 64G (bytes, or a number with K, M, G or T)") from None


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{flag} {item!r}: expected RESOURCE=NAME")
        out[key] = value
    return out


def _serve(args: argparse.Namespace) -> int:
    from ctlive.attest import auto_provider
    from ctlive.cli.config import apply, check_address, from_options
    from ctlive.identity import Identity, load_public_keys
    from ctlive.migration.destination import serve
    from ctlive.migration.limits import ReceiverLimits
    from ctlive.ops.logs import configure

    apply(args.parser, args, args.argv, "serve", required=("key", "allow"))
    configure(args.log_level, args.log_format)
    if args.spool is None:  # before anything is written there
        from ctlive.migration.spool import check_state_dir

        check_state_dir(args.state)
    check_address("--metrics", args.metrics)

    if args.provider == "simulated":
        from ctlive.attest import INSECURE_BANNER, SimulatedSnpPlatform
        from ctlive.fs import private_dir

        # Kept in the state directory: a restarted receiver presents the same chain. With a
        # spool nothing survives a restart (and --state may be a disk): in memory only.
        platform = SimulatedSnpPlatform(key_file=None if args.spool is not None else
                                        private_dir(args.state) / "simulated-platform.pem")
        if args.simulated_chain is not None:
            platform.write_chain(args.simulated_chain)
        print(f"{INSECURE_BANNER}: ctlive serve --provider simulated attests with a "
              "SIMULATED SEV-SNP platform; nothing it reports is protected by hardware",
              file=sys.stderr)
        provider: Any = platform
    elif args.simulated_chain is not None:
        raise ConfigError("--simulated-chain goes with --provider simulated")
    else:
        provider = auto_provider(args.provider)
    allow = load_public_keys(args.allow)
    if not allow:
        raise ConfigError(f"{args.allow} lists no source keys: nobody could migrate here")

    from ctlive.backends import RestorePolicy
    from ctlive.backends.restore import DEFAULT_CAPABILITIES

    restore_policy = RestorePolicy(
        store=args.restore_store, allow_hooks=args.allow_hooks,
        allow_host_mounts=args.allow_host_mounts, allow_devices=args.allow_devices,
        allowed_bind_sources=tuple(args.allow_bind),
        allowed_capabilities=DEFAULT_CAPABILITIES + tuple(args.allow_capability),
        no_new_privileges=not args.allow_new_privileges,
        allow_host_namespaces=args.allow_host_namespaces, bridge_map=tuple(args.bridge_map),
        **({"allowed_carry_prefixes": tuple(args.carry_prefix)} if args.carry_prefix else {}))
    external_map = _pairs(args.external_map, "--external-map")
    limits = from_options(ReceiverLimits, args)

    async def stop_on_sigterm(scope: anyio.CancelScope) -> None:
        # systemd stops a service with SIGTERM: shut down as on Ctrl-C, so that serve()
        # closes its journal and removes the spool's key instead of dying with them.
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                print("ctlive serve: SIGTERM, stopping", file=sys.stderr)
                scope.cancel()
                return

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_sigterm, tg.cancel_scope)
            addr = await tg.start(lambda task_status: serve(
                args.listen, identity=Identity.load(args.key), provider=provider, allow=allow,
                state_dir=args.state, limits=limits, ready_alert_after=args.ready_alert_after,
                restore_policy=restore_policy, metrics=args.metrics, window=args.window,
                discard_ready_after=args.discard_ready_after, external_map=external_map or None,
                spool=args.spool, spool_size=args.spool_size, task_status=task_status))
            print(f"ctlive receiver listening on {addr[0]}:{addr[1]}", file=sys.stderr)

    try:
        anyio.run(run)
    except BaseExceptionGroup as group:
        # A failure to start (the port in use, a state directory refused) comes out of
        # the task groups wrapped: report the ctlive error itself, with its exit code.
        found = _first_ctlive_error(group)
        if found is None:
            raise
        raise found from group
    return 0


def _first_ctlive_error(exc: BaseException) -> CtliveError | None:
    if isinstance(exc, CtliveError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first_ctlive_error(inner)) is not None:
                return found
    return None
