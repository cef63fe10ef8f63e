"""`GET /v1/audit/events` (audit:read): the broker's own audit trail, for the security team."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from broker.audit import trail
from broker.audit.schemas import AuditEventView
from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.deps import SessionDep
from broker.tenants.schemas import TENANT_ID_PATTERN

router = APIRouter(prefix="/v1/audit", tags=["audit"])

Auditor = Annotated[Principal, require(Scope.AUDIT_READ)]
# PostgreSQL text holds no NUL; a filter with one is refused here, not at the database.
NO_NUL = r"^[^\x00]*$"
# Event ids are PostgreSQL bigints; a larger cursor cannot name an event.
MAX_EVENT_ID = 2**63 - 1


@router.get("/events", response_model=list[AuditEventView])
def list_events(
    session: SessionDep,
    principal: Auditor,
    # A tenant id's own shape: the filter is kept in the trail's record of this read.
    tenant_id: Annotated[str | None, Query(max_length=63, pattern=TENANT_ID_PATTERN)] = None,
    actor: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    outcome: Literal["success", "denied", "failed"] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventView]:
    """Trail events, oldest first, filtered; page with `after_id`. Reading it is audited too."""
    events = trail.search(
        session,
        tenant_id=tenant_id,
        actor=actor,
        outcome=outcome,
        since=since,
        until=until,
        after_id=after_id,
        limit=limit,
    )
    trail.record(
        session,
        action="audit.read",
        resource="audit/events",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={"returned": len(events)},
    )
    return [AuditEventView.model_validate(e) for e in events]
