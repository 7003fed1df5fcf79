"""The secure channel over TCP: attested handshake, records, lanes and flow control.

This is the I/O shell around the sans-I/O cores (``handshake``, ``records``,
``wire``). It runs unchanged under asyncio and trio (anyio), on non-blocking
sockets driven with ``anyio.wait_readable``/``wait_writable`` so that records are
read with ``recv_into`` straight into preallocated buffers.

Connection setup::

    control connection:  b"CTL1" cipher pattern | u16-framed handshake messages |
                         records (HELLO, then the migration's control frames)
    lane connection i:   b"CTLL" session-id lane-index join-tag | records (CHANGE)

Lane keys and the join tag are derived from the handshake's chaining key, so a
lane cannot be joined or read without the session. With ``lanes=1`` everything
travels on the control connection. AEAD work for large records runs in worker
threads (``cryptography`` and libsodium release the GIL), so lanes use both
cores.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import os
import select
import socket
import struct
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from typing import Any

import anyio
import anyio.abc
import attrs

from ctlive.errors import (
    BrokenChannelError,
    ClosedChannelError,
    ConnectError,
    ConnectTimeoutError,
    CtliveError,
    HandshakeError,
    LocalProtocolError,
    PeerNotAllowedError,
    RemoteProtocolError,
)
from ctlive.evidence import AttestationResult, EvidenceProvider, EvidenceVerifier
from ctlive.handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake
from ctlive.identity import Identity
from ctlive.noise import CipherState
from ctlive.records import HEADER, REC_CLOSE, REC_DATA, RecordReceiver, RecordSender
from ctlive.wire import (
    Change,
    Conversation,
    Credit,
    Error,
    Event,
    Hello,
    IterationBegin,
    IterationEnd,
    Role,
    decode_frame,
    encode_frame,
)

__all__ = [
    "MAX_CHANGE",
    "ChannelStatistics",
    "Session",
    "map_exceptions",
    "open_session",
    "serve_sessions",
]

_CONTROL_MAGIC = b"CTL1"
_LANE_MAGIC = b"CTLL"
_CIPHER_IDS = {"AESGCM": 1, "ChaChaPoly": 2}
_PATTERN_IDS = {"XX": 1, "IK": 2}
_THREAD_THRESHOLD = 64 * 1024
"""Records at least this large are sealed/opened in a worker thread."""
_IO_THREAD_THRESHOLD = int(os.environ.get("CTLIVE_IO_THREAD_THRESHOLD", str(1 << 62)))
"""Socket reads/writes at least this large run in a worker thread (off by default:
measured slower on 2 cores, where the event loop, AEAD threads and the kernel's copies
already compete)."""
DEFAULT_WINDOW = 64 << 20
"""Bytes of CHANGE payload a sender may have outstanding before the receiver grants more."""
_SOCK_BUF = 4 << 20
MAX_CHANGE = 1 << 20
"""Largest payload of one CHANGE frame."""


@contextlib.contextmanager
def map_exceptions(phase: str | None = None) -> Iterator[None]:
    """Translate OS and anyio errors at the I/O boundary into ctlive errors."""
    try:
        yield
    except CtliveError:
        raise
    except anyio.ClosedResourceError as exc:
        raise ClosedChannelError("the channel was closed locally", phase=phase,
                                 cause=exc) from exc
    except (anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError) as exc:
        raise BrokenChannelError(f"the connection broke: {exc}", phase=phase,
                                 cause=exc) from exc
    except OSError as exc:
        raise BrokenChannelError(f"network error: {exc}", phase=phase, cause=exc) from exc


class _Sock:
    """A non-blocking socket with exact reads (recv_into) and full writes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
        self.sock = sock
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0

    async def read_exact(self, buf: bytearray | memoryview) -> None:
        view = memoryview(buf)
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            if n == 0:
                raise anyio.EndOfStream
            got += n
        self.bytes_in += got

    async def read_some_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        if n >= _IO_THREAD_THRESHOLD:
            # A large body arrives in many socket-buffer-sized pieces; reading them in
            # a worker thread costs one event-loop hop per record instead of one per
            # piece.
            await anyio.to_thread.run_sync(self._blocking_io, buf, True)
            self.bytes_in += n
        else:
            await self.read_exact(buf)
        return buf

    def _blocking_io(self, buf: bytes | bytearray | memoryview, reading: bool) -> None:
        """Move all of ``buf`` in the calling (worker) thread, polling the non-blocking
        socket; gives up when the socket is closed locally."""
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN if reading else select.POLLOUT)
        while view:
            if self.closed:
                raise anyio.ClosedResourceError
            try:
                n = self.sock.recv_into(view) if reading else self.sock.send(view)
            except BlockingIOError:
                poller.poll(200)
                continue
            if n == 0 and reading:
                raise anyio.EndOfStream
            view = view[n:]

    async def write_all(self, *parts: bytes | bytearray | memoryview) -> None:
        if sum(len(p) for p in parts) >= _IO_THREAD_THRESHOLD:
            for part in parts:
                await anyio.to_thread.run_sync(self._blocking_io, part, False)
                self.bytes_out += len(part)
            return
        for part in parts:
            view = memoryview(part)
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)
                    continue
                view = view[n:]
                self.bytes_out += n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            anyio.notify_closing(self.sock)
            self.sock.close()


