"""The destination's side of the channel: accept connections, run the responder
handshake, join lanes to their session, and hold against hostile or buggy peers.

Limits (keyword arguments of :class:`SessionServer` and :func:`serve_sessions`):

``max_handshakes`` (32)
    Connections not yet authenticated, at once. A connection is counted from
    ``accept()`` until it has a session (control) or has joined one (lane); one beyond
    the limit is closed at once, before a byte is read, so before any attestation
    report is produced.
``handshake_timeout`` (10 s)
    One deadline from ``accept()`` for everything before authentication: the
    preamble, each handshake message (read or written), the source's HELLO, a lane's
    preamble. Also how long a new session waits for its lanes to join.
``max_sessions`` (16)
    Authenticated sessions at once (lanes not counted); one more gets an
    authenticated ``ERROR too-many-sessions`` and is closed.
``max_sessions_per_peer`` (None: no cap)
    Sessions at once per source key (``ERROR too-many-sessions-for-peer``).
``idle_timeout`` (600 s; None: none)
    The longest the handler's :meth:`Session.receive` waits for the source's next
    frame (:attr:`Session.idle_timeout`); the session then gets ``ERROR
    idle-timeout`` and fails. It never runs during the receiver's own work (a restore):
    a source is quiet while it dumps its next iteration, hence the generous default.

Every refusal is reported through ``on_refusal(reason, peer)`` (``peer`` is
``"host:port"``, or ``""`` when there is none), after the connection is closed:

``too-many-handshakes``, ``handshake-timeout``, ``bad-preamble``, ``bad-handshake``
(a malformed handshake message), ``evidence-failed`` (the provider raised),
``bad-hello``, ``peer-not-allowed``, ``too-many-sessions``,
``too-many-sessions-for-peer``, ``lane-join-timeout``, ``bad-lane-join`` (malformed
lane preamble, unknown session, wrong tag or lane), ``idle-timeout``,
``descriptors-exhausted`` (EMFILE, ENFILE, ENOBUFS or ENOMEM on ``accept()``: the
server backs off for 0.1 s and keeps serving), ``accept-failed`` (another error of
one pending connection) and ``internal-error`` (an unexpected exception in one
connection, including the handler's; it never stops the server).

A peer that merely disconnects, and a handler's ctlive error, are not refusals.
``on_refusal`` runs in the event loop, so it must not block; what it raises is
ignored. :attr:`SessionServer.handshakes` and :attr:`SessionServer.sessions` say how
many of each there are now. Not limited: the rate of new handshakes (each costs one
attestation report), only how many run at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import socket
from collections.abc import Callable, Collection
from typing import Any

import anyio
import anyio.abc

from ctlive.errors import (
    AttestationError,
    ConfigError,
    CtliveError,
    HandshakeError,
    PeerNotAllowedError,
    RemoteProtocolError,
)
from ctlive.identity import Identity
from ctlive.protocol.conversation import DEFAULT_WINDOW, State
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

_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() errors that mean "no resources now": back off, keep serving."""
_LISTENER_BROKEN = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EFAULT})
"""accept() errors that mean the listening socket itself is unusable."""
_ACCEPT_BACKOFF = 0.1
_TELL_TIMEOUT = 2.0
"""Bound on sending a refusal's ERROR to a peer that does not read."""
_BACKLOG = 512


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Pending:
    """One connection before authentication: its handshake slot and its deadline."""

    def __init__(self, server: SessionServer, peer: str) -> None:
        self.server, self.peer, self.held = server, peer, True
        self.scope = anyio.CancelScope(deadline=anyio.current_time()
                                       + server.handshake_timeout)
        self.timeout_reason = ("handshake-timeout", "the handshake took too long")

    def release(self) -> None:
        """Give the handshake slot back (once)."""
        if self.held:
            self.held = False
            self.server._handshakes -= 1

    def authenticated(self) -> None:
        """Leave the handshake pool and lift the deadline."""
        self.release()
        self.scope.deadline = math.inf


