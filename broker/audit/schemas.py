"""Responses of the audit trail API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AuditEventView(BaseModel):
    """One broker audit event: who did what to which tenant's resource, and how it ended."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    actor_kind: str
    tenant_id: str | None
    action: str
    resource: str
    outcome: str
    request_id: str | None
    client_addr: str | None
    detail: dict[str, Any]


class AccessRowView(BaseModel):
    """One read (or refused read) of one provider's credentials."""

    time: datetime
    provider: str | None
    actor: str | None
    via: Literal["broker", "vault"]
    action: str | None
    from_addr: str | None
    outcome: str
    request_id: str | None


class AccessReportView(BaseModel):
    """The tenant's access report, oldest first."""

    rows: list[AccessRowView]
    vault_log_read: bool = Field(
        description="False when Vault's audit log could not be read: only refusals are shown."
    )
