"""`GET /v1/credentials/{tenant_id}/{provider}`: credentials for internal services."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.credentials import service
from broker.credentials.schemas import CredentialLease, WrapInfo, WrappedCredentialLease
from broker.deps import EngineDep, SettingsDep, VaultDep
from broker.vault.errors import StoredDataUnverified

router = APIRouter(prefix="/v1/credentials", tags=["credentials"])

Service = Annotated[Principal, require(Scope.CREDENTIALS_READ, limit="fetch")]


@router.get(
    "/{tenant_id}/{provider}",
    response_model=CredentialLease | WrappedCredentialLease,
    responses=problem_responses(
        {
            404: "No such credentials, or a tenant outside the token",
            409: (
                "The stored data does not verify against its sealed copy (tampered with), "
                "or the OAuth connection was revoked and the tenant must reconnect"
            ),
            503: "Vault is unavailable; retry after Retry-After",
        }
    ),
)
def fetch_credentials(
    tenant_id: str,
    provider: str,
    request: Request,
    response: Response,
    engine: EngineDep,
    vault: VaultDep,
    settings: SettingsDep,
    principal: Service,
    wrap_ttl: Annotated[
        str | None, Query(max_length=16, description="Wrap the lease for one unwrap, e.g. 60s.")
    ] = None,
) -> CredentialLease | WrappedCredentialLease:
    """A lease on a tenant's credentials, or a single-use wrapping token holding it."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    ttl_s = (
        service.parse_wrap_ttl(wrap_ttl, maximum_s=settings.max_wrap_ttl_s) if wrap_ttl else None
    )
    service.authorize(engine, principal, tenant_id=tenant_id, provider=provider)
    lease_s = service.lease_seconds(
        provider, default_s=settings.credential_lease_s, caps=settings.credential_lease_caps
    )
    try:
        lease = service.fetch(
            vault,
            tenant_id=tenant_id,
            provider=provider,
            lease_s=lease_s,
            principal=principal,
            access=request.app.state.oauth,
        )
    except StoredDataUnverified:
        service.record_unverified(engine, principal, tenant_id=tenant_id, provider=provider)
        raise
    if ttl_s is None:
        return CredentialLease.model_validate(lease, from_attributes=True)
    wrapped = service.wrap(vault, lease, ttl_s=ttl_s)
    return WrappedCredentialLease(
        tenant_id=lease.tenant_id,
        provider=lease.provider,
        version=lease.version,
        expires_at=lease.expires_at,
        wrap=WrapInfo.model_validate(wrapped, from_attributes=True),
    )
