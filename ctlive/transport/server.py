"""The destination's side of the channel: accept connections, run the responder
handshake, join lanes to their session."""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from typing import Any

import anyio
import anyio.abc

from ctlive.errors import CtliveError, PeerNotAllowedError, RemoteProtocolError
from ctlive.identity import Identity
from ctlive.protocol.conversation import DEFAULT_WINDOW
from ctlive.protocol.evidence import EvidenceProvider
from ctlive.protocol.frames import Hello, Role
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

__all__ = ["SessionServer", "serve_sessions"]

_Slots = list[Link | None]


class SessionServer:
    """Accepts connections and turns them into attested sessions for ``handler``.

    A control connection runs the responder handshake and the HELLO exchange, then
    waits for its lanes; a lane connection joins the session its preamble names. One
    bad connection never stops the server.
    """

    def __init__(self, *, identity: Identity, provider: EvidenceProvider | None,
                 allow: Collection[bytes] | Callable[[bytes], bool],
                 handler: Callable[[Session], Any], window: int = DEFAULT_WINDOW,
                 handshake_timeout: float = 30.0) -> None:
        self.identity, self.provider, self.allow = identity, provider, allow
        self.handler, self.window = handler, window
        self.handshake_timeout = handshake_timeout
        self._joining: dict[bytes, tuple[Session, _Slots, anyio.Event]] = {}

    async def serve(self, listen: str | tuple[str, int], *,
                    task_status: anyio.abc.TaskStatus[tuple[str, int]]
                    = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``listen`` until cancelled; reports the bound ``(host, port)``
        through ``task_status`` (use with ``nursery.start``)."""
        host, port = parse_address(listen)
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        lsock = socket.socket(family, kind, proto)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(addr)
            lsock.listen(64)
            lsock.setblocking(False)
            bound = lsock.getsockname()[:2]
            task_status.started((bound[0], bound[1]))
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(lsock)
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        continue
                    tg.start_soon(self._connection, conn)
        finally:
            anyio.notify_closing(lsock)
            lsock.close()

    async def _connection(self, conn: socket.socket) -> None:
        sock = Socket(conn)
        try:
            with anyio.fail_after(self.handshake_timeout):
                first = bytes(await sock.read_some_exact(PREAMBLE_PREFIX))
            if first[:4] == CONTROL_MAGIC:
                await self._control(sock, first)
            elif first[:4] == LANE_MAGIC:
                await self._lane(sock, first)
        except (CtliveError, TimeoutError, OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass  # one bad connection never stops the server; the handler reports its own
        finally:
            sock.close()

    async def _control(self, sock: Socket, first: bytes) -> None:
        cipher = parse_control_preamble(first)
        resp = ResponderHandshake(self.identity, self.provider, self.allow, cipher=cipher)
        with anyio.fail_after(self.handshake_timeout):
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
                await self._hello(session, refused)
                await self._await_lanes(session, control)
                await self.handler(session)
            except Exception as exc:
                failure = exc
            finally:
                await session.aclose()
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _hello(self, session: Session, refused: PeerNotAllowedError | None) -> None:
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
        await session.send(Hello(capabilities={"window": self.window,
                                               "lanes": session.conversation.lanes}))

    async def _await_lanes(self, session: Session, control: Link) -> None:
        lanes = session.conversation.lanes
        if lanes == 1:
            return
        slots: _Slots = [control] + [None] * (lanes - 1)
        ready = anyio.Event()
        sid = session_id(session.handshake)
        self._joining[sid] = (session, slots, ready)
        try:
            with anyio.fail_after(self.handshake_timeout):
                await ready.wait()
        finally:
            self._joining.pop(sid, None)
        session.attach_lanes([s for s in slots if s is not None])

    async def _lane(self, sock: Socket, first: bytes) -> None:
        rest = await sock.read_some_exact(LANE_PREAMBLE_SIZE - PREAMBLE_PREFIX)
        sid, lane, tag = parse_lane_preamble(first + bytes(rest))
        entry = self._joining.get(sid)
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
    """Accept sessions forever, running ``await handler(session)`` for each (a
    :class:`SessionServer`). Reports the bound ``(host, port)`` through
    ``task_status``. A failing session never stops the server.
    """
    server = SessionServer(identity=identity, provider=provider, allow=allow,
                           handler=handler, window=window,
                           handshake_timeout=handshake_timeout)
    await server.serve(listen, task_status=task_status)
