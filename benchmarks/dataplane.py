"""The data plane alone, over a fixed corpus of real dumps.

The corpus: successive ``criu dump --leave-running`` images of the mutating workload
(mixed page content), one second apart, on a private tmpfs. Over it, in one run:

- **ctlive's pipeline**: read -> diff -> compress -> encrypt -> loopback -> decrypt ->
  decompress -> write (and verify), the real code: ``migrate.send_iteration`` into
  ``Destination.receive_iterations`` over a channel session, every dump as one
  iteration, timed until the destination has verified the last one;
- **a plain loopback socket copy** of the same bytes (every file of every dump,
  ``sendfile`` into a socket, written out on the other side);
- **each stage on its own** (one core, in memory where it can be), as image bytes
  per second, to show where the time goes;
- **wire bytes per iteration** against the XOR+zstd floor: zstd-1 of the XOR of
  exactly the pages that changed (matched by process and address, pages that are
  new XORed with zero) plus zstd-1 of each changed non-page file.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from typing import Any

import anyio
import zstandard

from ctlive.backends.criu import find_criu
from ctlive.identity import Identity
from ctlive.images import layout, pagediff
from ctlive.images.changes import decode_change, encode_change
from ctlive.images.diff import diff
from ctlive.images.rebuild import Rebuilder
from ctlive.migration.destination import Destination, MigrationRecord
from ctlive.migration.iteration import send_iteration
from ctlive.protocol.frames import Commit, CommitAck, MigrationMeta, Ready
from ctlive.protocol.noise import CipherState
from ctlive.testing.doubles import FakeProvider, FakeVerifier
from ctlive.testing.workloads import start_sample_workload
from ctlive.transport.client import open_session
from ctlive.transport.server import serve_sessions

PAGE = pagediff.PAGE_SIZE


def make_corpus(mib: int, dumps: int = 4, interval: float = 1.0, dirty: float = 0.05,
                touch: int = 64) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """``dumps`` successive full dumps of the mutating workload, on a private tmpfs
    mounted after the workload started (so that no dump holds an earlier one).
    Returns (the tmpfs, the dump directories)."""
    from benchmarks.tools import private_tmpfs

    criu = find_criu().path
    work = pathlib.Path(tempfile.mkdtemp(prefix="ctlive-corpus-", dir="/var/tmp"))
    pid, _ = start_sample_workload(work, mib, dirty=dirty, touch=touch)
    try:
        root = private_tmpfs("dataplane", size="16g")
        time.sleep(1.0)
        dirs = []
        for k in range(dumps):
            d = root / f"dump-{k}"
            d.mkdir()
            t = time.monotonic()
            subprocess.run([criu, "dump", "--leave-running", "-t", str(pid), "-D", str(d),
                            "-o", "dump.log"], check=True, capture_output=True)
            (d / "dump.log").unlink()
            dirs.append(d)
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
        return root, dirs
    finally:
        os.kill(pid, 9)
        shutil.rmtree(work, ignore_errors=True)


def files_of(d: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def image_bytes(corpus: list[pathlib.Path]) -> int:
    return sum(p.stat().st_size for d in corpus for p in files_of(d))


# --- the plain copy ---------------------------------------------------------------------


def plain_copy(corpus: list[pathlib.Path], out: pathlib.Path) -> float:
    """Seconds to copy every file of every dump over a loopback TCP socket."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    hdr = struct.Struct("<HQ")

    def receive() -> None:
        conn, _ = lsock.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with conn:
            while True:
                h = conn.recv(hdr.size, socket.MSG_WAITALL)
                if len(h) < hdr.size:
                    return
                nlen, size = hdr.unpack(h)
                name = conn.recv(nlen, socket.MSG_WAITALL).decode()
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    left = size
                    while left:
                        n = conn.recv_into(view[: min(left, len(buf))])
                        if not n:
                            raise OSError("plain copy: connection closed early")
                        f.write(view[:n])
                        left -= n

    t = threading.Thread(target=receive)
    t.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for d in corpus:
            for p in files_of(d):
                name = f"{d.name}/{p.name}".encode()
                s.sendall(hdr.pack(len(name), p.stat().st_size) + name)
                with open(p, "rb") as f:
                    s.sendfile(f)
    t.join()
    seconds = time.perf_counter() - start
    lsock.close()
    return seconds


