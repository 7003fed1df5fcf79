"""Non-blocking sockets with exact reads into preallocated buffers, connecting, and the
mapping of OS and anyio errors to ctlive errors at the I/O boundary."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Iterator

import anyio
import anyio.abc

from ctlive.errors import (
    BrokenChannelError,
    ClosedChannelError,
    ConnectError,
    CtliveError,
    Phase,
)

__all__ = [
    "Socket",
    "connect",
    "map_exceptions",
    "parse_address",
    "read_handshake_message",
    "write_handshake_message",
]

_IO_THREAD_THRESHOLD = int(os.environ.get("CTLIVE_IO_THREAD_THRESHOLD", str(1 << 62)))
"""Socket reads/writes at least this large run in a worker thread (off by default:
measured slower on 2 cores, where the event loop, AEAD threads and the kernel's copies
already compete)."""


_SOCK_BUF = 4 << 20


@contextlib.contextmanager
def map_exceptions(phase: Phase | None = None) -> Iterator[None]:
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


class Socket:
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


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    text = address.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def connect(host: str, port: int) -> Socket:
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
            return Socket(sock)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise ConnectError(f"cannot connect to {host}:{port}: {last}", cause=last)


async def write_handshake_message(sock: Socket, msg: bytes) -> None:
    await sock.write_all(struct.pack(">H", len(msg)), msg)


async def read_handshake_message(sock: Socket) -> bytes:
    n = struct.unpack(">H", await sock.read_some_exact(2))[0]
    return bytes(await sock.read_some_exact(n))
