"""Response bodies for credential health."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from broker.credential_health.age import Age, ReportRow
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


class AgeView(BaseModel):
    """A credential's age: created, last rotated, rotation due or expiry, and what that means."""

    created_at: datetime | None
    rotated_at: datetime | None
    rotation_due_at: datetime | None
    expires_at: datetime | None
    state: Literal["ok", "due", "overdue", "expiring", "expired"]


class HealthView(BaseModel):
    """A credential's health: healthy, failing (with the provider's reason) or needs_reconnect."""

    state: str
    reason: str | None
    checked_at: datetime | None
    history: list[CheckView]
    age: AgeView

    @classmethod
    def of(cls, health: Health, age: Age) -> HealthView:
        """The view of a credential's health and age."""
        return cls(
            state=health.state,
            reason=health.reason,
            checked_at=health.checked_at,
            history=[CheckView.of(check) for check in health.history],
            age=AgeView.model_validate(age, from_attributes=True),
        )


class ProblemView(BaseModel):
    """One credential with a problem, across tenants: identifiers and dates only."""

    tenant_id: str
    provider: str
    kind: str
    version: int
    problems: list[str]
    health: str
    health_reason: str | None
    age: str
    created_at: datetime | None
    rotated_at: datetime | None
    rotation_due_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def of(cls, row: ReportRow) -> ProblemView:
        """The view of a report row."""
        return cls.model_validate(row, from_attributes=True)
