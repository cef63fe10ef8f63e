"""`require(...)`: the one dependency through which every route declares its scopes."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.auth.principal import Principal
from broker.auth.tokens import TokenVerifier
from broker.core import context
from broker.core.errors import Forbidden, RateLimited, Unauthenticated
from broker.core.ratelimit import RateLimiter

_bearer = HTTPBearer(auto_error=False, description="A JWT carrying OAuth-style scopes.")

SCOPES_ATTR = "__broker_scopes__"


def require(*scopes: str, limit: str | None = None) -> Any:
    """A dependency that authenticates the caller and demands any one of `scopes`.

    With `limit`, the request also counts against that named rate limit, keyed
    by principal and tenant and by client address. Failed authentication
    always counts against the stricter `auth_failures` limit.

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
        limiter: RateLimiter = request.app.state.limiter
        ctx = context.current()
        address = f"addr:{ctx.client_addr if ctx else None}"
        if limiter.exceeded("auth_failures", address):
            raise RateLimited(
                "too many failed authentications from this address",
                retry_after=limiter.retry_after("auth_failures", address),
            )
        try:
            if credentials is None or credentials.scheme.lower() != "bearer":
                raise Unauthenticated("a bearer token is required")
            verifier: TokenVerifier = request.app.state.verifier
            token = credentials.credentials
            if verifier.may_block:  # a JWKS: only a remembered token is checked here
                principal = verifier.remembered(token) or await _verify_in_thread(
                    request, verifier, token
                )
            else:
                principal = verifier.verify(token)
        except Unauthenticated as failure:
            keys = [address] + ([f"sub:{failure.subject}"] if failure.subject else [])
            limiter.hit("auth_failures", *keys)
            raise
        context.update(actor=principal.actor, tenant_id=principal.tenant_id)
        request.state.principal = principal
        if not any(principal.has(scope) for scope in scopes):
            raise Forbidden(f"this needs one of the scopes: {', '.join(scopes)}")
        if limit is not None:
            tenant = request.path_params.get("tenant_id") or principal.tenant_id
            limiter.hit(limit, f"who:{principal.actor}:{tenant}", address)
        return principal

    setattr(dependency, SCOPES_ATTR, tuple(scopes))
    return Depends(dependency)


# A verification that may fetch the JWKS runs in a worker thread, so a slow
# identity provider cannot stall the event loop; and under its own small limit,
# so verifications waiting on a blackholed JWKS endpoint (up to its timeout
# each) cannot take every thread that database and Vault work needs.
_JWKS_THREADS = 4


async def _verify_in_thread(request: Request, verifier: TokenVerifier, token: str) -> Principal:
    state = request.app.state
    threads = getattr(state, "jwks_threads", None)
    if threads is None:
        threads = state.jwks_threads = anyio.CapacityLimiter(_JWKS_THREADS)
    return await anyio.to_thread.run_sync(verifier.verify, token, limiter=threads)


def declared_scopes(dependency: Any) -> tuple[str, ...] | None:
    """The scopes a `require(...)` dependency demands, or None for anything else."""
    return getattr(dependency, SCOPES_ATTR, None)
