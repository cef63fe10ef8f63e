"""`require(...)`: the one dependency through which every route declares its scopes."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.auth.principal import Principal
from broker.auth.tokens import TokenVerifier
from broker.core import context
from broker.core.errors import Forbidden, Unauthenticated

_bearer = HTTPBearer(auto_error=False, description="A JWT carrying OAuth-style scopes.")

SCOPES_ATTR = "__broker_scopes__"


def require(*scopes: str) -> Any:
    """A dependency that authenticates the caller and demands any one of `scopes`.

    The route's scopes are also attached to the dependency, so a test can prove
    that every route declares them.
    """
    if not scopes:
        raise ValueError("a route must require at least one scope")

    # Async on purpose: it runs on the request's own task, so the actor it
    # binds to the request context is visible to the route and its Vault calls.
    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthenticated("a bearer token is required")
        verifier: TokenVerifier = request.app.state.verifier
        principal = verifier.verify(credentials.credentials)
        context.update(actor=principal.actor, tenant_id=principal.tenant_id)
        request.state.principal = principal
        if not any(principal.has(scope) for scope in scopes):
            raise Forbidden(f"this needs one of the scopes: {', '.join(scopes)}")
        return principal

    setattr(dependency, SCOPES_ATTR, tuple(scopes))
    return Depends(dependency)


def declared_scopes(dependency: Any) -> tuple[str, ...] | None:
    """The scopes a `require(...)` dependency demands, or None for anything else."""
    return getattr(dependency, SCOPES_ATTR, None)
