"""A migration session over its lanes: the I/O shell around
:class:`~ctlive.protocol.conversation.Conversation`.

Every rule is the conversation's (which frame when, credit, which connection carries
what) or the lane merger's (order across lanes); this module moves frames between
links and those pure objects, runs one reader task per connection, and wakes senders
waiting for credit. AEAD work for large records runs in worker threads (see
:mod:`ctlive.transport.link`), so lanes use both cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import attrs

from ctlive.errors import (
    BrokenChannelError,
    ClosedChannelError,
    CtliveError,
    RemoteProtocolError,
)
from ctlive.protocol.conversation import Conversation
from ctlive.protocol.evidence import AttestationResult
from ctlive.protocol.frames import (
    Change,
    Credit,
    Error,
    Event,
    Role,
    decode_frame,
)
from ctlive.protocol.handshake import HandshakeResult
from ctlive.protocol.lanes import LaneMerger
from ctlive.transport.link import Link

__all__ = [
    "ChannelStatistics",
    "LaneStatistics",
    "Session",
]



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


class Session:
    """An authenticated, attested migration session.

    Control frames go through :meth:`send` / :meth:`receive`, checked by the wire
    :class:`~ctlive.protocol.conversation.Conversation`. The source sends CHANGE payloads with
    :meth:`send_change`, spread over the lanes and subject to the receiver's
    byte credit; the destination gets them from :meth:`receive` in logical order
    (between the iteration's BEGIN and END). Background tasks read every
    connection; a bad record on any of them fails the session.
    """

    def __init__(self, role: Role, hs: HandshakeResult, control: Link,
                 lanes: list[Link]) -> None:
        self.role = role
        self.handshake = hs
        self.conversation = Conversation(role)
        self._control = control
        self._lanes = lanes
        self._credit_event = anyio.Event()
        self._granted_pending = 0
        self._closed = False
        self.closed_event = anyio.Event()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[
            tuple[int, Event | None] | BaseException](32)
        self._ordered = LaneMerger(len(lanes))
        self._failed: BaseException | None = None
        self.peer_error: Error | None = None
        """The ERROR frame the peer sent, if any (the source's senders raise it)."""
        self._peer_error_event = anyio.Event()
        self.idle_timeout: float | None = None
        """The longest :meth:`receive` waits for the peer's next frame (``None``: no
        limit). The destination's server sets it for the handler's part of a session:
        it applies only while the local side waits for the peer, never during local work
        (a restore). When it passes, :attr:`on_idle` runs and the session fails with
        :class:`~ctlive.errors.BrokenChannelError`."""
        self.on_idle: Callable[[], Awaitable[None]] | None = None
        """Awaited once when :attr:`idle_timeout` passes, before :meth:`receive`
        raises (the server sends its ERROR and reports the refusal there)."""

    @property
    def window(self) -> int:
        """Bytes of CHANGE payload that may be in flight (the destination's HELLO)."""
        return self.conversation.credit.window

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

    async def _pump(self, index: int, link: Link) -> None:
        async def deliver(payload: bytes | None) -> None:
            if payload is None:
                await self._inbox_send.send((index, None))
                return
            event = decode_frame(payload)
            self.conversation.check_link(index, event)
            if isinstance(event, Credit) and self.role is Role.SOURCE:
                self.conversation.receive_event(event)
                self._credit_event.set()
                self._credit_event = anyio.Event()
                return
            if isinstance(event, Error) and self.role is Role.SOURCE:
                # The destination stopped: senders learn why instead of a broken pipe.
                self.peer_error = event
                self._peer_error_event.set()
                self._credit_event.set()
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

    def attach_lanes(self, links: list[Link]) -> None:
        """Destination: the joined lanes (index 0 is the control connection)."""
        self._lanes = links
        self._ordered = LaneMerger(len(links))
        for i, link in enumerate(links):
            if link is not self._control:
                self._tg.start_soon(self._pump, i, link)

    # -- control ---------------------------------------------------------------------------

    async def send(self, event: Event) -> None:
        """Send one control frame (not CHANGE)."""
        if self._closed:
            raise ClosedChannelError("the session was closed")
        frame = self.conversation.send(event)
        await self._send_on(self._control, frame)

    async def receive(self) -> Event:
        """The next event from the peer: control frames, and on the destination the
        CHANGE frames of each iteration between its BEGIN and END."""
        while True:
            if self._failed is not None:
                raise self._failed
            ready = self._ordered.pop()
            if ready is not None:
                return self.conversation.receive_event(ready)
            item = await self._next_item()
            if isinstance(item, BaseException):
                self._failed = self._failed or item
                continue
            index, event = item
            if event is None:
                self._failed = BrokenChannelError(
                    "the peer closed the session" if index == 0 else f"lane {index} closed")
                continue
            # check_link() let CHANGE frames through only to the destination, and other
            # frames only on the control connection.
            if isinstance(event, Change):
                self._ordered.lanes[index].append(event)
            else:
                self._ordered.control.append(event)

    async def _next_item(self) -> tuple[int, Event | None] | BaseException:
        if self.idle_timeout is None:
            return await self._inbox.receive()
        with anyio.move_on_after(self.idle_timeout):
            return await self._inbox.receive()
        if self.on_idle is not None:
            await self.on_idle()
        return BrokenChannelError(
            f"the peer sent nothing for {self.idle_timeout:g} s (idle timeout)")

    # -- changes ---------------------------------------------------------------------------

    async def send_change(self, iteration: int, data: bytes, *, lane: int | None = None) -> None:
        """Send one CHANGE payload (at most MAX_CHANGE bytes) on ``lane`` or the next one,
        waiting for credit if needed. Several tasks may call this at once to keep lanes
        busy."""
        credit = self.conversation.credit
        while not credit.may_send(len(data)):
            self._raise_peer_error()
            if self._failed is not None:
                raise self._failed
            await self._credit_event.wait()
        self._raise_peer_error()
        if self._failed is not None:
            raise self._failed
        index, frame = self.conversation.send_change(iteration, data, lane)
        await self._send_on(self._lanes[index], frame)

    async def _send_on(self, link: Link, frame: bytes) -> None:
        try:
            await link.send(frame)
        except BrokenChannelError:
            if self.role is Role.SOURCE:
                # The ERROR that explains the broken connection may still be on its way.
                with anyio.move_on_after(0.5):
                    await self._peer_error_event.wait()
                self._raise_peer_error()
            raise

    def _raise_peer_error(self) -> None:
        if self.peer_error is not None:
            raise RemoteProtocolError(f"the destination stopped: {self.peer_error.code}: "
                                      f"{self.peer_error.message}")

    def lane_counts(self, iteration: int) -> tuple[int, ...]:
        """How many CHANGE frames each lane carried in ``iteration``."""
        return self.conversation.lane_counts(iteration)

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