def _peer_name(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SessionServer:
    """Accepts connections and turns them into attested sessions for ``handler``.

    A control connection runs the responder handshake and the HELLO exchange, then
    waits for its lanes; a lane connection joins the session its preamble names. The
    limits, timeouts and refusal reasons are described in this module's docstring.
    One bad connection never stops the server, and neither does running out of file
    descriptors.
    """

    def __init__(self, *, identity: Identity, provider: EvidenceProvider | None,
                 allow: Collection[bytes] | Callable[[bytes], bool],
                 handler: Callable[[Session], Any], window: int = DEFAULT_WINDOW,
                 handshake_timeout: float = 10.0, idle_timeout: float | None = 600.0,
                 max_sessions: int = 16, max_handshakes: int = 32,
                 max_sessions_per_peer: int | None = None,
                 on_refusal: Callable[[str, str], Any] | None = None) -> None:
        if handshake_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ConfigError("timeouts must be positive")
        per_peer = max_sessions_per_peer
        if min(max_sessions, max_handshakes, 1 if per_peer is None else per_peer) < 1:
            raise ConfigError("session and handshake limits must be at least 1")
        self.identity, self.provider, self.allow = identity, provider, allow
        self.handler, self.window = handler, window
        self.handshake_timeout, self.idle_timeout = handshake_timeout, idle_timeout
        self.max_sessions, self.max_handshakes = max_sessions, max_handshakes
        self.max_sessions_per_peer = max_sessions_per_peer
        self.on_refusal = on_refusal
        self._joining: dict[bytes, tuple[Session, _Slots, anyio.Event]] = {}
        self._handshakes = 0
        self._sessions: dict[bytes, int] = {}

    @property
    def handshakes(self) -> int:
        """Connections accepted and not yet authenticated, now."""
        return self._handshakes

    @property
    def sessions(self) -> int:
        """Authenticated sessions, now."""
        return sum(self._sessions.values())

    def _refuse(self, reason: str, peer: str) -> None:
        if self.on_refusal is not None:
            with contextlib.suppress(Exception):  # a callback must not stop the server
                self.on_refusal(reason, peer)

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
            try:
                lsock.bind(addr)
                lsock.listen(_BACKLOG)
            except OSError as exc:  # the port in use, an address not of this host
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                  cause=exc) from exc
            lsock.setblocking(False)
            bound = lsock.getsockname()[:2]
            task_status.started((bound[0], bound[1]))
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(lsock)
                    try:
                        conn, peer_addr = lsock.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        await self._accept_failed(exc)
                        continue
                    peer = _peer_name(peer_addr)
                    if self._handshakes >= self.max_handshakes:
                        conn.close()
                        self._refuse("too-many-handshakes", peer)
                        continue
                    self._handshakes += 1
                    tg.start_soon(self._connection, conn, _Pending(self, peer))
        finally:
            anyio.notify_closing(lsock)
            lsock.close()

    async def _accept_failed(self, exc: OSError) -> None:
        if exc.errno in _LISTENER_BROKEN:
            raise exc
        if exc.errno in _EXHAUSTED:
            # The pending connections wait in the backlog until descriptors free up.
            self._refuse("descriptors-exhausted", "")
            await anyio.sleep(_ACCEPT_BACKOFF)
        else:
            self._refuse("accept-failed", "")  # ECONNABORTED and the like: that one only

    async def _connection(self, conn: socket.socket, pending: _Pending) -> None:
        reason: str | None = None
        sock: Socket | None = None
        try:
            with pending.scope:
                sock = Socket(conn)
                first = bytes(await sock.read_some_exact(PREAMBLE_PREFIX))
                if first[:4] == CONTROL_MAGIC:
                    await self._control(sock, first, pending)
                elif first[:4] == LANE_MAGIC:
                    await self._lane(sock, first, pending)
                else:
                    reason = "bad-preamble"
            if pending.scope.cancelled_caught:
                reason = pending.timeout_reason[0]
        except _Refused as exc:
            reason = exc.reason
        except (CtliveError, OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass  # the peer went away, or the handler failed and reports its own
        except Exception:
            reason = "internal-error"  # a bug in one connection never stops the server
        finally:
            pending.release()
            if sock is not None:
                sock.close()
            else:
                conn.close()
        if reason is not None:
            self._refuse(reason, pending.peer)

    async def _control(self, sock: Socket, first: bytes, pending: _Pending) -> None:
        try:
            cipher = parse_control_preamble(first)
        except HandshakeError as exc:
            raise _Refused("bad-preamble") from exc
        resp = ResponderHandshake(self.identity, self.provider, self.allow, cipher=cipher)
        refused: PeerNotAllowedError | None = None
        try:
            msg2 = resp.receive(await read_handshake_message(sock))  # the evidence
            await write_handshake_message(sock, msg2)
            msg3 = await read_handshake_message(sock)
            try:
                hs = resp.receive_final(msg3)
            except PeerNotAllowedError as exc:
                refused, hs = exc, resp.result()
        except AttestationError as exc:
            raise _Refused("evidence-failed") from exc
        except (HandshakeError, ValueError, RecursionError) as exc:
            # RecursionError: message 1's payload is clear JSON, nested as deep as it likes
            raise _Refused("bad-handshake") from exc
        control = Link(sock, hs.send, hs.recv)
        session = Session(Role.DESTINATION, hs, control, [control])
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            session.start(tg)
            try:
                await self._hello(session, refused, pending)
                await self._run(session, control, pending)
            except Exception as exc:
                failure = exc
            finally:
                if pending.held and pending.scope.cancel_called:
                    await self._tell(session, *pending.timeout_reason)
                await session.aclose()
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _tell(self, session: Session, code: str, message: str) -> None:
        """Send an authenticated ERROR (unless one went either way already), bounded in
        time, even while cancelled."""
        if session.conversation.state is State.FAILED:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_TELL_TIMEOUT):
            await session.send_error(code, message)

    async def _hello(self, session: Session, refused: PeerNotAllowedError | None,
                     pending: _Pending) -> None:
        if refused is not None:
            # Read its HELLO first, so that closing does not meet unread data (a reset
            # that could destroy our ERROR before the source reads it).
            pending.timeout_reason = ("peer-not-allowed", str(refused))
            with contextlib.suppress(CtliveError):
                await session.receive()
            await self._tell(session, "peer-not-allowed", str(refused))
            raise _Refused("peer-not-allowed")
        try:
            hello = await session.receive()  # the conversation checks its lanes
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("the source did not start with HELLO")
        except RemoteProtocolError as exc:
            await self._tell(session, "bad-hello", str(exc))
            raise _Refused("bad-hello") from exc

    def _admit(self, key: bytes) -> tuple[str, str] | None:
        """Take a session slot for source ``key``, or say why not."""
        if self.sessions >= self.max_sessions:
            return "too-many-sessions", (f"the receiver already runs its maximum of "
                                         f"{self.max_sessions} sessions")
        per_peer = self.max_sessions_per_peer
        if per_peer is not None and self._sessions.get(key, 0) >= per_peer:
            return "too-many-sessions-for-peer", (f"this source already runs its maximum of "
                                                  f"{per_peer} sessions")
        self._sessions[key] = self._sessions.get(key, 0) + 1
        return None

    async def _run(self, session: Session, control: Link, pending: _Pending) -> None:
        key = session.remote_static
        refusal = self._admit(key)
        if refusal is not None:
            await self._tell(session, *refusal)
            raise _Refused(refusal[0])
        pending.authenticated()
        try:
            await session.send(Hello(capabilities={"window": self.window,
                                                   "lanes": session.conversation.lanes}))
            await self._await_lanes(session, control)
            session.idle_timeout = self.idle_timeout
            session.on_idle = functools.partial(self._idle, session, pending.peer)
            await self.handler(session)
        finally:
            self._sessions[key] -= 1
            if not self._sessions[key]:
                del self._sessions[key]

    async def _idle(self, session: Session, peer: str) -> None:
        await self._tell(session, "idle-timeout",
                         f"nothing received for {self.idle_timeout:g} s")
        self._refuse("idle-timeout", peer)

    async def _await_lanes(self, session: Session, control: Link) -> None:
        lanes = session.conversation.lanes
        if lanes == 1:
            return
        slots: _Slots = [control] + [None] * (lanes - 1)
        ready = anyio.Event()
        sid = session_id(session.handshake)
        self._joining[sid] = (session, slots, ready)
        try:
            with anyio.move_on_after(self.handshake_timeout):
                await ready.wait()
        finally:
            self._joining.pop(sid, None)
        if not ready.is_set():
            await self._tell(session, "lane-join-timeout",
                             f"the lanes did not join within {self.handshake_timeout:g} s")
            raise _Refused("lane-join-timeout")
        session.attach_lanes([s for s in slots if s is not None])

    async def _lane(self, sock: Socket, first: bytes, pending: _Pending) -> None:
        rest = await sock.read_some_exact(LANE_PREAMBLE_SIZE - PREAMBLE_PREFIX)
        try:
            sid, lane, tag = parse_lane_preamble(first + bytes(rest))
            entry = self._joining.get(sid)
            if entry is None:
                raise RemoteProtocolError("lane for an unknown session")
            session, slots, ready = entry
            check_join(session.handshake, lane, tag, len(slots),
                       {i for i, s in enumerate(slots) if s is not None})
        except RemoteProtocolError as exc:
            raise _Refused("bad-lane-join") from exc
        pending.authenticated()
        hs = session.handshake
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
    handshake_timeout: float = 10.0,
    idle_timeout: float | None = 600.0,
    max_sessions: int = 16,
    max_handshakes: int = 32,
    max_sessions_per_peer: int | None = None,
    on_refusal: Callable[[str, str], Any] | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sessions forever, running ``await handler(session)`` for each (a
    :class:`SessionServer` with these arguments; the limits are described in this
    module's docstring). Reports the bound ``(host, port)`` through ``task_status``.
    A failing session never stops the server.
    """
    server = SessionServer(
        identity=identity, provider=provider, allow=allow, handler=handler, window=window,
        handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
        max_sessions=max_sessions, max_handshakes=max_handshakes,
        max_sessions_per_peer=max_sessions_per_peer, on_refusal=on_refusal)
    await server.serve(listen, task_status=task_status)