# --- ctlive's pipeline ------------------------------------------------------------------


async def pipeline(corpus: list[pathlib.Path], out: pathlib.Path, *, lanes: int = 1,
                   cipher: str = "AESGCM") -> tuple[float, list[int]]:
    """(seconds until the destination verified the last dump, wire bytes per iteration)."""
    src, dst = Identity.generate(), Identity.generate()
    receiver = Destination(out)

    async def handler(session: Any) -> None:
        await session.receive()  # MIGRATION_META
        (out / "bench").mkdir()
        await receiver.receive_iterations(session, MigrationRecord("bench"), out / "bench")
        await session.send(Ready({}))
        c = await session.receive()
        assert isinstance(c, Commit)
        await session.send(CommitAck(c.migration_id))

    wires = []
    async with anyio.create_task_group() as tg:
        addr = await tg.start(lambda task_status: serve_sessions(
            ("127.0.0.1", 0), identity=dst, provider=FakeProvider(), allow={src.public_key},
            handler=handler, task_status=task_status))
        async with open_session(addr, identity=src, verifier=FakeVerifier(), lanes=lanes,
                                cipher=cipher) as s:
            await s.send(MigrationMeta({}))
            start = time.perf_counter()
            prev, lane_rr = None, 0
            for k, d in enumerate(corpus):
                before = s.statistics().bytes_sent
                _, lane_rr = await send_iteration(s, k, k == len(corpus) - 1, prev, d, lane_rr)
                wires.append(s.statistics().bytes_sent - before)
                prev = d
            reply = await s.receive()
            seconds = time.perf_counter() - start
            if not isinstance(reply, Ready):
                raise RuntimeError(f"the receiver answered {reply!r}")
            await s.send(Commit("bench"))
            await s.receive()
        tg.cancel_scope.cancel()
    return seconds, wires


# --- stages on their own ----------------------------------------------------------------


