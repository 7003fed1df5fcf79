"""The receiver's connection layer against hostile and buggy peers, over real loopback
TCP under asyncio and trio: floods of bad connections, descriptor exhaustion, the
handshake and session limits, and the idle timeout."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from ctlive import errors
from ctlive.identity import Identity
from ctlive.protocol.frames import (
    Change,
    Commit,
    CommitAck,
    Error,
    IterationBegin,
    IterationEnd,
    MigrationMeta,
    Ready,
)
from ctlive.protocol.handshake import InitiatorHandshake
from ctlive.protocol.lanes import lane_preamble
from ctlive.testing.doubles import FakeDestination, FakeProvider, FakeVerifier
from ctlive.transport.client import open_session
from ctlive.transport.server import SessionServer
from ctlive.transport.session import Session

pytestmark = pytest.mark.anyio

SRC, SRC2, STRANGER, DST = (Identity.generate() for _ in range(4))


async def _one_session(session: Session) -> None:
    await FakeDestination()(session)


class _Rig:
    """A SessionServer on 127.0.0.1 that records its refusals."""

    def __init__(self, handler: Callable[[Session], Any] = _one_session, **limits: Any) -> None:
        self.provider = FakeProvider()
        self.refusals: list[tuple[str, str]] = []
        self.server = SessionServer(
            identity=DST, provider=self.provider, allow={SRC.public_key, SRC2.public_key},
            handler=handler, window=1 << 20,
            on_refusal=lambda reason, peer: self.refusals.append((reason, peer)), **limits)
        self.addr: tuple[str, int] = ("", 0)

    async def start(self, tg: anyio.abc.TaskGroup) -> tuple[str, int]:
        self.addr = await tg.start(self.server.serve, ("127.0.0.1", 0))
        return self.addr

    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.refusals]

    @contextlib.asynccontextmanager
    async def session(self, identity: Identity = SRC) -> AsyncIterator[Session]:
        async with open_session(self.addr, identity=identity, verifier=FakeVerifier(),
                                timeout=5) as s:
            yield s

    async def roundtrip(self, identity: Identity = SRC) -> None:
        async with self.session(identity) as s:
            await _migrate_on(s)


async def _migrate_on(s: Session, pause: float = 0.0, changes: int = 1) -> None:
    """One iteration and the commit on an open session, ``pause`` s between changes."""
    await s.send(MigrationMeta({"id": "m1"}))
    await s.send(IterationBegin(0, final=True))
    for i in range(changes):
        await anyio.sleep(pause)
        await s.send_change(0, b"page %d" % i)
    await s.send(IterationEnd(0, True, s.lane_counts(0)))
    assert isinstance(await s.receive(), Ready)
    await s.send(Commit("m1"))
    assert isinstance(await s.receive(), CommitAck)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


# -- hostile peers -------------------------------------------------------------------------


async def _drain(stream: anyio.abc.ByteReceiveStream) -> None:
    """Read until the server closes the connection (or resets it)."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead,
                             OSError):
        while True:
            await stream.receive()


async def _send_quietly(stream: anyio.abc.SocketStream, data: bytes) -> None:
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(data)


async def _slowloris(stream: anyio.abc.SocketStream) -> None:
    for byte in b"CTL1\x01\x01":
        await _send_quietly(stream, bytes([byte]))
        await anyio.sleep(1)


async def _stranger(stream: anyio.abc.SocketStream) -> BufferedByteReceiveStream:
    """A complete handshake with a key not on the allow-list, then silence."""
    buffered = BufferedByteReceiveStream(stream)
    init = InitiatorHandshake(STRANGER, FakeVerifier())
    msg1 = init.start()
    await _send_quietly(stream, b"CTL1\x01\x01" + len(msg1).to_bytes(2, "big") + msg1)
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead,
                             OSError):
        n = int.from_bytes(await buffered.receive_exactly(2), "big")
        msg3 = init.receive(await buffered.receive_exactly(n))
        assert msg3 is not None
        await _send_quietly(stream, len(msg3).to_bytes(2, "big") + msg3)
    return buffered


KINDS: dict[str, tuple[bytes, str]] = {
    # kind: (what it sends at once, the refusal it earns when it gets a handshake slot)
    "junk": (b"\x00" + os.urandom(99), "bad-preamble"),
    "slowloris": (b"", "handshake-timeout"),
    "huge-length": (b"CTL1\x01\x01\xff\xff" + bytes(10), "handshake-timeout"),
    "half-lane-join": (b"CTLL\x00\x01", "handshake-timeout"),
    "forged-lane-join": (b"CTLL" + os.urandom(49), "bad-lane-join"),
    # message 1's payload is clear JSON: nested deep enough to exhaust the stack
    "deep-json": (b"CTL1\x01\x01\xea\x80" + os.urandom(32) + b"[" * 60000, "bad-handshake"),
    "stranger": (b"", "peer-not-allowed"),
    "idle": (b"", "handshake-timeout"),
}


