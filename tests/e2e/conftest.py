"""End-to-end fixtures: a real workload, a receiver with a simulated SNP platform."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from criu_harness import Mutator, require_criu

from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier
from ctlive.identity import Identity

# Fixed test keys: the module may be imported twice (as conftest and by tests).
SRC = Identity(bytes(range(1, 33)))
DST = Identity(bytes(range(33, 65)))


@pytest.fixture(scope="session")
def platform() -> SimulatedSnpPlatform:
    return SimulatedSnpPlatform()


@pytest.fixture
def verifier(platform: SimulatedSnpPlatform) -> SnpVerifier:
    return SnpVerifier(SnpPolicy(measurements=[platform.measurement]),
                       trusted_roots=[platform.trusted_root()])


@pytest.fixture
def mutator(tmp_path: pathlib.Path) -> Iterator[Mutator]:
    require_criu()
    m = Mutator(tmp_path, mib=16, frac=0.2)
    try:
        yield m
    finally:
        m.kill()


@pytest.fixture
def shared(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A directory every host of `ctlive.testing.hosts` sees (outside their private /tmp,
    /var/tmp and /run), removed afterwards."""
    d = pathlib.Path("/var/lib") / f"ctlive-test-{tmp_path.name}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Receiver:
    def __init__(self, addr: tuple[str, int], errors: list[BaseException],
                 scope: anyio.CancelScope) -> None:
        self.addr = addr
        self.errors = errors
        self.scope = scope


@pytest.fixture
async def receiver_factory(memory_path: pathlib.Path, platform: SimulatedSnpPlatform
                           ) -> AsyncIterator[Any]:
    from ctlive.migration.destination import serve

    async with anyio.create_task_group() as tg:
        async def start(hooks: Any = None, allow: Any = None, **kw: Any) -> Receiver:
            errors: list[BaseException] = []
            scope = anyio.CancelScope()

            async def run(task_status: Any) -> None:
                with scope:
                    await serve(("127.0.0.1", 0), identity=DST, provider=platform,
                                allow=allow if allow is not None else {SRC.public_key},
                                state_dir=memory_path / "dest-state",
                                on_session_error=errors.append, task_status=task_status,
                                hooks=hooks, **kw)

            addr = await tg.start(run)
            return Receiver(addr, errors, scope)

        yield start
        tg.cancel_scope.cancel()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault matrix (tests/e2e/test_fault_matrix.py) when it ran."""
    import sys

    mod = sys.modules.get("e2e.test_fault_matrix")
    table = mod.pytest_matrix_summary() if mod is not None else ""
    if table:
        terminalreporter.write_sep("=", "fault matrix: where the one running copy is")
        terminalreporter.write_line(table)