class _Link:
    """One connection's record streams (control or lane).

    Sending is pipelined: each record's sequence number is claimed in call order,
    encryption runs in a worker thread concurrently with other records, and the
    writes go out in sequence order. Receiving is pipelined the same way by
    :meth:`records`, which keeps up to ``depth`` decryptions in flight.
    """

    def __init__(self, sock: _Sock, send: CipherState, recv: CipherState) -> None:
        self.sock = sock
        self.tx = RecordSender(send)
        self.rx = RecordReceiver(recv)
        self._next_write = 0
        self._reserved = 0
        self._turn = anyio.Event()

    async def send(self, payload: bytes, kind: int = REC_DATA) -> None:
        ticket = self._reserved
        self._reserved += 1
        try:
            header, keys = self.tx.reserve(len(payload), kind)
            if len(payload) >= _THREAD_THRESHOLD:
                ct = await anyio.to_thread.run_sync(
                    RecordSender.encrypt_reserved, header, keys, payload)
            else:
                ct = RecordSender.encrypt_reserved(header, keys, payload)
            while self._next_write != ticket:
                await self._turn.wait()
            with map_exceptions():
                await self.sock.write_all(header, ct)
        finally:
            # Pass the turn on even on failure, so later writers do not hang (the
            # connection is unusable after a failed write anyway).
            if self._next_write == ticket:
                self._next_write += 1
                self._turn.set()
                self._turn = anyio.Event()

    async def send_close(self) -> None:
        if not self.tx.closed and not self.sock.closed:
            await self.send(b"", REC_CLOSE)
            self.tx.closed = True

    async def _read_one(self) -> tuple[bytes, int, CipherState, bytearray]:
        hdr = bytearray(HEADER.size)
        try:
            with map_exceptions():
                await self.sock.read_exact(hdr)
        except BrokenChannelError as exc:
            if isinstance(exc.cause, anyio.EndOfStream | ConnectionResetError):
                self.rx.eof()  # the stream ended without CLOSE: TruncatedStreamError
            raise
        length, keys = self.rx.accept(hdr)
        with map_exceptions():
            body = await self.sock.read_some_exact(length)
        return bytes(hdr), hdr[12], keys, body

    async def records(self, deliver: Callable[[bytes | None], Any], depth: int = 3) -> None:
        """Read records until CLOSE, calling ``await deliver(payload)`` in order
        (``None`` for the close). Decryption of large records overlaps reading."""
        send, recv = anyio.create_memory_object_stream[Any](depth)
        failure: list[BaseException] = []

        async def decrypt(header: bytes, keys: CipherState, body: bytearray,
                          result: dict[str, Any], done: anyio.Event) -> None:
            try:
                result["v"] = await anyio.to_thread.run_sync(
                    self.rx.decrypt_accepted, header, keys, body)
            except BaseException as exc:
                result["e"] = exc
            finally:
                done.set()

        async def reader(tg: anyio.abc.TaskGroup) -> None:
            async with send:
                try:
                    while True:
                        header, kind, keys, body = await self._read_one()
                        if len(body) >= _THREAD_THRESHOLD:
                            result: dict[str, Any] = {}
                            done = anyio.Event()
                            tg.start_soon(decrypt, header, keys, body, result, done)
                            await send.send((done, result))
                        else:
                            await send.send(self.rx.decrypt_accepted(header, keys, body))
                        if kind == REC_CLOSE:
                            return
                except (CtliveError, OSError) as exc:
                    failure.append(exc)

        # Errors are collected and re-raised after the task group, unwrapped.
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader, tg)
            try:
                async with recv:
                    async for item in recv:
                        if isinstance(item[0], anyio.Event):
                            await item[0].wait()
                            if "e" in item[1]:
                                raise item[1]["e"]
                            item = item[1]["v"]
                        kind, payload = item
                        await deliver(None if kind == REC_CLOSE else payload)
                        if kind == REC_CLOSE:
                            break
            except (CtliveError, OSError) as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()
        if failure:
            raise failure[0]

    async def receive(self) -> bytes | None:
        """The next record's payload, or None after the peer's authenticated close
        (unpipelined: used during setup)."""
        header, kind, keys, body = await self._read_one()
        if len(body) >= _THREAD_THRESHOLD:
            kind, payload = await anyio.to_thread.run_sync(
                self.rx.decrypt_accepted, header, keys, body)
        else:
            kind, payload = self.rx.decrypt_accepted(header, keys, body)
        return None if kind == REC_CLOSE else payload


