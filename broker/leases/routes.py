"""Dynamic credentials over HTTP: the delivery mode, the lease registry, revocation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlmodel import Session

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.deps import EngineDep, SessionDep, SettingsDep, VaultDep, delivery_of
from broker.integrations import service as integrations
from broker.integrations.providers import PROVIDERS, get_provider
from broker.integrations.schemas import IntegrationView
from broker.integrations.schemas import ProviderName as ProviderPath
from broker.leases import service
from broker.leases.schemas import (
    DeliveryWrite,
    LeaseState,
    LeaseView,
    ProviderName,
    RevocationResult,
    ServiceRevoke,
    Subject,
    TenantRevoke,
)
from broker.tenants.schemas import TenantId
from broker.vault.errors import StoredDataUnverified

router = APIRouter(tags=["leases"])

Viewer = Annotated[
    Principal, require(Scope.INTEGRATIONS_VIEW, Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN)
]
Writer = Annotated[Principal, require(Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN, limit="write")]
Auditor = Annotated[Principal, require(Scope.AUDIT_READ)]
Revoker = Annotated[Principal, require(Scope.LEASES_REVOKE, Scope.PLATFORM_ADMIN, limit="write")]
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")]

PROVIDER_ENUM: dict[str, Any] = {"enum": list(PROVIDERS)}
NOT_FOUND = "No such provider, nothing stored, or the token's tenant does not exist"


@dataclass(frozen=True)
class LeaseFilters:
    """The filters and page both lease lists take."""

    provider: str | None
    subject: str | None
    state: str | None
    limit: int
    after: str | None


def _filters(
    provider: Annotated[ProviderName | None, Query(json_schema_extra=PROVIDER_ENUM)] = None,
    subject: Annotated[Subject | None, Query()] = None,
    state: LeaseState | None = None,
    limit: Limit = 100,
    after: After = None,
) -> LeaseFilters:
    return LeaseFilters(provider, subject, state, limit, after)


Filters = Annotated[LeaseFilters, Depends(_filters)]


def _views(session: Session, tenant_id: str | None, filters: LeaseFilters) -> list[LeaseView]:
    rows = service.list_leases(
        session,
        tenant_id=tenant_id,
        provider=filters.provider,
        subject=filters.subject,
        state=filters.state,
        limit=filters.limit,
        after=filters.after,
    )
    return [LeaseView.of(row) for row in rows]


def _leasing(request: Request) -> service.Leasing:
    leasing: service.Leasing = request.app.state.leasing
    return leasing


@router.put(
    "/v1/tenants/settings/integrations/{provider}/delivery",
    response_model=IntegrationView,
    responses=problem_responses(
        {404: NOT_FOUND, 409: "Changed concurrently; reload and retry", 412: "Stale If-Match"}
    ),
)
def set_delivery(
    provider: ProviderPath,
    body: DeliveryWrite,
    request: Request,
    response: Response,
    engine: EngineDep,
    vault: VaultDep,
    settings: SettingsDep,
    principal: Writer,
    if_match: Annotated[str | None, Header(max_length=100)] = None,
) -> IntegrationView:
    """Deliver a provider's credentials as stored, or as a key minted per service lease."""
    tenant_id = own_tenant(principal)
    try:
        row = integrations.set_delivery(
            engine,
            vault,
            principal=principal,
            tenant_id=tenant_id,
            provider=provider,
            mode=body.mode,
            if_match=if_match,
        )
    except StoredDataUnverified:
        integrations.record_unverified(
            engine, vault, tenant_id, provider, action="integration.delivery"
        )
        raise
    # This process's fetches stop guessing the stored ciphertext (an early decrypt of it,
    # in the caller's name, would be dropped unread in dynamic delivery, but still stand
    # in Vault's audit log as that service decrypting the root credential). Other
    # processes make that one guess once each, then forget it too.
    delivery_of(request).opened.forget(tenant_id, integrations.item_name(provider))
    if body.mode == "static":
        # Minted keys have no place in static delivery: the sweep revokes them now.
        service.retire_for_root(
            _leasing(request), tenant_id=tenant_id, provider=provider, reason="delivery_static"
        )
    response.headers["ETag"] = integrations.etag(row)
    return IntegrationView.of(get_provider(provider), row, settings=settings)


@router.get("/v1/tenants/settings/leases", response_model=list[LeaseView])
def list_tenant_leases(session: SessionDep, principal: Viewer, filters: Filters) -> list[LeaseView]:
    """The tenant's leases (dynamic keys minted for its services), oldest id first."""
    return _views(session, own_tenant(principal), filters)


@router.post("/v1/tenants/settings/leases/revoke", response_model=RevocationResult)
def revoke_tenant_leases(
    body: TenantRevoke, request: Request, principal: Writer
) -> RevocationResult:
    """Revoke the tenant's leases now: all, or one provider's, one service's or one lease."""
    result = service.revoke_matching(
        _leasing(request),
        service.Selector(
            tenant_id=own_tenant(principal),
            provider=body.provider,
            subject=body.subject,
            lease_id=body.lease_id,
        ),
        principal=principal,
        reason="requested",
    )
    return RevocationResult.model_validate(result, from_attributes=True)


@router.get("/v1/leases", response_model=list[LeaseView])
def list_leases(
    session: SessionDep,
    principal: Auditor,
    filters: Filters,
    tenant_id: Annotated[TenantId | None, Query()] = None,
) -> list[LeaseView]:
    """Every tenant's leases, for the security team ("failing": revocations being retried)."""
    return _views(session, tenant_id, filters)


@router.post("/v1/leases/revoke", response_model=RevocationResult)
def revoke_service_leases(
    body: ServiceRevoke, request: Request, principal: Revoker
) -> RevocationResult:
    """Revoke every lease of one service across tenants ("a worker leaked its credentials")."""
    result = service.revoke_matching(
        _leasing(request),
        service.Selector(subject=body.subject, provider=body.provider, tenant_id=body.tenant_id),
        principal=principal,
        reason="service_revoked",
    )
    return RevocationResult.model_validate(result, from_attributes=True)
