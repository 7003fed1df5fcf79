"""The source's side of the channel: connect, run the attested handshake, open lanes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from ctlive.errors import (
    BrokenChannelError,
    ConnectError,
    ConnectTimeoutError,
    HandshakeError,
    PeerNotAllowedError,
    Phase,
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.protocol.conversation import MAX_LANES
from ctlive.protocol.evidence import EvidenceVerifier
from ctlive.protocol.frames import (
    Error,
    Hello,
    Role,
)
from ctlive.protocol.handshake import Cipher, InitiatorHandshake
from ctlive.protocol.lanes import control_preamble, lane_keys, lane_preamble
from ctlive.protocol.noise import CipherState
from ctlive.transport.link import Link
from ctlive.transport.session import Session
from ctlive.transport.socket import (
    Socket,
    connect,
    map_exceptions,
    parse_address,
    read_handshake_message,
    write_handshake_message,
)

__all__ = [
    "open_session",
]


@contextlib.asynccontextmanager
async def open_session(
    address: str | tuple[str, int],
    *,
    identity: Identity,
    verifier: EvidenceVerifier | None,
    lanes: int = 1,
    cipher: Cipher = "AESGCM",
    timeout: float = 30.0,
    hello: dict[str, Any] | None = None,
) -> AsyncIterator[Session]:
    """Connect, run the attested handshake, exchange HELLO and open the lanes.

    The verifier runs before anything but the handshake is sent: if it refuses,
    :class:`~ctlive.errors.AttestationError` is raised and the connection is closed
    with no further byte written.
    """
    if not 1 <= lanes <= MAX_LANES:
        raise ConnectError(f"lanes must be between 1 and {MAX_LANES}")
    host, port = parse_address(address)
    socks: list[Socket] = []
    session: Session | None = None
    failure: Exception | None = None
    try:
        # Errors are re-raised outside the task group so callers see the ctlive
        # exception itself, not an ExceptionGroup around it.
        async with anyio.create_task_group() as tg:
            try:
                try:
                    with anyio.fail_after(timeout), map_exceptions(Phase.CONNECT):
                        session = await _client_setup(tg, socks, host, port, identity, verifier,
                                                      lanes, cipher, hello)
                except TimeoutError as exc:
                    raise ConnectTimeoutError(
                        f"connecting to {host}:{port} timed out after {timeout}s",
                        phase=Phase.CONNECT, cause=exc) from exc
                yield session
            except Exception as exc:
                failure = exc
            finally:
                if session is not None:
                    await session.aclose()
                tg.cancel_scope.cancel()
    finally:
        for s in socks:
            s.close()
    if failure is not None:
        raise failure


async def _client_setup(tg: anyio.abc.TaskGroup, socks: list[Socket], host: str, port: int,
                        identity: Identity, verifier: EvidenceVerifier | None, lanes: int,
                        cipher: Cipher, hello: dict[str, Any] | None) -> Session:
    sock = await connect(host, port)
    socks.append(sock)
    init = InitiatorHandshake(identity, verifier, cipher=cipher)
    await sock.write_all(control_preamble(cipher))
    await write_handshake_message(sock, init.start())
    try:
        msg2 = await read_handshake_message(sock)
    except (BrokenChannelError, anyio.EndOfStream, OSError) as exc:
        raise HandshakeError("the destination closed during the handshake", cause=exc) from exc
    msg3 = init.receive(msg2)  # the verifier runs here; a refusal ends everything
    assert msg3 is not None
    await write_handshake_message(sock, msg3)
    hs = init.result()
    control = Link(sock, hs.send, hs.recv)
    links = [control]
    session = Session(Role.SOURCE, hs, control, links)
    session.start(tg)
    await session.send(Hello(capabilities={"lanes": lanes, "cipher": cipher, **(hello or {})}))
    reply = await session.receive()
    if isinstance(reply, Error):
        if reply.code == "peer-not-allowed":
            raise PeerNotAllowedError(f"the destination refused us: {reply.message}")
        raise RemoteProtocolError(f"destination error {reply.code}: {reply.message}")
    assert isinstance(reply, Hello)  # its window is the conversation's credit now
    for lane in range(1, lanes):
        ls = await connect(host, port)
        socks.append(ls)
        await ls.write_all(lane_preamble(hs, lane))
        send_k, recv_k = lane_keys(hs, lane, True)
        links.append(Link(ls, CipherState(cipher, send_k), CipherState(cipher, recv_k)))
    return session
