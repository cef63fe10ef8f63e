"""Tenant lifecycle routes (platform:admin)."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.convertors import StringConvertor, register_url_convertor

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.core.identifiers import TENANT_ID_PATTERN
from broker.deps import DeletionsDep, EngineDep, SessionDep, VaultDep
from broker.leases import service as leases
from broker.tenants import keys, service
from broker.tenants.schemas import RESERVED_IDS, KeyRotationView, TenantCreate, TenantView

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

PlatformAdmin = Annotated[Principal, require(Scope.PLATFORM_ADMIN)]
PlatformWriter = Annotated[Principal, require(Scope.PLATFORM_ADMIN, limit="write")]
NO_TENANT = problem_responses({404: "No such tenant"})
# A tenant id is a slug; anything else cannot name a tenant, and must not reach
# PostgreSQL (which refuses NUL) or Vault paths.
TenantIdPath = Annotated[str, Path(pattern=TENANT_ID_PATTERN, max_length=63)]


class _TenantSegment(StringConvertor):
    """A `{tenant_id:tenant}` path segment: any but the reserved ones.

    `/v1/tenants/settings` is the caller's own tenant (broker.settings), not a tenant
    named "settings". Without this, `DELETE /v1/tenants/settings` reached the
    `/{tenant_id}` route below and answered 404 (or 403, by scope) where the method
    is simply not allowed there: now it is a 405.
    """

    reserved = "|".join(sorted(RESERVED_IDS))
    regex = f"(?!(?:{reserved})(?:/|$))[^/]+"


register_url_convertor("tenant", _TenantSegment())


@router.post(
    "",
    status_code=201,
    response_model=TenantView,
    responses=problem_responses({409: "A tenant with this id exists"}),
)
def create_tenant(
    body: TenantCreate, session: SessionDep, vault: VaultDep, principal: PlatformWriter
) -> TenantView:
    """Create a tenant with default settings and its own Transit key."""
    tenant = service.create_tenant(
        session, vault, principal=principal, tenant_id=body.id, name=body.name
    )
    return TenantView.model_validate(tenant, from_attributes=True)


@router.get("", response_model=list[TenantView])
def list_tenants(
    session: SessionDep,
    principal: PlatformAdmin,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[str | None, Query(max_length=63, pattern=TENANT_ID_PATTERN)] = None,
) -> list[TenantView]:
    """List tenants by id, `limit` at a time, starting after `after`."""
    tenants = service.list_tenants(session, limit=limit, after=after)
    return [TenantView.model_validate(t, from_attributes=True) for t in tenants]


@router.get("/{tenant_id:tenant}", response_model=TenantView, responses=NO_TENANT)
def get_tenant(
    tenant_id: TenantIdPath, session: SessionDep, principal: PlatformAdmin
) -> TenantView:
    """One tenant."""
    tenant = service.get_tenant(session, tenant_id=tenant_id)
    return TenantView.model_validate(tenant, from_attributes=True)


@router.delete("/{tenant_id:tenant}", status_code=204, response_class=Response, responses=NO_TENANT)
def delete_tenant(
    tenant_id: TenantIdPath,
    request: Request,
    engine: EngineDep,
    vault: VaultDep,
    deletions: DeletionsDep,
    principal: PlatformWriter,
) -> Response:
    """Crypto-shred a tenant: stop delivering it, revoke its dynamic keys, destroy its Vault
    data and key, then its rows."""
    service.delete_tenant(
        engine,
        vault,
        principal=principal,
        tenant_id=tenant_id,
        deletions=deletions,
        before_shred=partial(
            leases.revoke_before_removal,
            request.app.state.leasing,
            principal=principal,
            tenant_id=tenant_id,
            provider=None,
            reason="tenant_deleted",
        ),
    )
    return Response(status_code=204)


@router.post("/{tenant_id:tenant}/keys/rotate", response_model=KeyRotationView, responses=NO_TENANT)
def rotate_key(
    tenant_id: TenantIdPath, engine: EngineDep, vault: VaultDep, principal: PlatformWriter
) -> KeyRotationView:
    """Rotate the tenant's Transit key, rewrap its secrets, retire the old key versions."""
    report = keys.rotate_tenant_key(engine, vault, principal=principal, tenant_id=tenant_id)
    return KeyRotationView.model_validate(report, from_attributes=True)
