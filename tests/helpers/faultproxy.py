"""A TCP proxy on 127.0.0.1 that a test can cut or partition, from outside both peers.

``cut()`` closes every connection through it (both peers see the connection end);
``partition(True)`` stops forwarding without closing anything (no FIN, no RST: the peers
see silence, as across a dead link), and new connections hang; ``partition(False)``
heals it: the connections held meanwhile are closed, as endpoints that gave up on them
would, and new ones go through again.
"""

from __future__ import annotations

import anyio
import anyio.abc


class FaultProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self._scopes: set[anyio.CancelScope] = set()
        self._open = anyio.Event()
        self._open.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[tuple[str, int]]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_address)[:2])
            await listener.serve(self._handle)

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    def partition(self, on: bool) -> None:
        if on and self._open.is_set():
            self._open = anyio.Event()
        elif not on and not self._open.is_set():
            self.cut()
            self._open.set()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                await self._open.wait()
                async with (client, await anyio.connect_tcp(*self.target) as server,
                            anyio.create_task_group() as tg):
                    tg.start_soon(self._pipe, client, server, tg.cancel_scope)
                    tg.start_soon(self._pipe, server, client, tg.cancel_scope)
            except OSError:
                pass
            finally:
                self._scopes.discard(scope)
        await client.aclose()

    async def _pipe(self, a: anyio.abc.SocketStream, b: anyio.abc.SocketStream,
                    scope: anyio.CancelScope) -> None:
        try:
            async for chunk in a:
                if not self._open.is_set():
                    await anyio.sleep_forever()  # partitioned: hold it, say nothing
                await b.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()