@attrs.frozen
class LaneStatistics:
    """Per-connection figures."""

    bytes_sent: int
    bytes_received: int
    records_sent: int
    records_received: int


@attrs.frozen
class ChannelStatistics:
    """A frozen snapshot of a session's traffic."""

    bytes_sent: int
    bytes_received: int
    records_sent: int
    records_received: int
    lanes: tuple[LaneStatistics, ...]


def _lane_keys(hs: HandshakeResult, lane: int, initiator: bool) -> tuple[bytes, bytes]:
    i2r = hs.derive_key(b"ctlive lane %d initiator->responder" % lane)
    r2i = hs.derive_key(b"ctlive lane %d responder->initiator" % lane)
    return (i2r, r2i) if initiator else (r2i, i2r)


def _session_id(hs: HandshakeResult) -> bytes:
    return hs.derive_key(b"ctlive session id")[:16]


def _join_tag(hs: HandshakeResult, lane: int) -> bytes:
    return hs.derive_key(b"ctlive lane join %d" % lane)


class _Ordered:
    """Destination side: puts CHANGE frames from many lanes and control frames from
    the control connection into the logical order ITERATION_BEGIN, that iteration's
    changes (any lane, arrival order), ITERATION_END, checking each lane's
    sequence and its count against ITERATION_END."""

    def __init__(self, nlanes: int) -> None:
        self.control: collections.deque[Event] = collections.deque()
        self.lanes: list[collections.deque[Change]] = [collections.deque() for _ in range(nlanes)]
        self.current: int | None = None
        self.counts: tuple[int, ...] | None = None
        self.got = [0] * nlanes
        self.end: IterationEnd | None = None
        self._rr = 0

    def pop(self) -> Event | None:
        while True:
            if self.current is not None:
                n = len(self.lanes)
                for k in range(n):
                    i = (self._rr + k) % n
                    lane = self.lanes[i]
                    if lane and lane[0].iteration == self.current:
                        ch = attrs.evolve(lane.popleft(), lane=i)
                        if ch.seq != self.got[i]:
                            raise RemoteProtocolError(
                                f"lane {i} sent change {ch.seq}, expected {self.got[i]}")
                        if self.counts is not None and self.got[i] >= self.counts[i]:
                            raise RemoteProtocolError(f"lane {i} sent more changes than announced")
                        self.got[i] += 1
                        self._rr = i + 1
                        return ch
                    if lane and lane[0].iteration < self.current:
                        raise RemoteProtocolError(f"lane {i} sent a change of a past iteration")
                if self.counts is not None:
                    if self.got == list(self.counts):
                        end, self.end = self.end, None
                        self.current = self.counts = None
                        assert end is not None
                        return end
                    for i, lane in enumerate(self.lanes):
                        if lane and self.got[i] < self.counts[i]:
                            raise RemoteProtocolError(
                                f"lane {i} moved on before sending its announced changes")
                    return None
            if not self.control:
                return None
            ev = self.control.popleft()
            if isinstance(ev, IterationBegin):
                self.current, self.counts, self.got = ev.index, None, [0] * len(self.lanes)
                return ev
            if isinstance(ev, IterationEnd) and self.current == ev.index:
                if len(ev.lane_counts) != len(self.lanes):
                    raise RemoteProtocolError(
                        f"iteration end names {len(ev.lane_counts)} lanes, the session has "
                        f"{len(self.lanes)}")
                self.counts, self.end = ev.lane_counts, ev
                continue
            return ev


