"""`GET /v1/audit/events` (audit:read): the broker's own audit trail, for the security team."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from broker.audit import access, query
from broker.audit.query import Outcome, TrailQuery
from broker.audit.schemas import AccessReportView, AccessRowView, AuditEventView
from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.errors import ValidationFailed
from broker.core.identifiers import TENANT_ID_PATTERN
from broker.deps import EngineDep, SessionDep, SettingsDep
from broker.integrations.providers import PROVIDERS

router = APIRouter(prefix="/v1/audit", tags=["audit"])
# The tenant's own report lives with its settings: a tenant admin reads it.
tenant_router = APIRouter(prefix="/v1/tenants/settings", tags=["audit"])
TenantAdmin = Annotated[Principal, require(Scope.TENANT_ADMIN)]

Auditor = Annotated[Principal, require(Scope.AUDIT_READ)]
# PostgreSQL text holds no NUL; a filter with one is refused here, not at the database.
NO_NUL = r"^[^\x00]*$"
# Event ids are PostgreSQL bigints; a larger cursor cannot name an event.
MAX_EVENT_ID = 2**63 - 1


def _known_provider(provider: str | None) -> None:
    """Refuse a provider the broker does not know (without echoing it)."""
    if provider is not None and provider not in PROVIDERS:
        raise ValidationFailed(f"provider: one of {', '.join(PROVIDERS)}")


@router.get("/events", response_model=list[AuditEventView])
def list_events(
    session: SessionDep,
    principal: Auditor,
    # A tenant id's own shape: the filter is kept in the trail's record of this read.
    tenant_id: Annotated[str | None, Query(max_length=63, pattern=TENANT_ID_PATTERN)] = None,
    actor: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    provider: Annotated[
        str | None, Query(max_length=32, json_schema_extra={"enum": list(PROVIDERS)})
    ] = None,
    outcome: Outcome | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventView]:
    """Trail events in `[since, until)`, oldest first; page with `after_id`. Reading is audited.

    `tenant_id` also matches events whose resource names the tenant; a bare `actor`
    (`alice`) matches any kind (`user:alice`, `service:alice`), as `broker audit` does.
    """
    _known_provider(provider)
    filters = TrailQuery(
        tenant=tenant_id,
        actor=actor,
        provider=provider,
        outcome=outcome,
        since=since,
        until=until,
        after_id=after_id,
        limit=limit,
    )
    events = query.read(session, filters, principal=principal)
    return [AuditEventView.model_validate(e) for e in events]


@tenant_router.get(
    "/access-report",
    response_model=AccessReportView,
    responses={200: {"content": {"text/csv": {}}}},
)
async def access_report(
    engine: EngineDep,
    settings: SettingsDep,
    principal: TenantAdmin,
    provider: Annotated[
        str | None, Query(max_length=32, json_schema_extra={"enum": list(PROVIDERS)})
    ] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    format: Literal["json", "csv"] = "json",  # noqa: A002 - the query parameter's name
) -> AccessReportView | PlainTextResponse:
    """Who read this tenant's credentials: each read, by whom, when, from where, allowed or not.

    From the broker's trail joined with Vault's audit log. Producing it is audited.
    """
    tenant_id = own_tenant(principal)
    _known_provider(provider)
    since, until = query.as_utc(since), query.as_utc(until)
    report = await run_in_threadpool(
        access.build,
        engine,
        access.log_paths(settings),
        tenant_id=tenant_id,
        provider=provider,
        since=since,
        until=until,
    )
    await run_in_threadpool(
        access.record_reading,
        engine,
        principal,
        tenant_id=tenant_id,
        returned=len(report.rows),
        fmt=format,
    )
    if format == "csv":
        return PlainTextResponse(
            access.render_csv(report.rows),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="access-report.csv"'},
        )
    return AccessReportView(
        rows=[AccessRowView.model_validate(row, from_attributes=True) for row in report.rows],
        vault_log_read=report.vault_log_read,
    )