async def _hostile(kind: str, addr: tuple[str, int], peers: dict[str, str],
                   closed_after: list[float], connected: Callable[[], None]) -> None:
    stream = await anyio.connect_tcp(*addr)
    local = stream.extra(anyio.abc.SocketAttribute.local_address)
    assert isinstance(local, tuple)
    peers[f"{local[0]}:{local[1]}"] = kind
    connected()
    t0 = anyio.current_time()
    async with stream, anyio.create_task_group() as tg:
        reader: anyio.abc.ByteReceiveStream = stream
        if kind == "slowloris":
            tg.start_soon(_slowloris, stream)
        elif kind == "stranger":
            reader = await _stranger(stream)
        else:
            await _send_quietly(stream, KINDS[kind][0])
        await _drain(reader)
        closed_after.append(anyio.current_time() - t0)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("max_handshakes", [32, 256])
async def test_flood_of_hostile_connections(max_handshakes: int) -> None:
    """200 hostile connections at once: each is closed within handshake_timeout (or at
    once, beyond max_handshakes) with one refusal reported, and a legitimate session
    completes meanwhile."""
    rig = _Rig(handshake_timeout=1.0, max_handshakes=max_handshakes)
    peers: dict[str, str] = {}
    closed_after: list[float] = []
    kinds = list(KINDS)
    attempts = 0
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        all_connected = anyio.Event()

        def connected() -> None:
            if len(peers) == 200:
                all_connected.set()

        async with anyio.create_task_group() as flood:
            for i in range(200):
                flood.start_soon(_hostile, kinds[i % len(kinds)], rig.addr, peers,
                                 closed_after, connected)
            with anyio.fail_after(5):
                await all_connected.wait()
            with anyio.fail_after(5):
                while True:
                    attempts += 1
                    try:
                        await rig.roundtrip()
                        break
                    except errors.ChannelError:  # refused at the door while the flood lasts
                        await anyio.sleep(0.1)
        await _until(lambda: sum(peer in peers for _, peer in rig.refusals) == 200)
        tg.cancel_scope.cancel()

    assert len(closed_after) == 200
    assert max(closed_after) < 1.0 + 1.0, "a hostile connection outlived handshake_timeout"
    by_peer = {peer: reason for reason, peer in rig.refusals}
    assert len(by_peer) == len(rig.refusals), "one refusal per connection"
    for peer, kind in peers.items():
        assert by_peer[peer] in (KINDS[kind][1], "too-many-handshakes"), (kind, by_peer[peer])
    legit = [reason for reason, peer in rig.refusals if peer not in peers]
    assert legit == ["too-many-handshakes"] * (attempts - 1)
    if max_handshakes > 200:  # every connection got a slot: each earned its own refusal
        assert attempts == 1
        assert all(by_peer[peer] == KINDS[kind][1] for peer, kind in peers.items())
        strangers = sum(kind == "stranger" for kind in peers.values())
        assert len(rig.provider.asked) == strangers + 1
    else:
        assert "too-many-handshakes" in by_peer.values()
    assert rig.server.handshakes == 0 and rig.server.sessions == 0


async def test_descriptor_exhaustion_does_not_stop_the_server() -> None:
    rig = _Rig(handshake_timeout=1.0)
    held: list[socket.socket] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        limit = highest + 1 + 40
        assert hard == resource.RLIM_INFINITY or limit <= hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            # Idle connections, without yielding to the server, until this process has no
            # descriptor left: the kernel completes them into the listen backlog, so the
            # server's accept() gets EMFILE.
            for _ in range(limit):
                try:
                    s = socket.socket()
                except OSError as exc:
                    assert exc.errno == errno.EMFILE
                    break
                held.append(s)
                s.setblocking(False)
                assert s.connect_ex(rig.addr) in (0, errno.EINPROGRESS)
            else:
                pytest.fail("the descriptor limit was never reached")
            await _until(lambda: rig.reasons().count("descriptors-exhausted") >= 3)
            for s in held:
                s.close()
            await rig.roundtrip()  # still under the lowered limit
        finally:
            for s in held:
                s.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        tg.cancel_scope.cancel()
    assert set(rig.reasons()) == {"descriptors-exhausted"}
    assert all(peer == "" for _, peer in rig.refusals)


# -- limits ---------------------------------------------------------------------------------


