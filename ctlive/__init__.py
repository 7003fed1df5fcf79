"""ctlive: live-migrate CRIU-checkpointed containers into attested SEV-SNP guests."""

from __future__ import annotations

from ctlive.errors import *  # noqa: F403
from ctlive.errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = [*_errors_all, "__version__"]
