"""Credential health over HTTP: the verdict with its history, and a check on request."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.db import unit_of_work
from broker.core.http import problem_responses
from broker.credential_health import age, service
from broker.credential_health.jobs import queue_check
from broker.credential_health.schemas import HealthView, ProblemView
from broker.deps import EngineDep, OutboundDep, SessionDep, SettingsDep, VaultDep
from broker.integrations.schemas import ProviderName
from broker.models import utcnow

router = APIRouter(prefix="/v1/tenants/settings/integrations", tags=["integrations"])
platform_router = APIRouter(prefix="/v1/platform/credentials", tags=["credentials"])
PlatformAdmin = Annotated[Principal, require(Scope.PLATFORM_ADMIN)]

Viewer = Annotated[
    Principal, require(Scope.INTEGRATIONS_VIEW, Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN)
]
Checker = Annotated[
    Principal, require(Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN, limit="write")
]
NOT_FOUND = "No such provider, or nothing stored"


@router.get(
    "/{provider}/health", response_model=HealthView, responses=problem_responses({404: NOT_FOUND})
)
def get_health(
    provider: ProviderName, session: SessionDep, settings: SettingsDep, principal: Viewer
) -> HealthView:
    """The credential's health state, reason, last check and recent history, and its age."""
    health = service.health_of(session, tenant_id=own_tenant(principal), provider=provider)
    return HealthView.of(health, age.age_of(health.row, settings, utcnow()))


@router.post(
    "/{provider}/health/check",
    response_model=HealthView,
    responses=problem_responses({404: NOT_FOUND}),
)
def check_now(
    provider: ProviderName,
    outbound: OutboundDep,
    engine: EngineDep,
    vault: VaultDep,
    settings: SettingsDep,
    principal: Checker,
) -> HealthView:
    """Check the stored credentials now; a first failure is retried before the state flips."""
    tenant_id = own_tenant(principal)
    with unit_of_work(engine) as session:
        service.health_of(session, tenant_id=tenant_id, provider=provider, limit=1)
    checked = service.check(
        engine,
        vault,
        outbound,
        tenant_id=tenant_id,
        provider=provider,
        actor=principal.actor,
    )
    if checked.next in ("retry", "rate_limited"):
        delay = (
            settings.health_retry_s
            if checked.next == "retry"
            else settings.health_rate_limit_backoff_s
        )
        with unit_of_work(engine) as session:
            queue_check(session, tenant_id=tenant_id, provider=provider, delay_s=delay)
    service.audit_requested(engine, principal, tenant_id, provider, checked.state)
    with unit_of_work(engine) as session:
        health = service.health_of(session, tenant_id=tenant_id, provider=provider)
        return HealthView.of(health, age.age_of(health.row, settings, utcnow()))


@platform_router.get("/report", response_model=list[ProblemView])
def problem_report(
    engine: EngineDep,
    settings: SettingsDep,
    principal: PlatformAdmin,
    problem: Annotated[
        list[Literal["overdue", "due", "expiring", "expired", "failing", "needs_reconnect"]] | None,
        Query(description="Only these problems (repeatable); all when omitted."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[ProblemView]:
    """Across tenants: credentials overdue for rotation, expiring, or failing their checks."""
    rows = age.report(engine, settings, problems=frozenset(problem or age.PROBLEMS), limit=limit)
    return [ProblemView.of(row) for row in rows]
