"""Response bodies for credential health."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from broker.credential_health.service import Health
from broker.models import HealthCheck


class CheckView(BaseModel):
    """One past check."""

    at: datetime
    ok: bool
    code: str
    reason: str | None
    state: str

    @classmethod
    def of(cls, check: HealthCheck) -> CheckView:
        """The view of a history row."""
        return cls(
            at=check.at, ok=check.ok, code=check.code, reason=check.reason, state=check.state
        )


class HealthView(BaseModel):
    """A credential's health: healthy, failing (with the provider's reason) or needs_reconnect."""

    state: str
    reason: str | None
    checked_at: datetime | None
    history: list[CheckView]

    @classmethod
    def of(cls, health: Health) -> HealthView:
        """The view of a credential's health."""
        return cls(
            state=health.state,
            reason=health.reason,
            checked_at=health.checked_at,
            history=[CheckView.of(check) for check in health.history],
        )
