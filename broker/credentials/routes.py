"""`GET /v1/credentials/{tenant_id}/{provider}`: credentials for internal services."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.credentials import service
from broker.credentials.schemas import CredentialLease, WrappedCredentialLease
from broker.deps import DeliveryDep, VaultThreadsDep
from broker.integrations.schemas import ProviderName

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
async def fetch_credentials(
    tenant_id: str,
    provider: ProviderName,
    response: Response,
    delivery: DeliveryDep,
    threads: VaultThreadsDep,
    principal: Service,
    wrap_ttl: Annotated[
        str | None, Query(max_length=16, description="Wrap the lease for one unwrap, e.g. 60s.")
    ] = None,
) -> CredentialLease | WrappedCredentialLease:
    """A lease on a tenant's credentials, or a single-use wrapping token holding it."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return await service.serve(
        delivery,
        principal,
        tenant_id=tenant_id,
        provider=provider,
        wrap_ttl=wrap_ttl,
        threads=threads,
    )
