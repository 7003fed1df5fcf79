"""A receiver's limits, and the codes its refusals carry to the source."""

from __future__ import annotations

from typing import Any

import attrs

from ctlive.errors import (
    ConfigError,
    CtliveError,
    DataAtRestError,
    ImageTooLargeError,
    ReceiverLimitError,
    RestoreSpecError,
)

__all__ = ["ReceiverLimits", "refusal_code"]


def _positive(_: object, a: attrs.Attribute[Any], v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
        raise ConfigError(f"ReceiverLimits.{a.name} must be a positive number or None, "
                          f"not {v!r}")


@attrs.frozen(kw_only=True)
class ReceiverLimits:
    """What a receiver takes at once, and how long it waits; every refusal is an ERROR
    frame with its own code to the peer and a log record with the reason."""

    max_sessions: int = attrs.field(default=16, validator=_positive)
    """Authenticated sessions at once."""
    max_handshakes: int = attrs.field(default=32, validator=_positive)
    """Connections not yet authenticated (each may make the guest produce a report)."""
    max_sessions_per_peer: int | None = attrs.field(default=None, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Everything before authentication, from accept() on."""
    idle_timeout: float | None = attrs.field(default=600.0, validator=_positive)
    """An authenticated peer that sends nothing for this long is cut off."""
    max_migrations: int = attrs.field(default=4, validator=_positive)
    """Migrations received at once (``too-many-migrations``)."""
    max_image_bytes: int = attrs.field(default=32 << 30, validator=_positive)
    """Largest image one migration may rebuild (``image-too-large``)."""
    max_state_bytes: int | None = attrs.field(default=None, validator=_positive)
    """Bytes all images may take in the state directory together (None: 90 % of its
    filesystem)."""


def refusal_code(exc: CtliveError) -> str:
    """The ERROR code that tells the source why the receiver stopped."""
    if isinstance(exc, ImageTooLargeError):
        return "image-too-large"
    if isinstance(exc, ReceiverLimitError):
        return "too-many-migrations" if exc.limit == "max_migrations" else "limit-reached"
    if isinstance(exc, RestoreSpecError):
        return "restore-spec-refused"
    if isinstance(exc, DataAtRestError):
        return "data-at-rest-refused"
    return "receiver-failed"