def stages(corpus: list[pathlib.Path], scratch: pathlib.Path,
           cipher: str = "AESGCM") -> dict[str, float]:
    """Seconds per stage over the whole corpus, each stage alone on one core."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    for d in corpus:
        for p in files_of(d):
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
    out["read"] = time.perf_counter() - t
    t = time.perf_counter()
    per_iter: list[list[bytes]] = []
    prev = None
    for d in corpus:
        per_iter.append([encode_change(c) for c in diff(prev, d)])
        prev = d
    out["diff + compress"] = time.perf_counter() - t
    key = os.urandom(32)
    tx, rx = CipherState(cipher, key), CipherState(cipher, key)
    frames = [item[i : i + 65000] for items in per_iter for item in items
              for i in range(0, max(len(item), 1), 65000)]
    t = time.perf_counter()
    sealed = [tx.encrypt(n, b"hdr", f) for n, f in enumerate(frames)]
    out["encrypt"] = time.perf_counter() - t
    t = time.perf_counter()
    for n, c in enumerate(sealed):
        rx.decrypt(n, b"hdr", c)
    out["decrypt"] = time.perf_counter() - t
    t = time.perf_counter()
    prev_out = None
    hashes: dict[str, bytes] = {}
    for k, items in enumerate(per_iter):
        target = scratch / f"r{k}"
        # As the receiver does: carry verified page hashes from one rebuild to the next.
        rb = Rebuilder(prev_out, target, consume_old=True, old_hashes=hashes)
        try:
            for item in items:
                rb.apply(decode_change(item))
            rb.finish()
            hashes = rb.page_hashes
        finally:
            rb.close()
        if prev_out is not None:
            shutil.rmtree(prev_out)
        prev_out = target
    out["decompress + write + verify"] = time.perf_counter() - t
    return out


# --- the wire floor ---------------------------------------------------------------------


def wire_floor(old: pathlib.Path | None, new: pathlib.Path) -> int:
    """zstd-1 of the XOR of exactly the changed pages, plus zstd-1 of changed files."""
    zc = zstandard.ZstdCompressor(level=1)
    new_maps = layout.pagemaps(new)
    old_maps = layout.pagemaps(old) if old is not None else {}
    pages_of = {f"pages-{pm.pages_id}.img": name for name, pm in new_maps.items()}
    total = 0
    for p in files_of(new):
        if p.name in pages_of:
            continue
        data = p.read_bytes()
        if old is None or not (old / p.name).is_file() or (old / p.name).read_bytes() != data:
            total += len(zc.compress(data))
    for pages_name, map_name in pages_of.items():
        new_map, old_map = new_maps[map_name], old_maps.get(map_name)
        cur = (new / pages_name).read_bytes()
        old_buf = (old / f"pages-{old_map.pages_id}.img").read_bytes() if (
            old is not None and old_map is not None) else b""
        segs = layout.segments(old_map, new_map) if old_map is not None else []
        xored = bytearray()
        npages = len(cur) // PAGE
        for start in range(0, npages, 4096):
            count = min(4096, npages - start)
            base = layout.base_window(old_buf, segs, start, count) if old_buf else bytes(
                count * PAGE)
            new_w = cur[start * PAGE : (start + count) * PAGE]
            for i in pagediff.changed_pages(bytes(base), new_w):
                a = int.from_bytes(base[i * PAGE : (i + 1) * PAGE], "little")
                b = int.from_bytes(new_w[i * PAGE : (i + 1) * PAGE], "little")
                xored += (a ^ b).to_bytes(PAGE, "little")
        total += len(zc.compress(bytes(xored))) if xored else 0
    return total


def run(mib: int, dumps: int = 4, lanes: tuple[int, ...] = (1, 2),
        ciphers: tuple[str, ...] = ("AESGCM", "ChaChaPoly")) -> dict[str, Any]:
    """The whole data-plane section; figures as a dict."""
    from benchmarks.tools import drop_tmpfs

    root, corpus = make_corpus(mib, dumps)
    try:
        total = image_bytes(corpus)
        res: dict[str, Any] = {"mib": mib, "dumps": dumps, "image_bytes": total,
                               "per_dump": [image_bytes([d]) for d in corpus]}
        # Plain copy and every pipeline configuration, interleaved, three rounds: this
        # machine's memory speed drifts, and drift should hit all paths alike.
        plain: list[float] = []
        runs: dict[tuple[int, str], list[tuple[float, list[int]]]] = {
            (n, c): [] for c in ciphers for n in lanes}
        for _ in range(3):
            scratch = root / "copy"
            scratch.mkdir()
            plain.append(plain_copy(corpus, scratch))
            shutil.rmtree(scratch)
            for (n, cipher), got in runs.items():
                rx = root / "rx"
                rx.mkdir()
                got.append(anyio.run(functools.partial(pipeline, corpus, rx, lanes=n,
                                                       cipher=cipher)))
                shutil.rmtree(rx)
        res["plain_copy_s"] = statistics.median(plain)
        res["plain_copy_all"] = plain
        res["pipeline"] = []
        for (n, cipher), got in runs.items():
            secs = sorted(g[0] for g in got)
            res["pipeline"].append({"lanes": n, "cipher": cipher,
                                    "seconds": statistics.median(secs), "all": secs,
                                    "wire": got[0][1]})
        st = root / "stages"
        st.mkdir()
        res["stages"] = stages(corpus, st)
        shutil.rmtree(st)
        res["floor"] = [wire_floor(corpus[k - 1] if k else None, d)
                        for k, d in enumerate(corpus)]
        return res
    finally:
        drop_tmpfs(root)
