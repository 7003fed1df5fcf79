"""The receiver's Prometheus metrics, and what it tells operators about each session.

:class:`ReceiverMetrics` holds the metrics of one ``serve()`` in a registry of its own
(never the process-wide default), so one process may run several receivers; with
``serve(metrics="HOST:PORT")`` (``ctlive serve --metrics``) :class:`MetricsServer`
exposes them over HTTP. :class:`ReceiverObserver` is the receiver's single place for
both: it logs each session's events (logger ``ctlive.destination``) and moves the
metrics. docs/operations.md lists every metric.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from ctlive.errors import ChannelError, ConfigError
from ctlive.ops.logs import bind, get_logger, peer_name
from ctlive.transport.socket import parse_address as socket_address

__all__ = ["OUTCOMES", "PHASES", "MetricsServer", "ReceiverMetrics", "ReceiverObserver",
           "parse_address"]

log = get_logger("ctlive.destination")

OUTCOMES = ("committed", "discarded", "failed")
"""The ``outcome`` label of ``ctlive_receiver_migrations_total``."""
PHASES = ("verify", "restore", "resume")
"""The ``phase`` label of ``ctlive_receiver_phase_seconds``."""
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _tree_bytes(root: pathlib.Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):  # a migration's directory may just go
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class ReceiverMetrics:
    """The metrics of one receiver, in ``registry`` (default: a new one).

    ``in_doubt`` and ``state_dir`` feed the two gauges read at each scrape: READY
    copies waiting for COMMIT or ABORT, and the bytes under the state directory."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 in_doubt: Callable[[], int] | None = None,
                 state_dir: pathlib.Path | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions = Counter("ctlive_receiver_sessions", "Authenticated sessions handled",
                                registry=r)
        self.sessions_in_progress = Gauge("ctlive_receiver_sessions_in_progress",
                                          "Authenticated sessions being handled now",
                                          registry=r)
        self.migrations = Counter("ctlive_receiver_migrations",
                                  "Migrations finished here, by outcome", ["outcome"],
                                  registry=r)
        self.received_bytes = Counter("ctlive_receiver_received_bytes",
                                      "Bytes received on authenticated sessions (on the "
                                      "wire, encrypted)", registry=r)
        self.downtime = Histogram("ctlive_receiver_downtime_seconds",
                                  "From the end of a migration's final iteration to its "
                                  "resume here", buckets=_SECONDS, registry=r)
        self.phase_seconds = Histogram("ctlive_receiver_phase_seconds",
                                       "Duration of the receiver's phases of a migration",
                                       ["phase"], buckets=_SECONDS, registry=r)
        self.refusals = Counter("ctlive_receiver_refusals",
                                "Connections, sessions and migrations refused, by reason",
                                ["reason"], registry=r)
        self.ready_in_doubt = Gauge("ctlive_receiver_ready_in_doubt",
                                    "READY copies (stopped) waiting for COMMIT or ABORT",
                                    registry=r)
        self.state_dir_bytes = Gauge("ctlive_receiver_state_dir_bytes",
                                     "Bytes of the files under the state directory",
                                     registry=r)
        for o in OUTCOMES:
            self.migrations.labels(o)
        for p in PHASES:
            self.phase_seconds.labels(p)
        if in_doubt is not None:
            self.ready_in_doubt.set_function(lambda: float(in_doubt()))
        if state_dir is not None:
            self.state_dir_bytes.set_function(lambda: float(_tree_bytes(state_dir)))


def parse_address(text: str | tuple[str, int]) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"``) as a tuple: the transport's parser, with ValueError
    and an empty host meaning every address."""
    if isinstance(text, tuple):
        return text
    try:
        host, port = socket_address(text)
    except ChannelError:
        raise ValueError(f"expected HOST:PORT, got {text!r}") from None
    return host or "0.0.0.0", port


class MetricsServer:
    """An HTTP endpoint (a thread) serving one registry at any path; with ``listen``
    None, nothing (and :meth:`close` does nothing)."""

    def __init__(self, registry: CollectorRegistry,
                 listen: str | tuple[str, int] | None) -> None:
        self.address: tuple[str, int] | None = None
        """The bound ``(host, port)``, if serving."""
        self._server: Any = None
        if listen is None:
            return
        try:
            host, port = parse_address(listen)
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except (ValueError, OSError) as exc:  # a bad address, a port in use
            raise ConfigError(f"cannot serve metrics on {listen}: {exc}", cause=exc) from exc
        self.address = (host, int(self._server.server_port))
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None


class ReceiverObserver:
    """What the receiver tells operators: logs and :class:`ReceiverMetrics`."""

    def __init__(self, metrics: ReceiverMetrics,
                 on_refusal: Callable[[str, str], Any] | None = None) -> None:
        self.metrics = metrics
        self.on_refusal = on_refusal
        """Told of each refusal, ``(reason, peer)``, after it is logged and counted."""
        self._bytes_seen: dict[int, int] = {}

    @contextlib.contextmanager
    def session(self, session: Any) -> Iterator[None]:
        """Around one authenticated session: counted, its peer bound on its log records,
        its bytes added when it ends."""
        m = self.metrics
        m.sessions.inc()
        m.sessions_in_progress.inc()
        with bind(peer=peer_name(session.remote_static)):
            log.info("session from %s", peer_name(session.remote_static))
            try:
                yield
            finally:
                m.sessions_in_progress.dec()
                self.count_bytes(session)
                self._bytes_seen.pop(id(session), None)

    def count_bytes(self, session: Any) -> None:
        """Add what ``session`` received since the last call."""
        now = session.statistics().bytes_received
        before = self._bytes_seen.get(id(session), 0)
        if now > before:
            self.metrics.received_bytes.inc(now - before)
            self._bytes_seen[id(session)] = now

    def phase(self, session: Any | None, phase: str, **fields: Any) -> None:
        """The migration bound in this task entered ``phase``."""
        if session is not None:
            self.count_bytes(session)
        log.info("phase %s", phase, extra={"phase": phase, **fields})

    def timings(self, timings: dict[str, float], *names: str) -> None:
        """Observe the receiver's phase durations ``names`` found in ``timings``."""
        for n in names:
            if n in timings:
                self.metrics.phase_seconds.labels(n).observe(timings[n])

    def outcome(self, outcome: str, reason: str = "", *, since: float | None = None,
                migration_id: str | None = None) -> None:
        """The migration bound in this task (or ``migration_id``) ended as ``outcome``
        (one of :data:`OUTCOMES`); ``since``: when its final iteration ended
        (monotonic), for the downtime histogram."""
        self.metrics.migrations.labels(outcome).inc()
        if since is not None:
            self.metrics.downtime.observe(time.monotonic() - since)
        level = 30 if outcome == "failed" else 20
        log.log(level, "migration %s%s", outcome, f": {reason}" if reason else "",
                extra={"outcome": outcome, "reason": reason or None,
                       "migration_id": migration_id})

    def refused(self, reason: str, peer: str = "", detail: str = "") -> None:
        """A refusal (``reason`` is its code): logged with the reason, counted, passed to
        ``on_refusal``."""
        self.metrics.refusals.labels(reason).inc()
        log.warning("refused %s: %s%s", peer or "a connection", reason,
                    f": {detail}" if detail else "",
                    extra={"reason": reason, **({"peer": peer} if peer else {})})
        if self.on_refusal is not None:
            with contextlib.suppress(Exception):  # a callback must not break the receiver
                self.on_refusal(reason, peer)
