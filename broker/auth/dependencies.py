"""`require(...)`: the one dependency through which every route declares its scopes."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from broker.auth.principal import Principal
from broker.auth.tokens import TokenVerifier, bearer_token
from broker.core import context
from broker.core.errors import Forbidden, RateLimited, TooManyFailures, Unauthenticated
from broker.core.threads import run_on
from broker.deps import limiter_of, verifier_of

SCOPES_ATTR = "__broker_scopes__"
LIMIT_ATTR = "__broker_limit__"


class _Required(HTTPBearer):
    """The dependency `require(...)` returns: authenticate, then admit (see `require`).

    It is FastAPI's bearer scheme itself, so OpenAPI documents bearer auth for every
    route that uses it, with one dependency to resolve per request rather than a
    scheme and a dependency on it. It reads every Authorization header itself:
    FastAPI's HTTPBearer reads only the first and tolerates extra spaces, while
    `bearer_token` is strict, and a malformed header counts as a failed
    authentication.
    """

    def __init__(self, scopes: tuple[str, ...], limit: str | None) -> None:
        super().__init__(
            scheme_name="HTTPBearer",
            auto_error=False,
            description="A JWT carrying OAuth-style scopes.",
        )
        self.scopes = scopes
        self.limit = limit
        # Attached so a test (and the OpenAPI document) can prove what each route demands.
        setattr(self, SCOPES_ATTR, scopes)
        setattr(self, LIMIT_ATTR, limit)

    # Async on purpose: it runs on the request's own task, so the actor it
    # binds to the request context is visible to the route and its Vault calls.
    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        try:
            principal = await _authenticate(request, request.headers.getlist("authorization"))
        except Unauthenticated as failure:
            ctx = context.current()
            keys = [f"addr:{ctx.client_addr if ctx else None}"]
            if failure.subject:
                keys.append(f"sub:{failure.subject}")
            try:
                limiter_of(request).hit("auth_failures", *keys)
            except RateLimited as limited:
                raise TooManyFailures(failure, retry_after=limited.retry_after) from None
            raise
        return admit(request, principal, self.scopes, limit=self.limit)


async def _authenticate(request: Request, authorization: list[str]) -> Principal:
    """The principal of the request's one bearer token; raises Unauthenticated."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated("a bearer token is required")
    verifier = verifier_of(request)
    if verifier.may_block:  # a JWKS: only a remembered token is checked here
        return verifier.remembered(token) or await _verify_in_thread(request, verifier, token)
    return verifier.verify(token)


def require(*scopes: str, limit: str | None = None) -> Any:
    """A dependency that authenticates the caller and demands any one of `scopes`.

    With `limit`, the request also counts against that named rate limit, keyed
    by principal and tenant: one service's traffic never spends another's
    budget, whatever address they share. Failed authentication counts against
    the stricter `auth_failures` limit, per address (and per subject, for a
    genuinely signed but unusable token); past it, failures are answered 429,
    but a valid token is still served: other callers' failures behind the same
    proxy or NAT must not lock it out.

    The route's scopes are also attached to the dependency, so a test can prove
    that every route declares them.
    """
    if not scopes:
        raise ValueError("a route must require at least one scope")
    return Depends(_Required(tuple(scopes), limit))


def own_tenant(principal: Principal) -> str:
    """The tenant a user token acts in; a token that names none cannot reach tenant resources."""
    if principal.tenant_id is None:
        raise Forbidden("this token names no tenant")
    return principal.tenant_id


def admit(
    request: Request, principal: Principal, scopes: tuple[str, ...], *, limit: str | None
) -> Principal:
    """Let an authenticated principal through when it holds one of `scopes`, within `limit`.

    The second half of `require(...)`, shared with the console, whose principal comes
    from its session instead of an Authorization header.
    """
    context.update(actor=principal.actor, tenant_id=principal.tenant_id)
    request.state.principal = principal
    if not any(principal.has(scope) for scope in scopes):
        raise Forbidden(f"this needs one of the scopes: {', '.join(scopes)}")
    if limit is not None:
        tenant = request.path_params.get("tenant_id") or principal.tenant_id
        if principal.kind == "service" and tenant and not principal.may_serve(tenant):
            # Tenants outside the token share one budget: a service must not get a
            # fresh one, and an audited refusal, for every tenant id it makes up.
            tenant = "(not served)"
        limiter_of(request).hit(limit, f"who:{principal.actor}:{tenant}")
    return principal


# A verification that may fetch the JWKS runs in a worker thread, so a slow
# identity provider cannot stall the event loop; and under its own small limit,
# so verifications waiting on a blackholed JWKS endpoint (up to its timeout
# each) cannot take every thread that database and Vault work needs. A request
# finding them all taken waits for one no longer than it would wait on Vault.
_JWKS_THREADS = 4


async def _verify_in_thread(request: Request, verifier: TokenVerifier, token: str) -> Principal:
    state = request.app.state
    threads = getattr(state, "jwks_threads", None)
    if threads is None:
        threads = state.jwks_threads = anyio.CapacityLimiter(_JWKS_THREADS)
    return await run_on(
        threads,
        partial(verifier.verify, token),
        wait_s=state.settings.vault_retry_budget_s,
        retry_after_s=state.settings.retry_after_s,
    )


def declared_scopes(dependency: Any) -> tuple[str, ...] | None:
    """The scopes a `require(...)` dependency demands, or None for anything else."""
    return getattr(dependency, SCOPES_ATTR, None)


def declared_limit(dependency: Any) -> str | None:
    """The named rate limit a `require(...)` dependency counts against, if any."""
    return getattr(dependency, LIMIT_ATTR, None)