class Session:
    """An authenticated, attested migration session.

    Control frames go through :meth:`send` / :meth:`receive`, checked by the wire
    :class:`~ctlive.wire.Conversation`. The source sends CHANGE payloads with
    :meth:`send_change`, spread over the lanes and subject to the receiver's
    byte credit; the destination gets them from :meth:`receive` in logical order
    (between the iteration's BEGIN and END). Background tasks read every
    connection; a bad record on any of them fails the session.
    """

    def __init__(self, role: Role, hs: HandshakeResult, control: _Link, lanes: list[_Link],
                 window: int) -> None:
        self.role = role
        self.handshake = hs
        self.conversation = Conversation(role)
        self._control = control
        self._lanes = lanes
        self._credit = window
        self._credit_event = anyio.Event()
        self._granted_pending = 0
        self.window = window
        self._next_lane = 0
        self._counts: dict[int, list[int]] = {}
        self._closed = False
        self.closed_event = anyio.Event()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[
            tuple[int, Event | None] | BaseException](32)
        self._ordered = _Ordered(len(lanes))
        self._failed: BaseException | None = None

    @property
    def attestation(self) -> AttestationResult | None:
        """What the source's verifier established about the destination."""
        return self.handshake.attestation

    @property
    def remote_static(self) -> bytes:
        """The peer's static public key."""
        return self.handshake.remote_static

    @property
    def lane_count(self) -> int:
        """Number of lanes CHANGE frames are spread over."""
        return len(self._lanes)

    # -- background readers ---------------------------------------------------------------

    async def _pump(self, index: int, link: _Link) -> None:
        async def deliver(payload: bytes | None) -> None:
            if payload is None:
                await self._inbox_send.send((index, None))
                return
            event = decode_frame(payload)
            if isinstance(event, Credit) and self.role is Role.SOURCE:
                self.conversation.receive_event(event)
                self._credit += event.bytes
                self._credit_event.set()
                self._credit_event = anyio.Event()
                return
            await self._inbox_send.send((index, event))

        try:
            await link.records(deliver)
        except (CtliveError, OSError) as exc:
            if self._failed is None:
                self._failed = exc
            self._credit_event.set()  # wake a sender waiting for credit
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._inbox_send.send(exc)

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the control connection's reader."""
        self._tg = tg
        tg.start_soon(self._pump, 0, self._control)

    def attach_lanes(self, links: list[_Link]) -> None:
        """Destination: the joined lanes (index 0 is the control connection)."""
        self._lanes = links
        self._ordered = _Ordered(len(links))
        for i, link in enumerate(links):
            if link is not self._control:
                self._tg.start_soon(self._pump, i, link)

    # -- control ---------------------------------------------------------------------------

    async def send(self, event: Event) -> None:
        """Send one control frame (not CHANGE)."""
        if self._closed:
            raise ClosedChannelError("the session was closed")
        frame = self.conversation.send(event)
        await self._control.send(frame)

    async def receive(self) -> Event:
        """The next event from the peer: control frames, and on the destination the
        CHANGE frames of each iteration between its BEGIN and END."""
        while True:
            if self._failed is not None:
                raise self._failed
            ready = self._ordered.pop()
            if ready is not None:
                return self.conversation.receive_event(ready)
            item = await self._inbox.receive()
            if isinstance(item, BaseException):
                self._failed = self._failed or item
                continue
            index, event = item
            if event is None:
                self._failed = BrokenChannelError(
                    "the peer closed the session" if index == 0 else f"lane {index} closed")
                continue
            if isinstance(event, Change):
                # Lane 0 is the control connection: it carries changes too.
                if self.role is Role.SOURCE:
                    self._failed = RemoteProtocolError("CHANGE on a connection that carries none")
                    continue
                self._ordered.lanes[index].append(event)
            else:
                if index != 0:
                    self._failed = RemoteProtocolError(f"control frame on lane {index}")
                    continue
                self._ordered.control.append(event)

    # -- changes ---------------------------------------------------------------------------

    async def send_change(self, iteration: int, data: bytes, *, lane: int | None = None) -> None:
        """Send one CHANGE payload (at most MAX_CHANGE bytes) on the next lane, waiting
        for credit if needed. Several tasks may call this at once to keep lanes busy."""
        if len(data) > MAX_CHANGE:
            raise LocalProtocolError(f"a CHANGE carries at most {MAX_CHANGE} bytes")
        while self._credit < len(data) and self._credit < self.window:
            if self._failed is not None:
                raise self._failed
            await self._credit_event.wait()
        if self._failed is not None:
            raise self._failed
        self._credit -= len(data)
        if lane is None:
            lane = self._next_lane
            self._next_lane = (lane + 1) % len(self._lanes)
        elif not 0 <= lane < len(self._lanes):
            raise LocalProtocolError(f"no lane {lane}")
        counts = self._counts.setdefault(iteration, [0] * len(self._lanes))
        seq = counts[lane]
        counts[lane] += 1
        self.conversation.send(Change(iteration, seq, b""))  # state check only
        await self._lanes[lane].send(encode_frame(Change(iteration, seq, data)))

    def lane_counts(self, iteration: int) -> tuple[int, ...]:
        """How many CHANGE frames each lane carried in ``iteration``."""
        return tuple(self._counts.get(iteration, [0] * len(self._lanes)))

    async def grant(self, nbytes: int) -> None:
        """Destination: hand back ``nbytes`` of credit once applied (batched)."""
        self._granted_pending += nbytes
        if self._granted_pending >= self.window // 4:
            amount, self._granted_pending = self._granted_pending, 0
            await self.send(Credit(amount))

    async def send_error(self, code: str, message: str) -> None:
        """Tell the peer why we stop (best effort)."""
        with contextlib.suppress(CtliveError):
            await self._control.send(self.conversation.send(Error(code, message)))

    def statistics(self) -> ChannelStatistics:
        """Traffic so far, as a frozen value."""
        links = [self._control] + [ln for ln in self._lanes if ln is not self._control]
        lanes = tuple(LaneStatistics(ln.sock.bytes_out, ln.sock.bytes_in, ln.tx.records,
                                     ln.rx.records) for ln in links)
        return ChannelStatistics(
            bytes_sent=sum(x.bytes_sent for x in lanes),
            bytes_received=sum(x.bytes_received for x in lanes),
            records_sent=sum(x.records_sent for x in lanes),
            records_received=sum(x.records_received for x in lanes),
            lanes=lanes,
        )

    async def aclose(self) -> None:
        """Send authenticated CLOSE records and close every connection."""
        if self._closed:
            return
        self._closed = True
        self.closed_event.set()
        links = [self._control] + [ln for ln in self._lanes if ln is not self._control]
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            for ln in links:
                with contextlib.suppress(CtliveError):
                    await ln.send_close()
        for ln in links:
            ln.sock.close()
        self._inbox_send.close()


