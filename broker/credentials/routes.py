"""`GET /v1/credentials/{tenant_id}/{provider}`: credentials for internal services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response

from broker.auth.dependencies import require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.errors import ValidationFailed
from broker.core.http import problem_responses
from broker.credentials import service
from broker.credentials.schemas import CredentialLease, WrappedCredentialLease
from broker.deps import delivery_of, vault_threads_of
from broker.integrations.providers import PROVIDERS
from broker.integrations.schemas import PROVIDER_DESCRIPTION

router = APIRouter(prefix="/v1/credentials", tags=["credentials"])

Service = Annotated[Principal, require(Scope.CREDENTIALS_READ, limit="fetch")]
# A lease must not outlive its `expires_at` in any cache.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
WRAP_TTL_MAX_LENGTH = 16

# The route's three inputs, documented here and read from the request by the route itself.
# FastAPI's per-request validation of declared parameters was a tenth of the instructions
# of a fetch on this, the broker's busiest route (`bench/fetch_profile.py --instructions`:
# 1,781k -> 1,613k), and the service checks every one of them anyway: a provider it does
# not know is a 404 that lists the known ones, a tenant outside the token a 404, a
# malformed wrap_ttl a 422.
_PARAMETERS: list[dict[str, Any]] = [
    {"name": "tenant_id", "in": "path", "required": True, "schema": {"type": "string"}},
    {
        "name": "provider",
        "in": "path",
        "required": True,
        "description": PROVIDER_DESCRIPTION,
        "schema": {"type": "string", "enum": list(PROVIDERS)},
    },
    {
        "name": "wrap_ttl",
        "in": "query",
        "required": False,
        "description": "Wrap the lease for one unwrap, e.g. 60s.",
        "schema": {"type": "string", "maxLength": WRAP_TTL_MAX_LENGTH},
    },
]


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
    openapi_extra={"parameters": _PARAMETERS},
)
async def fetch_credentials(request: Request, principal: Service) -> Response:
    """A lease on a tenant's credentials, or a single-use wrapping token holding it."""
    wrap_ttl = request.query_params.get("wrap_ttl")
    if wrap_ttl is not None and len(wrap_ttl) > WRAP_TTL_MAX_LENGTH:
        raise ValidationFailed(f"wrap_ttl must be at most {WRAP_TTL_MAX_LENGTH} characters")
    lease = await service.serve(
        delivery_of(request),
        principal,
        tenant_id=request.path_params["tenant_id"],
        provider=request.path_params["provider"],
        wrap_ttl=wrap_ttl,
        threads=vault_threads_of(request),
    )
    # Serialised here, from the model just built: FastAPI would validate it again first.
    # `response_model` above still documents it.
    return Response(lease.model_dump_json(), media_type="application/json", headers=NO_STORE)
