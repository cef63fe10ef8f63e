"""HTTP plumbing shared by every route: request context, problem+json errors, metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.audit import denials, trail
from broker.audit.denials import DenialTally
from broker.core import context
from broker.core.errors import BrokerError, RateLimited, TooManyFailures, UpstreamUnavailable
from broker.core.ratelimit import client_address

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,100}$")
_PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}


class FieldProblem(BaseModel):
    """One rejected input: where it is, and why (never the value)."""

    field: str
    message: str


class Problem(BaseModel):
    """The one error body: RFC 9457 problem details plus the request id."""

    # Errors may add members of their own (e.g. `connection_test`).
    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    request_id: str | None = None
    errors: list[FieldProblem] | None = None


# The errors any operation may answer, whatever its route declares.
_ANY_OPERATION = {
    413: "The request body is too large to be inspected for card data",
    422: "Invalid input, or raw card data (refused before any route sees it)",
}
_WITH_BODY = {400: "The request body cannot be parsed"}
_AUTHENTICATED = {
    400: "More than one Authorization header",
    401: "No bearer token, or one that fails verification",
    403: "The token lacks the scope this needs, or names no tenant",
    429: "Too many requests; retry after Retry-After",
    503: "Vault or the database is unavailable; retry after Retry-After",
}


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one error body shape: RFC 9457 problem details plus the request id."""
    ctx = context.current()
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if ctx is not None:
        body["request_id"] = ctx.request_id
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def problem_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the errors a route itself raises, answered as problem+json."""
    return {
        status: {"description": text, "content": {PROBLEM: {"schema": _PROBLEM_SCHEMA}}}
        for status, text in described.items()
    }


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Document, in place, the problem+json errors that every operation can answer.

    FastAPI documents a 422 as `application/json` with its own error shape,
    while the handlers below answer `application/problem+json` in another one;
    and the auth, rate-limit and outage errors come from shared dependencies
    no route declares. Route-specific errors (404, 409, 412) stay with their
    routes, through `problem_responses`.
    """
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(schema.pop("$defs", {}), Problem=schema)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            described = dict(_ANY_OPERATION)
            if "requestBody" in operation:
                described |= _WITH_BODY
            if operation.get("security"):
                for status, text in _AUTHENTICATED.items():
                    if status in described:  # a 400 for the body, or for the headers
                        text = f"{described[status]}, or {text[0].lower()}{text[1:]}"
                    described[status] = text
            responses = operation.setdefault("responses", {})
            for status, text in described.items():
                response = responses.setdefault(str(status), {"description": text})
                if response["description"] == "Validation Error":  # FastAPI's own 422
                    response["description"] = text
                response["content"] = {PROBLEM: {"schema": dict(_PROBLEM_SCHEMA)}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


class Metrics:
    """Prometheus metrics for one app (its own registry, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            registry=self.registry,
        )


class RequestContextMiddleware:
    """Binds a request id and client address to each request, and measures it.

    A pure ASGI middleware (not BaseHTTPMiddleware) so the ContextVar it sets
    flows into the route and into the worker threads of sync routes.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, trusted_proxies: list[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else str(uuid.uuid4())
        client = scope.get("client")
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1") or None
        address = client_address(client[0] if client else None, forwarded, self.trusted_proxies)
        context.bind(
            context.RequestContext(
                request_id=request_id, client_addr=address, vault_budget=context.VaultBudget()
            )
        )
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - started)


def install_error_handlers(app: FastAPI) -> None:
    """Turn every error into one problem+json shape, with no internals in it, and document it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(BrokerError)
    async def broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        if exc.status in (401, 403) or isinstance(exc, TooManyFailures):
            # First: past the denial limit, the answer becomes a 429.
            exc = await run_in_threadpool(_record_denial, request, exc)
        headers: dict[str, str] = {}
        if isinstance(exc, UpstreamUnavailable | RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="broker"'
        if exc.status >= 500:
            log.error(
                "request failed",
                extra={"fields": {"error": type(exc).__name__, "detail": exc.message}},
            )
        return problem(exc.status, exc.title, exc.message, headers=headers or None, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Pydantic's default error carries the rejected input; it may be a
        # secret, so only the location and the message are returned.
        errors = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "message": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        fields = ", ".join(e["field"] or "body" for e in errors[:5])
        return problem(422, "Validation failed", f"invalid input: {fields}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return problem(exc.status_code, detail, detail, headers=dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return problem(500, "Internal error", "the broker failed; the request id identifies it")


def _record_denial(request: Request, exc: BrokerError) -> BrokerError:
    """Record a 401 or 403 in the trail, and return the error to answer.

    403s count against the `denials` limit, per principal (per address when
    the token named none). Past it the caller gets a 429 and the denial is
    only counted, to be written with the others of its window as one event;
    so are failed authentications past the `auth_failures` limit.
    """
    state = request.app.state
    principal = getattr(request.state, "principal", None)
    engine = getattr(state, "engine", None)
    template = getattr(request.scope.get("route"), "path", None)
    action = f"{request.method} {template or request.url.path}"
    tally: DenialTally | None = getattr(state, "denials", None)
    closed = tally.closed() if tally is not None else []
    answer = exc
    if isinstance(exc, TooManyFailures) and tally is not None:
        closed += tally.add(
            principal=None,
            action=action,
            resource=template or "unmatched",
            status=exc.failure.status,
            reason=exc.failure.message,
        )
    elif exc.status == 403 and tally is not None:
        ctx = context.current()
        key = f"who:{principal.actor}" if principal else f"addr:{ctx.client_addr if ctx else None}"
        try:
            state.limiter.hit("denials", key)
        except RateLimited as limited:
            closed += tally.add(
                principal=principal,
                action=action,
                resource=template or "unmatched",
                status=exc.status,
                reason=exc.message,
            )
            answer = RateLimited(
                "too many denied requests; retry later", retry_after=limited.retry_after
            )
    if engine is None:
        return answer
    if answer is exc and not isinstance(exc, TooManyFailures):
        trail.record_separately(
            engine,
            action=action,
            resource=request.url.path,
            outcome="denied",
            principal=principal,
            detail={"status": exc.status, "reason": exc.message},
        )
    denials.write(engine, closed)
    return answer
