"""Tenant lifecycle routes (platform:admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.deps import SessionDep
from broker.tenants import service
from broker.tenants.schemas import TenantCreate, TenantView

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

PlatformAdmin = Annotated[Principal, require(Scope.PLATFORM_ADMIN)]


@router.post("", status_code=201, response_model=TenantView)
def create_tenant(body: TenantCreate, session: SessionDep, principal: PlatformAdmin) -> TenantView:
    """Create a tenant; its settings start at the defaults."""
    tenant = service.create_tenant(session, principal=principal, tenant_id=body.id, name=body.name)
    return TenantView.model_validate(tenant, from_attributes=True)


@router.get("", response_model=list[TenantView])
def list_tenants(
    session: SessionDep,
    principal: PlatformAdmin,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[str | None, Query(max_length=63)] = None,
) -> list[TenantView]:
    """List tenants by id, `limit` at a time, starting after `after`."""
    tenants = service.list_tenants(session, limit=limit, after=after)
    return [TenantView.model_validate(t, from_attributes=True) for t in tenants]


@router.get("/{tenant_id}", response_model=TenantView)
def get_tenant(tenant_id: str, session: SessionDep, principal: PlatformAdmin) -> TenantView:
    """One tenant."""
    tenant = service.get_tenant(session, tenant_id=tenant_id)
    return TenantView.model_validate(tenant, from_attributes=True)
