"""`GET /v1/credentials/{tenant_id}/{provider}`: credentials for internal services."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from broker.audit import trail
from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.errors import NotFound
from broker.core.http import problem_responses
from broker.credentials import service
from broker.credentials.schemas import CredentialLease, WrapInfo, WrappedCredentialLease
from broker.deps import DeletionsDep, EngineDep, SettingsDep, VaultDep, VaultThreadsDep
from broker.integrations.schemas import ProviderName
from broker.vault.errors import StoredDataUnverified

router = APIRouter(prefix="/v1/credentials", tags=["credentials"])

REFUSAL_RECORD_GRACE_S = 0.25

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
async def fetch_credentials(
    request: Request,
    tenant_id: str,
    provider: ProviderName,
    response: Response,
    engine: EngineDep,
    vault: VaultDep,
    vault_threads: VaultThreadsDep,
    deletions: DeletionsDep,
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
    if not service.authorize(principal, tenant_id=tenant_id, provider=provider):
        recorded = service.record_refusal(
            engine,
            principal,
            tenant_id=tenant_id,
            provider=provider,
            limiter=request.app.state.limiter,
            tally=request.app.state.denials,
        )
        # Recorded before the answer when the database is healthy; never waited on for long.
        await trail.settle(recorded, within_s=REFUSAL_RECORD_GRACE_S)
        # The same answer as a missing tenant: a service cannot probe which exist.
        raise NotFound(service.NO_SUCH)
    lease_s = service.lease_seconds(
        provider, default_s=settings.credential_lease_s, caps=settings.credential_lease_caps
    )
    # Vault work on threads of its own: a stalled database can fill the shared
    # ones, and deliveries must not queue behind it.
    try:
        delivered = await anyio.to_thread.run_sync(
            partial(
                service.deliver,
                vault,
                deletions,
                tenant_id=tenant_id,
                provider=provider,
                lease_s=lease_s,
                wrap_ttl_s=ttl_s,
                principal=principal,
                access=request.app.state.oauth,
                leasing=request.app.state.leasing,
            ),
            limiter=vault_threads,
        )
    except StoredDataUnverified:
        # Tampering, not a delivery: its record may wait on the shared threads.
        await run_in_threadpool(
            service.record_unverified, engine, principal, tenant_id=tenant_id, provider=provider
        )
        raise
    if not isinstance(delivered, tuple):
        return CredentialLease.model_validate(delivered, from_attributes=True)
    lease, wrapped = delivered
    return WrappedCredentialLease(
        tenant_id=lease.tenant_id,
        provider=lease.provider,
        version=lease.version,
        expires_at=lease.expires_at,
        lease_id=lease.lease_id,
        wrap=WrapInfo.model_validate(wrapped, from_attributes=True),
    )
