"""The channel over real loopback TCP, under asyncio and trio: sessions, lanes,
refusals, and a man-in-the-middle that tampers with records."""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import pytest
from mitm import Mitm

from ctlive import errors
from ctlive.identity import Identity
from ctlive.protocol.frames import (
    Commit,
    CommitAck,
    IterationBegin,
    IterationEnd,
    MigrationMeta,
    Ready,
)
from ctlive.testing.doubles import FakeDestination, FakeProvider, FakeVerifier
from ctlive.transport.client import open_session
from ctlive.transport.server import serve_sessions
from ctlive.transport.session import Session

pytestmark = pytest.mark.anyio

SRC, DST = Identity.generate(), Identity.generate()


async def _migrate(addr: tuple[str, int], payloads: list[bytes], lanes: int = 1,
                   cipher: str = "AESGCM", verifier: Any = None,
                   identity: Identity = SRC) -> Session:
    async with open_session(addr, identity=identity, verifier=verifier or FakeVerifier(),
                            lanes=lanes, cipher=cipher, timeout=5) as s:
        await s.send(MigrationMeta({"id": "m1"}))
        await s.send(IterationBegin(0, final=True))
        for p in payloads:
            await s.send_change(0, p)
        await s.send(IterationEnd(0, True, s.lane_counts(0)))
        ready = await s.receive()
        assert isinstance(ready, Ready)
        await s.send(Commit("m1"))
        ack = await s.receive()
        assert isinstance(ack, CommitAck)
        return s


async def _server(tg: anyio.abc.TaskGroup, handler: Any, allow: Any = None) -> tuple[str, int]:
    return await tg.start(lambda task_status: serve_sessions(
        ("127.0.0.1", 0), identity=DST, provider=FakeProvider(),
        allow=allow if allow is not None else {SRC.public_key}, handler=handler,
        window=1 << 20, task_status=task_status))


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
async def test_session_roundtrip(lanes: int, cipher: str) -> None:
    payloads = [os.urandom(n) for n in (10, 70_000, 300_000, 1, 500_000, 4096)] * 3
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await _server(tg, dest)
        s = await _migrate(addr, payloads, lanes=lanes, cipher=cipher)
        await dest.done.wait()
        tg.cancel_scope.cancel()
    assert dest.errors == []
    assert sorted(dest.received) == sorted(payloads)
    assert s.attestation is not None and s.attestation.platform == "fake"
    stats = s.statistics()
    assert len(stats.lanes) == lanes
    assert stats.bytes_sent > sum(map(len, payloads))


async def test_attestation_refusal_sends_nothing_after_handshake() -> None:
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await _server(tg, dest)
        mitm = Mitm(addr)
        paddr = await tg.start(mitm.serve)
        with pytest.raises(errors.AttestationError):
            await _migrate(paddr, [b"secret pages"], verifier=FakeVerifier(accept=False))
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert mitm.bytes_after_msg1 == 0
    assert dest.received == []


async def test_unknown_source_refused_on_both_sides() -> None:
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await _server(tg, dest, allow={Identity.generate().public_key})
        with pytest.raises(errors.PeerNotAllowedError):
            await _migrate(addr, [b"x"])
        tg.cancel_scope.cancel()
    assert not dest.done.is_set()  # the handler never ran


async def test_random_bytes_as_handshake_then_valid_session() -> None:
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await _server(tg, dest)
        for junk in (os.urandom(100), b"CTL1\x01\x01" + os.urandom(300), b"CTLL" + bytes(60)):
            with socket.create_connection(addr) as raw:
                raw.sendall(junk)
        await _migrate(addr, [b"after junk"])
        await dest.done.wait()
        tg.cancel_scope.cancel()
    assert dest.received == [b"after junk"]


async def test_connect_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(errors.ConnectError):
        await _migrate(("127.0.0.1", port), [b"x"])
    with pytest.raises(errors.ConnectError):
        await _migrate("no-port-here", [b"x"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("flip", errors.TamperedRecordError),
        ("drop", errors.ReorderedRecordError),
        ("reorder", errors.ReorderedRecordError),
        ("replay", errors.ReplayedRecordError),
        ("truncate", errors.TruncatedStreamError),
        ("inject", errors.TamperedRecordError),
    ],
)
async def test_tampering_is_detected(action: str, error: type[Exception]) -> None:
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await _server(tg, dest)
        mitm = Mitm(addr, action=action, at=2)
        paddr = await tg.start(mitm.serve)
        with anyio.move_on_after(10), pytest.raises(errors.CtliveError):
            await _migrate(paddr, [os.urandom(1000) for _ in range(4)])
        with anyio.fail_after(10):
            await dest.done.wait()
        tg.cancel_scope.cancel()
    assert len(dest.errors) == 1
    assert isinstance(dest.errors[0], error), repr(dest.errors[0])


async def test_cancelled_connect_leaves_server_usable() -> None:
    dest = FakeDestination()

    async def slow(session: Session) -> None:
        await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        addr = await _server(tg, slow)
        with anyio.move_on_after(0.3) as scope:
            await _migrate(addr, [b"x"])
        assert scope.cancelled_caught
        addr2 = await _server(tg, dest)
        await _migrate(addr2, [b"y"])
        await dest.done.wait()
        tg.cancel_scope.cancel()
    assert dest.received == [b"y"]


async def test_channel_with_simulated_snp_attestation() -> None:
    from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier

    platform = SimulatedSnpPlatform()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    dest = FakeDestination()
    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve_sessions(
            ("127.0.0.1", 0), identity=DST, provider=platform, allow={SRC.public_key},
            handler=dest, task_status=task_status))
        s = await _migrate(addr, [b"attested"], verifier=verifier)
        await dest.done.wait()
        # The same evidence under a policy pinning another measurement: refused.
        strict = SnpVerifier(SnpPolicy(measurements=[bytes(48)]),
                             trusted_roots=[platform.trusted_root()])
        with pytest.raises(errors.MeasurementMismatchError):
            await _migrate(addr, [b"never sent"], verifier=strict)
        tg.cancel_scope.cancel()
    assert s.attestation is not None and s.attestation.insecure
    assert dest.received == [b"attested"]
