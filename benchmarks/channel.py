"""Channel benchmark over loopback, side by side in one run.

    python -m benchmarks.channel [--mib N] [--quick]

Rows: the ctlive channel (attested handshake, records, lanes 1/2/4, both ciphers),
a plain blocking-socket copy of the same bytes, and an in-memory
encrypt-then-decrypt loop of the same cipher on both cores. Target: channel
>= 0.8x the in-memory cipher loop.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio

from ctlive.identity import Identity
from ctlive.protocol.frames import Commit, IterationBegin, IterationEnd, MigrationMeta, Ready
from ctlive.protocol.noise import CipherState
from ctlive.testing.doubles import FakeDestination, FakeProvider, FakeVerifier
from ctlive.transport.client import open_session
from ctlive.transport.server import serve_sessions

CHUNK = 1 << 20
SENDERS_PER_LANE = 1  # more oversubscribes 2 cores (measured slower)
SRC, DST = Identity.generate(), Identity.generate()


async def channel_run(data: list[bytes], lanes: int, cipher: str) -> tuple[float, float]:
    """(transfer seconds, handshake seconds)."""
    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve_sessions(
            ("127.0.0.1", 0), identity=DST, provider=FakeProvider(), allow={SRC.public_key},
            handler=FakeDestination(keep=False), task_status=task_status))
        t0 = time.perf_counter()
        async with open_session(addr, identity=SRC, verifier=FakeVerifier(), lanes=lanes,
                                cipher=cipher) as s:
            t_hs = time.perf_counter() - t0
            await s.send(MigrationMeta({}))
            await s.send(IterationBegin(0, True))
            t1 = time.perf_counter()
            async with anyio.create_task_group() as senders:
                # One sender task per lane (a second measured slower on 2 cores).
                for k in range(SENDERS_PER_LANE * lanes):
                    async def send_part(k: int = k) -> None:
                        for chunk in data[k::SENDERS_PER_LANE * lanes]:
                            await s.send_change(0, chunk)
                    senders.start_soon(send_part)
            await s.send(IterationEnd(0, True, s.lane_counts(0)))
            assert isinstance(await s.receive(), Ready)
            t_transfer = time.perf_counter() - t1
            await s.send(Commit("b"))
            await s.receive()
        tg.cancel_scope.cancel()
    return t_transfer, t_hs


def plain_socket_copy(data: list[bytes]) -> float:
    total = sum(map(len, data))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def server() -> None:
        conn, _ = srv.accept()
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        got = 0
        while got < total:
            n = conn.recv_into(view)
            if not n:
                break
            got += n
        conn.sendall(b"k")
        conn.close()
        done.set()

    th = threading.Thread(target=server)
    th.start()
    c = socket.create_connection(srv.getsockname())
    t = time.perf_counter()
    for chunk in data:
        c.sendall(chunk)
    c.recv(1)
    elapsed = time.perf_counter() - t
    c.close()
    th.join()
    srv.close()
    return elapsed


def cipher_loop(data: list[bytes], cipher: str) -> float:
    """Encrypt then decrypt every chunk, split over two worker threads."""
    key = os.urandom(32)

    def work(part: list[bytes]) -> None:
        tx, rx = CipherState(cipher, key), CipherState(cipher, key)
        for i, chunk in enumerate(part):
            rx.decrypt(i, b"hdr", tx.encrypt(i, b"hdr", chunk))

    t = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(work, [data[0::2], data[1::2]]))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="bytes to move per row, in MiB")
    ap.add_argument("--quick", action="store_true", help="small run for CI")
    args = ap.parse_args(argv)
    mib = 16 if args.quick else args.mib
    data = [os.urandom(CHUNK) for _ in range(mib)]
    total = mib * CHUNK
    gbs = lambda t: total / t / 1e9  # noqa: E731
    plain = plain_socket_copy(data)
    print(f"{mib} MiB per row, chunks of {CHUNK // 1024} KiB, loopback\n")
    print("| row | GB/s | vs plain socket | vs in-memory cipher (2 cores) | handshake ms |")
    print("|---|---|---|---|---|")
    print(f"| plain blocking socket copy | {gbs(plain):.2f} | 1.00 | | |")
    worst = float("inf")
    for cipher in ("AESGCM", "ChaChaPoly"):
        mem = cipher_loop(data, cipher)
        print(f"| in-memory {cipher} enc+dec | {gbs(mem):.2f} | {plain / mem:.2f} | 1.00 | |")
        for lanes in (1, 2, 4):
            t, hs = anyio.run(channel_run, data, lanes, cipher)
            ratio = mem / t
            worst = min(worst, ratio)
            print(f"| channel {cipher} lanes={lanes} | {gbs(t):.2f} | {plain / t:.2f} | "
                  f"{ratio:.2f} | {hs * 1000:.1f} |")
    print(f"\nworst channel / in-memory cipher ratio: {worst:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
