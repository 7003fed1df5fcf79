"""One connection's encrypted record streams, pipelined in both directions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ctlive.errors import (
    BrokenChannelError,
    CtliveError,
)
from ctlive.protocol.noise import CipherState
from ctlive.protocol.records import HEADER, REC_CLOSE, REC_DATA, RecordReceiver, RecordSender
from ctlive.transport.socket import Socket, map_exceptions

__all__ = [
    "Link",
]

_THREAD_THRESHOLD = 64 * 1024
"""Records at least this large are sealed/opened in a worker thread."""


class Link:
    """One connection's record streams (control or lane).

    Sending is pipelined: each record's sequence number is claimed in call order,
    encryption runs in a worker thread concurrently with other records, and the
    writes go out in sequence order. Receiving is pipelined the same way by
    :meth:`records`, which keeps up to ``depth`` decryptions in flight.
    """

    def __init__(self, sock: Socket, send: CipherState, recv: CipherState) -> None:
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
