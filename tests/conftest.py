"""Shared pytest configuration.

Every async test runs under both asyncio and trio through anyio's pytest plugin.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Test helpers (CRIU harness, MITM proxy, pure-Python reference kernels) import by name.
sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def memory_path() -> Iterator[pathlib.Path]:
    """A private directory on memory (a tmpfs that workloads do not see): a receiver
    refuses a state directory on disk."""
    from ctlive.testing.memory import temporary_memory_dir

    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs)")
    with temporary_memory_dir("test-") as d:
        yield d


@pytest.fixture(scope="session", autouse=True)
def podman_store() -> Iterator[pathlib.Path | None]:
    """Podman's store for the whole session, on memory (``CONTAINERS_STORAGE_CONF``): a
    receiver refuses a podman store on disk, where the restored container's files and the
    checkpoint podman unpacks would rest in plaintext. Tests import their images into it;
    hosts (ctlive.testing.hosts) have stores of their own. None without root or podman."""
    if os.geteuid() != 0 or shutil.which("podman") is None:
        yield None
        return
    from ctlive.testing.memory import podman_memory_store

    with podman_memory_store("test-podman-") as d:
        yield d


@pytest.fixture(autouse=True)
def source_state_dir(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Each test's migrations keep their source journal in a directory of their own."""
    d = tmp_path_factory.mktemp("source-state")
    monkeypatch.setenv("CTLIVE_STATE_DIR", str(d))
    return d
