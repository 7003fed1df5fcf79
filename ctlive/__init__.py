"""ctlive: live-migrate CRIU-checkpointed workloads into attested SEV-SNP guests.

The usual entry points::

    report = await ctlive.migrate(ctlive.Process(pid), "tcp://10.0.0.7:7788",
                                  identity=ctlive.Identity.load("source.key"),
                                  attestation=ctlive.SnpPolicy.from_toml("policy.toml"))

and, inside the guest, ``await ctlive.serve(...)`` (or ``ctlive serve``).
"""

from __future__ import annotations

from ctlive.attest import SimulatedSnpPlatform, SnpPolicy, SnpVerifier
from ctlive.backends import DumpMethod, DumpResult, Restored, Workload
from ctlive.backends.podman import PodmanContainer
from ctlive.backends.process import Process
from ctlive.backends.runc import RuncContainer
from ctlive.errors import *  # noqa: F403
from ctlive.errors import __all__ as _errors_all
from ctlive.identity import Identity, load_public_keys
from ctlive.migration.convergence import Convergence, ConvergencePolicy
from ctlive.migration.destination import serve
from ctlive.migration.recovery import Recovered, recover
from ctlive.migration.report import Decision, IterationReport, MigrationReport, ProgressEvent
from ctlive.migration.source import migrate
from ctlive.protocol.evidence import AttestationResult, EvidenceProvider, EvidenceVerifier

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
