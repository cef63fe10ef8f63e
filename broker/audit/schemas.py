"""Responses of the audit trail API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


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
