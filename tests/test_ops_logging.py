"""Logging (ctlive.ops.logs): the migration id on every record of a migration, under
asyncio and trio; JSON lines that parse; no secret in any record."""

from __future__ import annotations

import io
import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from ctlive.ops import logs
from ctlive.ops.logs import bind, bind_migration, configure, current_migration_id, get_logger

pytestmark = pytest.mark.anyio


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure("DEBUG", "json", stream)
    try:
        yield stream
    finally:
        logging.getLogger("ctlive").removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_task_logs_its_own_migration_id(json_log: io.StringIO) -> None:
    log = get_logger("ctlive.test")

    async def one(mid: str) -> None:
        with bind(migration_id=mid, peer="0011223344556677"):
            async with anyio.create_task_group() as tg:  # a child task inherits it
                tg.start_soon(lambda: anyio.sleep(0))
                for _ in range(3):
                    log.info("step", extra={"phase": "iterate"})
                    await anyio.sleep(0.01)
                tg.start_soon(lambda: anyio.to_thread.run_sync(log.info, "in a thread"))
        assert current_migration_id() is None

    async with anyio.create_task_group() as tg:
        for mid in ("aaaa", "bbbb"):
            tg.start_soon(one, mid)
    log.info("outside")
    got = lines(json_log)
    assert [r["message"] for r in got].count("step") == 6
    assert {r["migration_id"] for r in got if r["message"] == "step"} == {"aaaa", "bbbb"}
    assert all(r["phase"] == "iterate" and r["peer"] == "0011223344556677"
               for r in got if r["message"] == "step")
    assert "migration_id" not in got[-1]
    # The records of the thread started from a child task carry the id too.
    assert sorted(r.get("migration_id") for r in got if r["message"] == "in a thread") == [
        "aaaa", "bbbb"]
    for r in got:
        assert {"time", "level", "logger", "message"} <= set(r)


def test_records_carry_the_id_for_any_handler(caplog: pytest.LogCaptureFixture) -> None:
    """The logger's own filter annotates records: a test capture sees the id too."""
    log = get_logger("ctlive.test2")
    with caplog.at_level(logging.INFO, "ctlive"), bind(migration_id="cafe01"):
        log.info("hello")
    assert [getattr(r, "migration_id", None) for r in caplog.records] == ["cafe01"]


def test_only_plausible_ids_are_bound() -> None:
    with bind_migration("abc\nFAKE LINE"):
        assert current_migration_id() is None
    with bind_migration("x" * 65):
        assert current_migration_id() is None
    with bind_migration("abc123"):
        assert current_migration_id() == "abc123"


def test_human_format() -> None:
    stream = io.StringIO()
    handler = configure("INFO", "human", stream)
    try:
        with bind(migration_id="feed"):
            get_logger("ctlive.test3").warning("refused", extra={"reason": "bad-meta"})
        get_logger("ctlive.test3").debug("not shown")
    finally:
        logging.getLogger("ctlive").removeHandler(handler)
    out = stream.getvalue().splitlines()
    assert len(out) == 1 and "[feed] refused reason=bad-meta" in out[0]
    assert "WARNING ctlive.test3" in out[0]


async def test_a_migration_logs_its_id_and_no_secret(
        json_log: io.StringIO, tmp_path: pathlib.Path, memory_path: pathlib.Path) -> None:
    """A real migration (CRIU): each record of the source and of the receiver's session
    names the migration; none holds key material or a whole public key."""
    from criu_harness import Mutator, require_criu

    from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier
    from ctlive.backends.process import Process
    from ctlive.identity import Identity
    from ctlive.migration.convergence import Convergence
    from ctlive.migration.destination import serve
    from ctlive.migration.source import migrate

    require_criu()
    src, dst = Identity.generate(), Identity.generate()
    platform = SimulatedSnpPlatform()
    verifier = SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                           trusted_roots=[platform.trusted_root()])
    m = Mutator(tmp_path, mib=8, frac=0.2)
    try:
        async with anyio.create_task_group() as tg:
            addr = await tg.start(lambda task_status: serve(
                ("127.0.0.1", 0), identity=dst, provider=platform, allow={src.public_key},
                state_dir=memory_path / "dest", task_status=task_status))
            report = await migrate(Process(m.pid), addr, identity=src, attestation=verifier,
                                   convergence=Convergence(max_iterations=2, max_downtime=0.0))
            await anyio.sleep(0.2)  # the receiver's session ends
            tg.cancel_scope.cancel()
    finally:
        m.kill()
    got = lines(json_log)
    mid = report.migration_id
    source = [r for r in got if r["logger"] == "ctlive.source"]
    assert source and all(r.get("migration_id") == mid for r in source)
    assert any(r.get("verdict") == "accepted" and r.get("peer") == dst.public_key.hex()[:16]
               for r in source)
    assert any(r.get("outcome") == "committed" for r in source)
    receiver = [r for r in got if r["logger"] == "ctlive.destination"
                and r.get("peer") == src.public_key.hex()[:16]]
    phases = [r["phase"] for r in receiver if "phase" in r]
    assert phases == ["receiving", "restoring", "ready"]
    assert all(r.get("migration_id") == mid for r in receiver
               if "phase" in r or "outcome" in r)
    assert any(r.get("outcome") == "committed" for r in receiver)
    text = json_log.getvalue()
    for ident in (src, dst):
        for secret in (ident.private_key.hex(), ident.public_key.hex(), repr(ident),
                       repr(ident.private_key), repr(ident.public_key)):
            assert secret not in text
    assert logs.FIELDS[0] == "migration_id"
