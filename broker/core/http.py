"""HTTP plumbing shared by every route: request context, problem+json errors, metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.core import context
from broker.core.errors import (
    BrokerError,
    RateLimited,
    TooManyFailures,
    UpstreamUnavailable,
    error_location,
    schema_names,
    unknown_field_message,
)
from broker.core.logging import redact_text, route_template
from broker.core.ratelimit import client_address

log = logging.getLogger(__name__)
access_log = logging.getLogger("broker.access")
security_log = logging.getLogger("broker.security")

PROBLEM = "application/problem+json"
# A caller's request id is echoed in the response and stored in the logs, the audit trail
# and Vault's audit log (whose audited headers are not HMAC-ed): only an id of this shape,
# with no card number or credential in it, is kept; any other gets a fresh one.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}
# The methods the access log and the metrics name; any other is "OTHER" (a caller's word).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
    """Prometheus metrics for one app (its own registries, so tests can build many apps).

    `registry` holds what is counted as it happens, which several workers add up;
    `local`, the collectors that read this process's state at scrape time (see
    `broker.core.metrics.exposition`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.local = CollectorRegistry()
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
        # The children of each (route, method, status), found once: `.labels()` checks and
        # looks them up under a lock on every call. As many as the registry holds anyway.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
        count, latency = children
        count.inc()
        latency.observe(seconds)


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
        request_id = valid_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
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
            template = route_template(scope) or "unmatched"
            method = scope["method"] if scope.get("method") in HTTP_METHODS else "OTHER"
            elapsed = time.perf_counter() - started
            self.metrics.observe(template, method, status, elapsed)
            # The access log names the route template, never the raw path or query string:
            # those are caller input, and may hold a card number or a token. One JSON line
            # (see broker.core.logging) with the request id and the authenticated actor.
            # Only the actor came from the caller: the redaction filter scans it and passes
            # the other fields, which the broker chose or checked, as they are.
            ctx = context.current()
            access_log.info(
                "%s %s %s",
                method,
                template,
                status,
                extra={
                    "fields": {
                        "method": method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                        "request_id": request_id,
                        "actor": ctx.actor if ctx is not None else None,
                    }
                },
            )


def valid_request_id(incoming: str) -> str:
    """The caller's request id if it has the accepted shape and no secret in it, else a new one."""
    if _REQUEST_ID.match(incoming) and redact_text(incoming) == incoming:
        return incoming
    return str(uuid.uuid4())


# What the app wires in to record refused requests (a 401, a 403, a lockout) in its audit
# trail: it returns the error to answer, which may become a 429 past the denial limit.
RefusalRecorder = Callable[[Request, BrokerError], BrokerError]


def install_error_handlers(app: FastAPI, *, record_refusal: RefusalRecorder | None = None) -> None:
    """Turn every error into one problem+json shape, with no internals in it, and document it.

    `record_refusal` is called (on a worker thread) for every 401 and 403 after it is logged.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.refusal_recorder = record_refusal
    app.add_exception_handler(BrokerError, _broker_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
    exc = await note_refusal(request, exc)
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


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Pydantic's default error carries the rejected input; it may be a secret, so only
    # the location and the message are returned, and the location names only names the
    # API declares (an unknown field's name may be a pasted secret too).
    known = _declared_names(request.app)
    body_field = getattr(request.scope.get("route"), "body_field", None)
    body_model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    errors = [_field_problem(err, exc.body, body_model, known) for err in exc.errors()]
    fields = ", ".join(e["field"] or "body" for e in errors[:5])
    return problem(422, "Validation failed", f"invalid input: {fields}", errors=errors)


def _field_problem(err: Any, body: Any, body_model: Any, known: frozenset[str]) -> dict[str, str]:
    """One rejected input as `{"field", "message"}`, never quoting the input."""
    loc = tuple(err.get("loc", ()))
    in_body = loc[:1] == ("body",)
    message = err.get("msg", "")
    if err.get("type") == "extra_forbidden":
        message = unknown_field_message(body_model if in_body else None, loc[1:-1])
    elif in_body and err.get("type") == "json_invalid":
        # FastAPI puts the character offset where a field name goes. The decoder's
        # own reason ("Expecting ',' delimiter") never quotes the input.
        reason = str((err.get("ctx") or {}).get("error") or "malformed")
        where = f", at character {loc[1]}" if len(loc) > 1 else ""
        return {"field": "", "message": f"not valid JSON: {reason}{where}"}
    elif in_body and len(loc) == 1 and isinstance(body, bytes | bytearray):
        # Without a JSON Content-Type FastAPI does not parse the body at all.
        message = "the body must be JSON, sent with Content-Type: application/json"
    field = error_location(loc[1:] if in_body else loc, body if in_body else None, known=known)
    return {"field": field, "message": message}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    return problem(exc.status_code, detail, detail, headers=dict(exc.headers or {}) or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return problem(500, "Internal error", "the broker failed; the request id identifies it")


async def note_refusal(request: Request, exc: BrokerError) -> BrokerError:
    """Log and record a 401 or 403 (and a lockout); return the error to answer.

    Past the denial limit the answer becomes a 429. Any other error is returned as is.
    The API's handler and the console's pages both go through here.
    """
    if exc.status in (401, 403) or isinstance(exc, TooManyFailures):
        _warn_security_event(request, exc)
        recorder: RefusalRecorder | None = getattr(request.app.state, "refusal_recorder", None)
        if recorder is not None:
            return await run_in_threadpool(recorder, request, exc)
    return exc


# A locked-out address keeps failing as fast as it likes: one warning per address per
# minute says so without letting a guesser flood the log.
_LOCKOUT_WARN_EVERY_S = 60.0
_LOCKOUTS_REMEMBERED = 1024


def _warn_security_event(request: Request, exc: BrokerError) -> None:
    """Failed authentications, denials and lockouts are what an operator must notice."""
    ctx = context.current()
    if isinstance(exc, TooManyFailures):
        if not _first_lockout_warning(request, ctx.client_addr if ctx is not None else None):
            return
        event, reason = "authentication lockout", exc.failure.message
    elif exc.status == 401:
        event, reason = "authentication failed", exc.message
    else:
        event, reason = "access denied", exc.message
    security_log.warning(
        event,
        extra={
            "fields": {
                "event": event,
                "reason": reason,  # the broker's own words: never the token or its claims
                "route": route_template(request.scope) or "unmatched",
                "method": request.method,
                "client_addr": ctx.client_addr if ctx is not None else None,
            }
        },
    )


def _first_lockout_warning(request: Request, address: str | None) -> bool:
    """True when this address's lockout has not been warned about in the last minute."""
    warned: OrderedDict[str | None, float] | None = getattr(
        request.app.state, "lockout_warnings", None
    )
    if warned is None:
        warned = request.app.state.lockout_warnings = OrderedDict()
    now = time.monotonic()
    last = warned.get(address)
    if last is not None and now - last < _LOCKOUT_WARN_EVERY_S:
        return False
    warned[address] = now
    warned.move_to_end(address)
    while len(warned) > _LOCKOUTS_REMEMBERED:
        warned.popitem(last=False)
    return True


def _declared_names(app: FastAPI) -> frozenset[str]:
    names: frozenset[str] | None = getattr(app.state, "declared_names", None)
    if names is None:
        # The request locations FastAPI reports besides the parameter names themselves.
        names = schema_names(app.openapi()) | {"query", "path", "header", "cookie"}
        app.state.declared_names = names
    return names
