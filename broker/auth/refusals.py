"""Failed authentications and denials, in the broker's audit trail.

The error handlers in `broker.core.http` log every 401 and 403 and hand it to the
recorder the app wires in (`install_error_handlers(app, record_refusal=...)`):
this one. Core knows nothing of the trail; the trail knows nothing of HTTP
error handling.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import State

from broker.audit import denials, trail
from broker.audit.denials import DenialTally, DeniedRun
from broker.auth.principal import Principal
from broker.core import context
from broker.core.errors import BrokerError, RateLimited, TooManyFailures
from broker.core.logging import route_template


def record_refusal(request: Request, exc: BrokerError) -> BrokerError:
    """Record a 401 or 403 in the trail, and return the error to answer.

    403s count against the `denials` limit, per principal (per address when
    the token named none). Past it the caller gets a 429 and the denial is
    only counted, to be written with the others of its window as one event;
    so are failed authentications past the `auth_failures` limit.
    """
    state = request.app.state
    principal: Principal | None = getattr(request.state, "principal", None)
    # Route templates, never the raw path: a refused request's path is caller input.
    template = route_template(request.scope) or "unmatched"
    action = f"{request.method} {template}"
    tally: DenialTally | None = getattr(state, "denials", None)
    closed = tally.closed() if tally is not None else []
    answer: BrokerError = exc
    if tally is not None:
        answer, counted = _count(state, tally, principal, exc, action=action, resource=template)
        closed += counted
    engine = getattr(state, "engine", None)
    if engine is None:
        return answer
    if answer is exc and not isinstance(exc, TooManyFailures):
        trail.record_separately(
            engine,
            action=action,
            resource=trail.route_resource(request.scope),
            path_tenant=_path_tenant(request),
            outcome="denied",
            principal=principal,
            detail={"status": exc.status, "reason": exc.message},
        )
    denials.write(engine, closed)
    return answer


def _count(
    state: State,
    tally: DenialTally,
    principal: Principal | None,
    exc: BrokerError,
    *,
    action: str,
    resource: str,
) -> tuple[BrokerError, list[DeniedRun]]:
    """The answer, and the runs the tally closed: a refusal past its limit is only counted."""
    if isinstance(exc, TooManyFailures):
        closed = tally.add(
            principal=None,
            action=action,
            resource=resource,
            status=exc.failure.status,
            reason=exc.failure.message,
        )
        return exc, closed
    if exc.status != 403:
        return exc, []
    ctx = context.current()
    key = f"who:{principal.actor}" if principal else f"addr:{ctx.client_addr if ctx else None}"
    try:
        state.limiter.hit("denials", key)
    except RateLimited as limited:
        closed = tally.add(
            principal=principal, action=action, resource=resource, status=403, reason=exc.message
        )
        return RateLimited(
            "too many denied requests; retry later", retry_after=limited.retry_after
        ), closed
    return exc, []


def _path_tenant(request: Request) -> str | None:
    """The tenant id in the request's path, unvalidated; the trail decides whether to keep it."""
    value = (request.scope.get("path_params") or {}).get("tenant_id")
    return value if isinstance(value, str) else None
