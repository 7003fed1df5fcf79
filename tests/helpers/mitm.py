"""A man-in-the-middle TCP proxy for channel tests, on 127.0.0.1.

It forwards both directions. On the source->destination direction it parses
ctlive's framing (6-byte preamble, two u16-framed handshake messages, then
records: 12-byte header + body) and applies one tampering action to record
number ``at``. It also counts the bytes the source sent after message 1.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import anyio
import anyio.abc


class Mitm:
    def __init__(self, target: tuple[str, int], action: str | None = None, at: int = 2) -> None:
        self.target = target
        self.action = action
        self.at = at
        self.bytes_after_msg1 = 0
        self.records_seen = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[tuple[str, int]]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_address)[:2])
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with (client, await anyio.connect_tcp(*self.target) as server,
                    anyio.create_task_group() as tg):
            tg.start_soon(self._upstream, client, server, tg.cancel_scope)
            tg.start_soon(self._pipe, server, client, tg.cancel_scope)

    async def _pipe(self, a: anyio.abc.SocketStream, b: anyio.abc.SocketStream,
                    scope: anyio.CancelScope) -> None:
        try:
            async for chunk in a:
                await b.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()

    async def _upstream(self, client: anyio.abc.SocketStream, server: anyio.abc.SocketStream,
                        scope: anyio.CancelScope) -> None:
        buf = bytearray()

        async def need(n: int) -> bytes:
            while len(buf) < n:
                buf.extend(await client.receive())
            out = bytes(buf[:n])
            del buf[:n]
            return out

        try:
            pre = await need(6)
            n1 = struct.unpack(">H", await need(2))[0]
            msg1 = await need(n1)
            await server.send(pre + struct.pack(">H", n1) + msg1)
            lens = await need(2)
            self.bytes_after_msg1 += 2
            n3 = struct.unpack(">H", lens)[0]
            msg3 = await need(n3)
            self.bytes_after_msg1 += n3
            await server.send(lens + msg3)
            held: bytes | None = None
            idx = 0
            while True:
                hdr = await need(13)
                length, seq, _ = struct.unpack(">IQB", hdr)
                rec = hdr + await need(length)
                self.bytes_after_msg1 += len(rec)
                self.records_seen += 1
                if idx == self.at and self.action:
                    if self.action == "flip":
                        rec = rec[:20] + bytes([rec[20] ^ 0x01]) + rec[21:]  # ciphertext
                    elif self.action == "drop":
                        rec = b""
                    elif self.action == "reorder":
                        held, rec = rec, b""
                    elif self.action == "replay":
                        rec = rec + rec
                    elif self.action == "truncate":
                        await server.send_eof() if hasattr(server, "send_eof") else None
                        await anyio.sleep(30)
                        return
                    elif self.action == "inject":
                        body = os.urandom(40)
                        rec = struct.pack(">IQB", len(body), seq, 0) + body + rec
                elif held is not None:
                    rec, held = rec + held, None
                if rec:
                    await server.send(rec)
                idx += 1
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()


async def refused_through(target: tuple[str, int], expected: type[BaseException],
                          workload: Any, **migrate_kw: Any) -> tuple[Mitm, Any]:
    """``migrate(workload, ...)`` through a ``Mitm`` in front of ``target`` (no tampering),
    which must raise ``expected``: the proxy (for its counts) and pytest's ExceptionInfo."""
    import pytest

    from ctlive.migration.source import migrate

    async with anyio.create_task_group() as tg:
        mitm = Mitm(target)
        paddr = await tg.start(mitm.serve)
        with pytest.raises(expected) as info:
            await migrate(workload, paddr, **migrate_kw)
        tg.cancel_scope.cancel()
    return mitm, info
