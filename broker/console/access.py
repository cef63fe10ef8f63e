"""Who may see a console page: the API's own scopes, checked on the session's principal.

A page names the API route alias whose scopes it shares (`page(SettingsReader)`), so the
console can never demand less than the API, nor drift from it. The check itself is the
second half of `require(...)`, `admit`: the same scope test, rate limit and audit trail.
Form posts must also come from the console's own origin and carry the session's
synchronizer token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, get_args

from fastapi import Depends, Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from broker.auth.dependencies import LIMIT_ATTR, SCOPES_ATTR, admit, declared_limit, declared_scopes
from broker.auth.principal import Principal
from broker.console import sessions
from broker.console.security import same_origin_post
from broker.core.config import Settings
from broker.core.errors import Forbidden, Unauthenticated
from broker.models import ConsoleSession, utcnow

CSRF_FIELD = "csrf_token"


class SignInRequired(Unauthenticated):
    """No console session, or an expired one: the browser is sent to the sign-in page."""


class CrossSiteRefused(Forbidden):
    """A form post from another origin, or without this session's CSRF token."""


def api_scopes(alias: Any) -> tuple[tuple[str, ...], str | None]:
    """The scopes and rate limit an API alias such as `SettingsWriter` declares."""
    for meta in get_args(alias)[1:]:
        dependency = getattr(meta, "dependency", None)
        scopes = declared_scopes(dependency)
        if scopes:
            return scopes, declared_limit(dependency)
    raise ValueError(f"{alias!r} is not an API alias built with require(...)")


@dataclass(frozen=True)
class Visitor:
    """The signed-in user of one request, and the token their forms must carry."""

    principal: Principal
    csrf_token: str

    def may(self, alias: Any) -> bool:
        """Whether the user holds one of the scopes of that API alias (to show a link)."""
        scopes, _ = api_scopes(alias)
        return any(self.principal.has(scope) for scope in scopes)


def page(alias: Any) -> Any:
    """A dependency for a page (GET) that the API alias's scopes may see."""
    return _access(alias, form=False)


def form(alias: Any) -> Any:
    """A dependency for a form post (same origin, CSRF token) that the alias's scopes may send."""
    return _access(alias, form=True)


def signed_in() -> Any:
    """A dependency for pages every signed-in user may see (home, sign-out)."""

    async def dependency(request: Request) -> Visitor:
        return await _visitor(request, form=request.method == "POST")

    return Depends(dependency)


def _access(alias: Any, *, form: bool) -> Any:
    scopes, limit = api_scopes(alias)

    async def dependency(request: Request) -> Visitor:
        visitor = await _visitor(request, form=form)
        admit(request, visitor.principal, scopes, limit=limit)
        return visitor

    setattr(dependency, SCOPES_ATTR, scopes)
    setattr(dependency, LIMIT_ATTR, limit)
    return Depends(dependency)


async def current_session(request: Request) -> ConsoleSession | None:
    """The live session the request's cookie names, if any."""
    settings: Settings = request.app.state.settings
    cookie = request.cookies.get(sessions.cookie_name(settings))
    if not cookie:
        return None
    engine: Engine = request.app.state.engine
    return await run_in_threadpool(lambda: sessions.lookup(engine, cookie, now=utcnow()))


async def check_form(request: Request, expected: str) -> None:
    """Refuse a post from another origin, or one without the session's CSRF token."""
    settings: Settings = request.app.state.settings
    if not same_origin_post(request, settings):
        raise CrossSiteRefused("this form was not sent from the console's own page")
    sent = (await request.form()).get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CrossSiteRefused("this form has expired; reload the page and try again")


async def _visitor(request: Request, *, form: bool) -> Visitor:
    """The signed-in user of this request (and, for a form post, its CSRF token checked)."""
    row = await current_session(request)
    if row is None or row.status != "active":
        raise SignInRequired("sign in to continue")
    principal = sessions.principal_of(row)
    request.state.principal = principal
    if form:
        await check_form(request, row.csrf_token)
    return Visitor(principal, row.csrf_token)