def _parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    text = address.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def _connect_sock(host: str, port: int) -> _Sock:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err)}")
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err)}")
            return _Sock(sock)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise ConnectError(f"cannot connect to {host}:{port}: {last}", cause=last)


async def _write_hs(sock: _Sock, msg: bytes) -> None:
    await sock.write_all(struct.pack(">H", len(msg)), msg)


async def _read_hs(sock: _Sock) -> bytes:
    n = struct.unpack(">H", await sock.read_some_exact(2))[0]
    return bytes(await sock.read_some_exact(n))


@contextlib.asynccontextmanager
async def open_session(
    address: str | tuple[str, int],
    *,
    identity: Identity,
    verifier: EvidenceVerifier | None,
    lanes: int = 1,
    cipher: str = "AESGCM",
    timeout: float = 30.0,
    hello: dict[str, Any] | None = None,
) -> AsyncIterator[Session]:
    """Connect, run the attested handshake, exchange HELLO and open the lanes.

    The verifier runs before anything but the handshake is sent: if it refuses,
    :class:`~ctlive.errors.AttestationError` is raised and the connection is closed
    with no further byte written.
    """
    if not 1 <= lanes <= 16:
        raise ConnectError("lanes must be between 1 and 16")
    host, port = _parse_address(address)
    socks: list[_Sock] = []
    session: Session | None = None
    failure: Exception | None = None
    try:
        # Errors are re-raised outside the task group so callers see the ctlive
        # exception itself, not an ExceptionGroup around it.
        async with anyio.create_task_group() as tg:
            try:
                try:
                    with anyio.fail_after(timeout), map_exceptions("connect"):
                        session = await _client_setup(tg, socks, host, port, identity, verifier,
                                                      lanes, cipher, hello)
                except TimeoutError as exc:
                    raise ConnectTimeoutError(
                        f"connecting to {host}:{port} timed out after {timeout}s",
                        phase="connect", cause=exc) from exc
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


