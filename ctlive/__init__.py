"""ctlive: live-migrate CRIU-checkpointed workloads into attested SEV-SNP guests.

The usual entry points::

    report = await ctlive.migrate(ctlive.Process(pid), "tcp://10.0.0.7:7788",
                                  identity=ctlive.Identity.load("source.key"),
                                  attestation=ctlive.SnpPolicy.from_toml("policy.toml"))

and, inside the guest, ``await ctlive.serve(...)`` (or ``ctlive serve``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ctlive.errors import *  # noqa: F403
from ctlive.errors import __all__ as _errors_all

if TYPE_CHECKING:
    from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier
    from ctlive.backends import (
        DumpMethod,
        DumpResult,
        PodmanContainer,
        Process,
        Restored,
        RuncContainer,
        Workload,
    )
    from ctlive.identity import Identity, load_public_keys
    from ctlive.migration.convergence import Convergence, ConvergencePolicy
    from ctlive.migration.destination import serve
    from ctlive.migration.recovery import Recovered, recover
    from ctlive.migration.report import Decision, IterationReport, MigrationReport, ProgressEvent
    from ctlive.migration.source import migrate
    from ctlive.protocol.evidence import AttestationResult, EvidenceProvider, EvidenceVerifier

# The top-level names are loaded on first use (PEP 562), so that importing one side (say
# ctlive.migration.destination, inside the guest) does not import the other.
_LAZY = {
    "SimulatedSnpPlatform": "ctlive.attest", "SnpPolicy": "ctlive.attest",
    "SnpVerifier": "ctlive.attest", "DumpMethod": "ctlive.backends",
    "DumpResult": "ctlive.backends", "PodmanContainer": "ctlive.backends",
    "Process": "ctlive.backends", "Restored": "ctlive.backends",
    "RuncContainer": "ctlive.backends", "Workload": "ctlive.backends",
    "Identity": "ctlive.identity", "load_public_keys": "ctlive.identity",
    "Convergence": "ctlive.migration.convergence",
    "ConvergencePolicy": "ctlive.migration.convergence",
    "serve": "ctlive.migration.destination", "Recovered": "ctlive.migration.recovery",
    "recover": "ctlive.migration.recovery", "Decision": "ctlive.migration.report",
    "IterationReport": "ctlive.migration.report", "MigrationReport": "ctlive.migration.report",
    "ProgressEvent": "ctlive.migration.report", "migrate": "ctlive.migration.source",
    "AttestationResult": "ctlive.protocol.evidence",
    "EvidenceProvider": "ctlive.protocol.evidence",
    "EvidenceVerifier": "ctlive.protocol.evidence",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ctlive' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AttestationResult",
    "Convergence",
    "ConvergencePolicy",
    "Decision",
    "DumpMethod",
    "DumpResult",
    "EvidenceProvider",
    "EvidenceVerifier",
    "Identity",
    "IterationReport",
    "MigrationReport",
    "PodmanContainer",
    "Process",
    "ProgressEvent",
    "Recovered",
    "Restored",
    "RuncContainer",
    "SimulatedSnpPlatform",
    "SnpPolicy",
    "SnpVerifier",
    "Workload",
    "__version__",
    "load_public_keys",
    "migrate",
    "recover",
    "serve",
    *_errors_all,
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
