"""Templates (Jinja2, autoescaped), and console routes whose errors are pages, not JSON."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from broker.console import nav
from broker.console.access import CSRF_FIELD, SignInRequired, Visitor
from broker.console.security import DEFAULT_POLICY, Policy, harden
from broker.core import context
from broker.core.errors import BrokerError, RateLimited, UpstreamUnavailable
from broker.core.http import note_refusal
from broker.models import utcnow

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"

# autoescape on for every template: a stored value is text, never markup.
_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def ago(value: datetime | None) -> str:
    """`5 minutes ago`, `in 2 hours`: how old or how near a moment is, for people."""
    if value is None:
        return "never"
    seconds = (value - utcnow()).total_seconds()
    future, amount = seconds > 0, abs(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if amount >= size:
            count = int(amount // size)
            text = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "in a moment" if future else "just now"


_env.filters["ago"] = ago


def render(
    request: Request,
    template: str,
    *,
    visitor: Visitor | None,
    status: int = 200,
    policy: Policy = DEFAULT_POLICY,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    """A page, with the console's security headers."""
    ctx = context.current()
    html = _env.get_template(template).render(
        path_for=request.app.url_path_for,
        visitor=visitor,
        sections=nav.visible(visitor),
        current=request.url.path,
        csrf_field=CSRF_FIELD,
        request_id=ctx.request_id if ctx else None,
        **values,
    )
    response = HTMLResponse(html, status_code=status, headers=headers)
    harden(response, policy)
    return response


def see_other(location: str) -> RedirectResponse:
    """Post, redirect, get: a form's answer is a redirect to the page that shows the outcome."""
    return RedirectResponse(location, status_code=303)


ERROR_TITLES = {
    400: "That form could not be read",
    403: "You don't have access to this",
    404: "Not found",
    409: "That changed in the meantime",
    412: "Changed by someone else",
    422: "That was not accepted",
    429: "Too many requests",
    501: "Not available here",
    503: "Temporarily unavailable",
}


class ConsoleRoute(APIRoute):
    """A console route: a missing session leads to sign-in, and a broker error to a page.

    Dependencies run inside the route handler, so errors from the access checks land
    here too. 401s and 403s are logged and audited exactly as the API's are.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                response = sign_in_redirect(request)
            except BrokerError as exc:
                response = await error_page(request, exc)
            except RequestValidationError:
                response = render(
                    request,
                    "error.html",
                    visitor=None,
                    status=400,
                    title=ERROR_TITLES[400],
                    message="Part of the form is missing or malformed. Go back and try again.",
                )
            harden(response)
            return response

        return guarded


def sign_in_redirect(request: Request) -> RedirectResponse:
    """To the sign-in page, remembering a page (never a form post) to come back to."""
    target = "/console/sign-in"
    if request.method == "GET" and request.url.path != "/console/sign-in":
        target += "?" + urlencode({"next": request.url.path})
    return see_other(target)


async def error_page(request: Request, exc: BrokerError) -> Response:
    """The error as a page: the broker's own message (never a secret), and what to do next."""
    exc = await note_refusal(request, exc)
    headers: dict[str, str] = {}
    if isinstance(exc, UpstreamUnavailable | RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status >= 500:
        log.error(
            "console request failed",
            extra={"fields": {"error": type(exc).__name__, "detail": exc.message}},
        )
    return render(
        request,
        "error.html",
        visitor=None,
        status=exc.status,
        headers=headers,
        title=ERROR_TITLES.get(exc.status, exc.title),
        message=exc.message,
    )