async def _client_setup(tg: anyio.abc.TaskGroup, socks: list[_Sock], host: str, port: int,
                        identity: Identity, verifier: EvidenceVerifier | None, lanes: int,
                        cipher: str, hello: dict[str, Any] | None) -> Session:
    sock = await _connect_sock(host, port)
    socks.append(sock)
    init = InitiatorHandshake(identity, verifier, cipher=cipher)
    await sock.write_all(_CONTROL_MAGIC + bytes([_CIPHER_IDS[cipher], _PATTERN_IDS["XX"]]))
    await _write_hs(sock, init.start())
    try:
        msg2 = await _read_hs(sock)
    except (BrokenChannelError, anyio.EndOfStream, OSError) as exc:
        raise HandshakeError("the destination closed during the handshake", cause=exc) from exc
    msg3 = init.receive(msg2)  # the verifier runs here; a refusal ends everything
    assert msg3 is not None
    await _write_hs(sock, msg3)
    hs = init.result()
    control = _Link(sock, hs.send, hs.recv)
    links = [control]
    session = Session(Role.SOURCE, hs, control, links, DEFAULT_WINDOW)
    session.start(tg)
    await session.send(Hello(capabilities={"lanes": lanes, "cipher": cipher, **(hello or {})}))
    reply = await session.receive()
    if isinstance(reply, Error):
        if reply.code == "peer-not-allowed":
            raise PeerNotAllowedError(f"the destination refused us: {reply.message}")
        raise RemoteProtocolError(f"destination error {reply.code}: {reply.message}")
    assert isinstance(reply, Hello)
    session.window = session._credit = int(reply.capabilities.get("window", DEFAULT_WINDOW))
    sid = _session_id(hs)
    for lane in range(1, lanes):
        ls = await _connect_sock(host, port)
        socks.append(ls)
        await ls.write_all(_LANE_MAGIC + sid + bytes([lane]) + _join_tag(hs, lane))
        send_k, recv_k = _lane_keys(hs, lane, True)
        links.append(_Link(ls, CipherState(cipher, send_k), CipherState(cipher, recv_k)))
    return session


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
    host, port = _parse_address(listen)
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, addr = infos[0]
    lsock = socket.socket(family, kind, proto)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(addr)
    lsock.listen(64)
    lsock.setblocking(False)
    pending: dict[bytes, tuple[Session, list[_Link | None], anyio.Event]] = {}
    bound = lsock.getsockname()[:2]
    task_status.started((bound[0], bound[1]))

    async def handle_control(sock: _Sock, first: bytes) -> None:
        ids = {v: k for k, v in _CIPHER_IDS.items()}
        if first[4] not in ids or first[5] != _PATTERN_IDS["XX"]:
            raise HandshakeError("unsupported cipher or pattern requested")
        cipher = ids[first[4]]
        resp = ResponderHandshake(identity, provider, allow, cipher=cipher)
        with anyio.fail_after(handshake_timeout):
            msg2 = resp.receive(await _read_hs(sock))
            await _write_hs(sock, msg2)
            msg3 = await _read_hs(sock)
        refused: PeerNotAllowedError | None = None
        try:
            hs = resp.receive_final(msg3)
        except PeerNotAllowedError as exc:
            refused, hs = exc, resp.result()
        control = _Link(sock, hs.send, hs.recv)
        session = Session(Role.DESTINATION, hs, control, [control], window)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            session.start(tg)
            try:
                hello = await session.receive()
                if not isinstance(hello, Hello):
                    raise RemoteProtocolError("the source did not start with HELLO")
                if refused is not None:
                    await session.send_error("peer-not-allowed", str(refused))
                    raise refused
                lanes = hello.capabilities.get("lanes", 1)
                if not isinstance(lanes, int) or not 1 <= lanes <= 16:
                    await session.send_error("bad-hello", "lanes must be 1..16")
                    raise RemoteProtocolError(f"bad lane count {lanes!r}")
                await session.send(Hello(capabilities={"window": window, "lanes": lanes}))
                if lanes > 1:
                    slots: list[_Link | None] = [control] + [None] * (lanes - 1)
                    ready = anyio.Event()
                    sid = _session_id(hs)
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

    async def handle_lane(sock: _Sock, first: bytes) -> None:
        rest = await sock.read_some_exact(16 + 1 + 32 - 2)
        data = first[4:] + rest
        sid, lane, tag = bytes(data[:16]), data[16], bytes(data[17:49])
        entry = pending.get(sid)
        if entry is None:
            raise RemoteProtocolError("lane for an unknown session")
        session, slots, ready = entry
        hs = session.handshake
        if not 1 <= lane < len(slots) or slots[lane] is not None or not hmac.compare_digest(
                tag, _join_tag(hs, lane)):
            raise RemoteProtocolError("invalid lane join")
        send_k, recv_k = _lane_keys(hs, lane, False)
        slots[lane] = _Link(sock, CipherState(hs.cipher, send_k), CipherState(hs.cipher, recv_k))
        if all(s is not None for s in slots):
            ready.set()
        # The session owns the lane now; this task only keeps it open until the end.
        await session.closed_event.wait()

    async def handle(conn: socket.socket) -> None:
        sock = _Sock(conn)
        try:
            with anyio.fail_after(handshake_timeout):
                first = await sock.read_some_exact(6)
            if first[:4] == _CONTROL_MAGIC:
                await handle_control(sock, bytes(first))
            elif first[:4] == _LANE_MAGIC:
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

