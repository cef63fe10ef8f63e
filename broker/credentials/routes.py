"""`GET /v1/credentials/{tenant_id}/{provider}`: credentials for internal services."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.credentials import service
from broker.credentials.schemas import CredentialLease, WrappedCredentialLease
from broker.deps import delivery_of, vault_threads_of
from broker.integrations.schemas import ProviderName

router = APIRouter(prefix="/v1/credentials", tags=["credentials"])

Service = Annotated[Principal, require(Scope.CREDENTIALS_READ, limit="fetch")]
# A lease must not outlive its `expires_at` in any cache.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


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
    principal: Service,
    wrap_ttl: Annotated[
        str | None, Query(max_length=16, description="Wrap the lease for one unwrap, e.g. 60s.")
    ] = None,
) -> Response:
    """A lease on a tenant's credentials, or a single-use wrapping token holding it."""
    lease = await service.serve(
        delivery_of(request),
        principal,
        tenant_id=tenant_id,
        provider=provider,
        wrap_ttl=wrap_ttl,
        threads=vault_threads_of(request),
    )
    # Serialised here, from the model just built: FastAPI would validate it again first.
    # `response_model` above still documents it.
    return Response(lease.model_dump_json(), media_type="application/json", headers=NO_STORE)
