"""A TCP client for tests that move a server: one connection, a request every 50 ms,
each reply checked against its request; the first failure (reset, wrong or lost reply)
stops it."""

from __future__ import annotations

import socket
import threading
import time


class EchoClient:
    """Connects to ``addr`` (retried for 10 s), then talks from a thread of its own:
    ``replies`` holds the time of each good reply, ``error`` the first failure."""

    def __init__(self, addr: tuple[str, int]) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(addr, timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, f"nothing listens on {addr}"
                time.sleep(0.1)
        self.sock.settimeout(30)  # longer than any retransmission back-off of a move
        self.replies: list[float] = []
        self.error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        f = self.sock.makefile("rb")
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                self.sock.sendall(f"{n}\n".encode())
                line = f.readline()
                if line != f"{n}\n".encode():
                    self.error = f"request {n} got {line!r}"
                    return
                self.replies.append(time.monotonic())
                time.sleep(0.05)
        except OSError as exc:
            self.error = f"request {n}: {type(exc).__name__}: {exc}"

    def longest_gap(self) -> float:
        return max(b - a for a, b in zip(self.replies, self.replies[1:], strict=False))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=35)
        self.sock.close()
