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
_MODULES = {
    "ctlive.attest": ("SimulatedSnpPlatform", "SnpPolicy", "SnpVerifier"),
    "ctlive.backends": ("DumpMethod", "DumpResult", "PodmanContainer", "Process", "Restored",
                        "RuncContainer", "Workload"),
    "ctlive.identity": ("Identity", "load_public_keys"),
    "ctlive.migration.convergence": ("Convergence", "ConvergencePolicy"),
    "ctlive.migration.destination": ("serve",),
    "ctlive.migration.recovery": ("Recovered", "recover"),
    "ctlive.migration.report": ("Decision", "IterationReport", "MigrationReport",
                                "ProgressEvent"),
    "ctlive.migration.source": ("migrate",),
    "ctlive.protocol.evidence": ("AttestationResult", "EvidenceProvider", "EvidenceVerifier"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


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
