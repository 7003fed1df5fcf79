"""The destination's side of the channel: accept connections, run the responder
handshake, join lanes to their session."""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from typing import Any

import anyio
import anyio.abc

from ctlive.errors import (
    CtliveError,
    PeerNotAllowedError,
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.protocol.conversation import DEFAULT_WINDOW
from ctlive.protocol.evidence import EvidenceProvider
from ctlive.protocol.frames import (
    Hello,
    Role,
)
from ctlive.protocol.handshake import ResponderHandshake
from ctlive.protocol.lanes import (
    CONTROL_MAGIC,
    LANE_MAGIC,
    LANE_PREAMBLE_SIZE,
    PREAMBLE_PREFIX,
    check_join,
    lane_keys,
    parse_control_preamble,
    parse_lane_preamble,
    session_id,
)
from ctlive.protocol.noise import CipherState
from ctlive.transport.link import Link
from ctlive.transport.session import Session
from ctlive.transport.socket import (
    Socket,
    parse_address,
    read_handshake_message,
    write_handshake_message,
)

__all__ = [
    "serve_sessions",
]


async def serve_sessions(
    listen: str | tuple[str, int],
    *,
    identity: Identity,
    provider: EvidenceProvider | None,
    allow: Collection[bytes] | Callable[[bytes], bool],
    handler: Callable[[Session], Any],
    window: int = DEFAULT_WINDOW,
    handshake_timeout: float = 30.0,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sessions forever, running ``await handler(session)`` for each.

    Reports the bound ``(host, port)`` through ``task_status`` (use with
    ``nursery.start``). A failing session never stops the server.
    """
    host, port = parse_address(listen)
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, addr = infos[0]
    lsock = socket.socket(family, kind, proto)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(addr)
    lsock.listen(64)
    lsock.setblocking(False)
    pending: dict[bytes, tuple[Session, list[Link | None], anyio.Event]] = {}
    bound = lsock.getsockname()[:2]
    task_status.started((bound[0], bound[1]))

    async def handle_control(sock: Socket, first: bytes) -> None:
        cipher = parse_control_preamble(first)
        resp = ResponderHandshake(identity, provider, allow, cipher=cipher)
        with anyio.fail_after(handshake_timeout):
            msg2 = resp.receive(await read_handshake_message(sock))
            await write_handshake_message(sock, msg2)
            msg3 = await read_handshake_message(sock)
        refused: PeerNotAllowedError | None = None
        try:
            hs = resp.receive_final(msg3)
        except PeerNotAllowedError as exc:
            refused, hs = exc, resp.result()
        control = Link(sock, hs.send, hs.recv)
        session = Session(Role.DESTINATION, hs, control, [control])
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            session.start(tg)
            try:
                try:
                    hello = await session.receive()  # the conversation checks its lanes
                except RemoteProtocolError as exc:
                    await session.send_error("bad-hello", str(exc))
                    raise
                if not isinstance(hello, Hello):
                    raise RemoteProtocolError("the source did not start with HELLO")
                if refused is not None:
                    await session.send_error("peer-not-allowed", str(refused))
                    raise refused
                lanes = session.conversation.lanes
                await session.send(Hello(capabilities={"window": window, "lanes": lanes}))
                if lanes > 1:
                    slots: list[Link | None] = [control] + [None] * (lanes - 1)
                    ready = anyio.Event()
                    sid = session_id(hs)
                    pending[sid] = (session, slots, ready)
                    try:
                        with anyio.fail_after(handshake_timeout):
                            await ready.wait()
                    finally:
                        pending.pop(sid, None)
                    session.attach_lanes([s for s in slots if s is not None])
                await handler(session)
            except Exception as exc:
                failure = exc
            finally:
                await session.aclose()
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def handle_lane(sock: Socket, first: bytes) -> None:
        rest = await sock.read_some_exact(LANE_PREAMBLE_SIZE - PREAMBLE_PREFIX)
        sid, lane, tag = parse_lane_preamble(first + bytes(rest))
        entry = pending.get(sid)
        if entry is None:
            raise RemoteProtocolError("lane for an unknown session")
        session, slots, ready = entry
        hs = session.handshake
        check_join(hs, lane, tag, len(slots), {i for i, s in enumerate(slots) if s is not None})
        send_k, recv_k = lane_keys(hs, lane, False)
        slots[lane] = Link(sock, CipherState(hs.cipher, send_k), CipherState(hs.cipher, recv_k))
        if all(s is not None for s in slots):
            ready.set()
        # The session owns the lane now; this task only keeps it open until the end.
        await session.closed_event.wait()

    async def handle(conn: socket.socket) -> None:
        sock = Socket(conn)
        try:
            with anyio.fail_after(handshake_timeout):
                first = await sock.read_some_exact(PREAMBLE_PREFIX)
            if first[:4] == CONTROL_MAGIC:
                await handle_control(sock, bytes(first))
            elif first[:4] == LANE_MAGIC:
                await handle_lane(sock, bytes(first))
        except (CtliveError, TimeoutError, OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass  # one bad connection never stops the server; the handler reports its own
        finally:
            sock.close()

    try:
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(lsock)
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    continue
                tg.start_soon(handle, conn)
    finally:
        anyio.notify_closing(lsock)
        lsock.close()
