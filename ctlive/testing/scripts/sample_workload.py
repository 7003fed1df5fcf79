"""The sample workload of ``ctlive.testing.workloads``: memory that keeps changing,
plus either a counter file or a TCP service.

    python sample_workload.py MIB COUNTER [DIRTY [TOUCH]]

It holds ``MIB`` MiB of mixed content (zero, text, sparse and random pages, as real
heaps hold) and a thread keeps dirtying ``DIRTY`` (default 0.3) of its pages per
second, ``TOUCH`` bytes (default 16) in each, walking the pages with a stride so
that each second's dirty pages are distinct. Then:

- with a ``COUNTER`` path, it writes 1, 2, 3, ... to that file every 20 ms
  (``start_sample_workload``);
- with ``-``, it serves TCP on port 7000 (each line received is answered with the
  next number of a sequence) and echoes UDP datagrams on port 7001
  (``SampleService``).

It first tries to become the leader of its own session, as CRIU requires inside a
PID namespace. This file is copied to a per-instance path before it runs: the
copy's path (argv[1]) identifies its processes (``script_pids``).
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time

P = 4096


def start_mutator(size: int, dirty: float, touch: int) -> None:
    """Fill ``size`` bytes and start the thread that keeps dirtying them."""
    buf = bytearray(size)
    r = random.Random(7)
    noise = r.randbytes(1 << 20)
    text = (b"GET /api/v1/items?id=%d HTTP/1.1 host: example.org user-agent: ctlive "
            * 2000)[:1 << 18]
    npages = size // P
    for i in range(npages):
        kind, o = i % 8, r.randrange(1 << 17)
        if kind in (2, 3):
            buf[i * P:(i + 1) * P] = text[o:o + P]
        elif kind in (4, 5):
            buf[i * P:i * P + 128] = noise[o:o + 128]
        elif kind == 6:
            buf[i * P:(i + 1) * P] = noise[o:o + P]
        elif kind == 7:
            buf[i * P:(i + 1) * P] = bytes(range(256)) * 16

    def mutate() -> None:
        rate = dirty * npages
        stride = 7919 if npages % 7919 else 7907
        page, q, done, t0 = 0, 0, 0, time.monotonic()
        while True:
            due = int((time.monotonic() - t0) * rate)
            while done < due:
                page = (page + stride) % npages
                off = page * P + (r.randrange(P - touch + 1) if touch < P else 0)
                q = (q + 4093) % ((1 << 20) - P)
                buf[off:off + touch] = noise[q:q + touch]
                done += 1
            time.sleep(0.01)

    threading.Thread(target=mutate, daemon=True).start()


def count(counter: str) -> None:
    """Write 1, 2, 3, ... to ``counter``, every 20 ms."""
    n = 0
    while True:
        n += 1
        with open(counter, "w") as f:
            f.write(str(n))
        time.sleep(0.02)


def udp_echo() -> None:
    """The prober's port: downtime to 10 ms, free of TCP retransmission backoff."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 7001))
    while True:
        d, a = u.recvfrom(64)
        u.sendto(d, a)


def serve() -> None:
    """UDP echo on 7001; on TCP 7000, one connection at a time, answer each line with
    the next number of one sequence shared by all connections."""
    threading.Thread(target=udp_echo, daemon=True).start()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7000))
    s.listen(1)
    n = 0
    while True:
        c, _ = s.accept()
        f = c.makefile("rwb", buffering=0)
        for _line in f:
            n += 1
            f.write(b"%d\n" % n)


def main(argv: list[str]) -> None:
    try:
        os.setsid()  # its own session inside the PID namespace, as CRIU requires
    except OSError:
        pass  # already a session leader (a container's init)
    size = int(argv[1]) << 20
    dirty = float(argv[3]) if len(argv) > 3 else 0.3
    touch = max(1, min(P, int(argv[4]) if len(argv) > 4 else 16))
    start_mutator(size, dirty, touch)
    if argv[2] == "-":
        serve()
    else:
        count(argv[2])


if __name__ == "__main__":
    main(sys.argv)