async def test_handshake_limit_refuses_before_any_evidence() -> None:
    rig = _Rig(max_handshakes=2, handshake_timeout=5.0)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        idle = [socket.create_connection(rig.addr) for _ in range(2)]
        try:
            await _until(lambda: rig.server.handshakes == 2)
            t0 = anyio.current_time()
            with pytest.raises(errors.ChannelError):
                await rig.roundtrip()
            assert anyio.current_time() - t0 < 1.0, "a refused connection is closed at once"
            assert rig.provider.asked == []
            assert rig.reasons() == ["too-many-handshakes"]
        finally:
            for s in idle:
                s.close()
        await _until(lambda: rig.server.handshakes == 0)
        await rig.roundtrip()
        tg.cancel_scope.cancel()
    assert len(rig.provider.asked) == 1
    assert rig.reasons() == ["too-many-handshakes"]  # a peer that leaves is no refusal


async def test_session_limit_sends_an_error_frame() -> None:
    rig = _Rig(max_sessions=1)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        async with rig.session() as first:
            assert rig.server.sessions == 1
            with pytest.raises(errors.RemoteProtocolError, match="too-many-sessions"):
                await rig.roundtrip(SRC2)
            assert rig.reasons() == ["too-many-sessions"]
            await _migrate_on(first)  # the session holding the slot is unaffected
        await _until(lambda: rig.server.sessions == 0)
        await rig.roundtrip(SRC2)
        tg.cancel_scope.cancel()
    assert rig.reasons() == ["too-many-sessions"]


async def test_per_peer_session_limit() -> None:
    rig = _Rig(max_sessions_per_peer=1)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        async with rig.session() as first:
            with pytest.raises(errors.RemoteProtocolError, match="too-many-sessions-for-peer"):
                await rig.roundtrip(SRC)
            await rig.roundtrip(SRC2)  # another source key has its own allowance
            await _migrate_on(first)
        tg.cancel_scope.cancel()
    assert rig.reasons() == ["too-many-sessions-for-peer"]


async def test_idle_timeout_ends_a_quiet_session() -> None:
    handled: list[FakeDestination] = []

    async def handler(session: Session) -> None:
        handled.append(FakeDestination())
        await handled[-1](session)

    rig = _Rig(handler, idle_timeout=0.5)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        async with rig.session() as s:
            t0 = anyio.current_time()
            with anyio.fail_after(5):
                error = await s.receive()
            waited = anyio.current_time() - t0
        await _until(lambda: bool(handled) and handled[0].done.is_set())
        tg.cancel_scope.cancel()
    assert isinstance(error, Error) and error.code == "idle-timeout"
    assert 0.4 < waited < 3.0
    assert rig.reasons() == ["idle-timeout"]
    assert isinstance(handled[0].errors[0], errors.BrokenChannelError)
    assert rig.server.sessions == 0


async def test_idle_timeout_spares_a_slow_peer_and_a_long_local_step() -> None:
    """Gaps shorter than idle_timeout between the source's frames, and a local step
    (the restore) far longer than it while the source waits quietly for READY."""

    async def slow_restore(session: Session) -> None:
        while not isinstance(event := await session.receive(), IterationEnd):
            if isinstance(event, Change):
                await session.grant(len(event.data))
        await anyio.sleep(0.8)
        await session.send(Ready({}))
        commit = await session.receive()
        assert isinstance(commit, Commit)
        await session.send(CommitAck(commit.migration_id))

    rig = _Rig(slow_restore, idle_timeout=0.5, handshake_timeout=1.0)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        async with rig.session() as s:
            await _migrate_on(s, pause=0.2, changes=4)
        tg.cancel_scope.cancel()
    assert rig.refusals == []


async def test_lane_with_a_wrong_tag_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane naming a live session with a forged tag is dropped at once; its session
    gets ERROR lane-join-timeout when its lanes do not all join in time."""
    def forged(hs: Any, lane: int) -> bytes:
        preamble = lane_preamble(hs, lane)
        return preamble[:-1] + bytes([preamble[-1] ^ 1])

    monkeypatch.setattr("ctlive.transport.client.lane_preamble", forged)
    rig = _Rig(handshake_timeout=0.5)
    async with anyio.create_task_group() as tg:
        await rig.start(tg)
        async with open_session(rig.addr, identity=SRC, verifier=FakeVerifier(), lanes=2,
                                timeout=5) as s:
            with anyio.fail_after(5):
                error = await s.receive()
        tg.cancel_scope.cancel()
    assert isinstance(error, Error) and error.code == "lane-join-timeout"
    assert rig.reasons() == ["bad-lane-join", "lane-join-timeout"]
    assert rig.server.handshakes == 0 and rig.server.sessions == 0
