"""Signing in and out: OpenID Connect in production, a dev sign-in everywhere else."""

from __future__ import annotations

import contextlib
import hmac
import re
from datetime import timedelta
from typing import Annotated

import jwt
from fastapi import APIRouter, Query, Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.auth.tokens import mint_token
from broker.console import oidc, sessions
from broker.console.access import Visitor, check_form, current_session, signed_in
from broker.console.rendering import ConsoleRoute, render, see_other
from broker.console.security import Policy, origin_of, own_origin
from broker.core.config import Settings
from broker.core.errors import BrokerError, NotFound, UpstreamUnavailable
from broker.core.identifiers import TENANT_ID
from broker.deps import verifier_of
from broker.models import ConsoleSession, utcnow
from broker.tenants import service as tenants

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

# What the dev sign-in can be: the API's own scopes, bundled the way shops use them.
DEV_ROLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin": ("Tenant admin (everything in the shop)", (Scope.TENANT_ADMIN,)),
    "finance": ("Finance only (cards and payouts)", (Scope.FINANCE_VIEW, Scope.FINANCE_MANAGE)),
    "viewer": ("Read only", (Scope.INTEGRATIONS_VIEW, Scope.FINANCE_VIEW)),
}
_DEV_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
CALLBACK = "/console/auth/callback"


def dev_sign_in_available(settings: Settings) -> bool:
    """Only outside production, and only when the API itself verifies tokens with the HS256
    dev key (with a JWKS or public key configured, the dev key is not what it checks)."""
    return (
        settings.env != "production"
        and settings.jwt_hs256_secret is not None
        and not (settings.jwt_jwks_url or settings.jwt_public_key)
    )


def safe_next(value: str | None) -> str:
    """A console page to return to after sign-in; anything else (another site) is dropped."""
    if value and re.fullmatch(r"/console(/[A-Za-z0-9_./-]*)?", value) and "//" not in value:
        return value
    return "/console"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _idp(request: Request) -> oidc.IdentityProvider:
    state = request.app.state
    idp: oidc.IdentityProvider | None = getattr(state, "console_idp", None)
    if idp is None:
        idp = state.console_idp = oidc.IdentityProvider(_settings(request))
    return idp


def set_session_cookie(response: Response, settings: Settings, value: str, ttl: timedelta) -> None:
    """httpOnly (no script reads it), SameSite=Lax (sent on the IdP's redirect back, never
    on another site's post), Secure and `__Host-` outside dev."""
    response.set_cookie(
        sessions.cookie_name(settings),
        value,
        max_age=int(ttl.total_seconds()),
        path="/",
        secure=sessions.cookie_secure(settings),
        httponly=True,
        samesite="lax",
    )


def _sign_in_policy(request: Request) -> Policy:
    """The OpenID Connect button's post is answered with a redirect to the provider's
    authorization endpoint: its origin (and the issuer's) may be a form's target."""
    settings = _settings(request)
    if not (oidc.configured(settings) and settings.console_oidc_issuer):
        return Policy()
    targets = {origin_of(settings.console_oidc_issuer)}
    endpoint = _idp(request).authorization_endpoint()
    if endpoint:
        targets.add(origin_of(endpoint))
    return Policy(form_targets=tuple(sorted(targets)))


def _page(
    request: Request,
    row: ConsoleSession,
    *,
    next_path: str,
    error: str | None = None,
    status: int = 200,
) -> Response:
    settings = _settings(request)
    return render(
        request,
        "signin.html",
        visitor=None,
        status=status,
        policy=_sign_in_policy(request),
        csrf_token=row.csrf_token,
        next_path=next_path,
        dev=dev_sign_in_available(settings),
        oidc=oidc.configured(settings),
        roles={key: title for key, (title, _) in DEV_ROLES.items()},
        error=error,
    )


@router.get("/sign-in", name="console_sign_in")
async def sign_in_page(
    request: Request, next: Annotated[str | None, Query(max_length=300)] = None
) -> Response:
    """The sign-in page; it opens a pending session that carries the form's CSRF token."""
    row = await current_session(request)
    if row is not None and row.status == "active":
        return see_other(safe_next(next))
    if oidc.configured(_settings(request)):
        # Known before the page is drawn, so its policy lets the button's redirect through;
        # a provider that does not answer now is reported when the button is pressed.
        with contextlib.suppress(UpstreamUnavailable):
            await run_in_threadpool(_idp(request).discovery)
    if row is not None:
        return _page(request, row, next_path=safe_next(next))
    started = await run_in_threadpool(lambda: sessions.open_pending(_engine(request), now=utcnow()))
    response = _page(request, started.row, next_path=safe_next(next))
    set_session_cookie(response, _settings(request), started.cookie, sessions.PENDING_TTL)
    return response


async def _pending(request: Request) -> ConsoleSession | None:
    """The browser's pending session, after checking the posted form belongs to it."""
    row = await current_session(request)
    if row is None or row.status != "pending":
        return None
    await check_form(request, row.csrf_token)
    return row


@router.post("/sign-in/dev", name="console_dev_sign_in")
async def dev_sign_in(request: Request) -> Response:
    """Outside production: sign in as a made-up user of a tenant, with a chosen role."""
    settings = _settings(request)
    dev_key = settings.jwt_hs256_secret
    if dev_key is None or not dev_sign_in_available(settings):
        raise NotFound("the dev sign-in exists only outside production")
    row = await _pending(request)
    if row is None:
        return see_other("/console/sign-in")
    form = await request.form()
    tenant_id, role, name = (str(form.get(k) or "").strip() for k in ("tenant_id", "role", "name"))
    next_path = safe_next(str(form.get("next") or ""))
    name = name or "console-dev"
    if role not in DEV_ROLES or not TENANT_ID.fullmatch(tenant_id) or not _DEV_NAME.fullmatch(name):
        error = (
            "Choose a role, a tenant id (lowercase letters, digits and inner hyphens)"
            " and a simple user name."
        )
        return _page(request, row, next_path=next_path, error=error, status=422)
    try:
        await run_in_threadpool(tenants.require_live, _engine(request), tenant_id=tenant_id)
    except NotFound:
        error = "There is no tenant with that id."
        return _page(request, row, next_path=next_path, error=error, status=422)
    ttl = timedelta(seconds=settings.console_session_ttl_s)
    token = mint_token(
        dev_key.get_secret_value(),
        subject=name,
        scopes=DEV_ROLES[role][1],
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        tenant_id=tenant_id,
        ttl_s=int(ttl.total_seconds()),
    )
    # The token goes through the API's own verifier and is then forgotten: the session
    # keeps what it says, the browser only a reference to the session.
    principal = await run_in_threadpool(verifier_of(request).verify, token)
    return await _signed_in(request, row, principal, ttl=ttl, next_path=next_path, method="dev")


async def _signed_in(
    request: Request,
    previous: ConsoleSession | None,
    principal: Principal,
    *,
    ttl: timedelta,
    next_path: str,
    method: str,
    token_ttl: timedelta | None = None,
) -> Response:
    settings = _settings(request)
    now = utcnow()
    expires = now + (token_ttl if token_ttl is not None else ttl)

    def store() -> sessions.Started:
        return sessions.begin(
            _engine(request),
            pending=previous,
            principal=principal,
            token_expires_at=expires,
            ttl=ttl,
            now=now,
            method=method,
        )

    started = await run_in_threadpool(store)
    response = see_other(next_path)
    set_session_cookie(response, settings, started.cookie, started.row.expires_at - now)
    return response


@router.post("/sign-in/oidc", name="console_oidc_sign_in")
async def oidc_sign_in(request: Request) -> Response:
    """Start an OpenID Connect login: to the identity provider, with state, nonce and PKCE."""
    settings = _settings(request)
    if not oidc.configured(settings):
        raise NotFound("no identity provider is configured (BROKER_CONSOLE_OIDC_*)")
    row = await _pending(request)
    if row is None:
        return see_other("/console/sign-in")
    form = await request.form()
    next_path = safe_next(str(form.get("next") or ""))
    redirect_uri = own_origin(request, settings) + CALLBACK
    login = await run_in_threadpool(_idp(request).start, redirect_uri)

    def remember() -> None:
        sessions.remember_login(
            _engine(request),
            row,
            state=login.state,
            nonce=login.nonce,
            verifier=login.verifier,
            next_path=next_path,
        )

    await run_in_threadpool(remember)
    return see_other(login.url)


@router.get(CALLBACK.removeprefix("/console"), name="console_oidc_callback")
async def oidc_callback(
    request: Request,
    code: Annotated[str | None, Query(max_length=2000)] = None,
    state: Annotated[str | None, Query(max_length=200)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Where the identity provider sends the browser back: check state, exchange the code."""
    settings = _settings(request)
    if not oidc.configured(settings):
        raise NotFound("no identity provider is configured (BROKER_CONSOLE_OIDC_*)")
    row = await current_session(request)
    if (
        row is None
        or row.status != "pending"
        or row.oidc_state_hash is None
        or row.pkce_verifier is None
        or row.oidc_nonce is None
    ):
        # Not started in this browser (or long ago): a login someone else began is
        # never finished here (login CSRF).
        return see_other("/console/sign-in")
    next_path = row.next_path or "/console"
    if error is not None or not code or not state:
        return _page(request, row, next_path=next_path, status=400, error=_refusal(error))
    if not _same(sessions.hash_state(state), row.oidc_state_hash):
        return _page(
            request, row, next_path=next_path, status=400, error="That sign-in link is stale."
        )
    redirect_uri = own_origin(request, settings) + CALLBACK
    try:
        answer = await run_in_threadpool(
            _idp(request).finish,
            redirect_uri,
            code=code,
            verifier=row.pkce_verifier,
            nonce=row.oidc_nonce,
        )
        principal = await run_in_threadpool(verifier_of(request).verify, answer.access_token)
    except oidc.SignInFailed as failed:
        return _page(request, row, next_path=next_path, status=400, error=failed.message)
    except BrokerError as refused:
        if refused.status not in (401, 403):
            raise
        message = "Your account cannot use the console (its token was refused)."
        return _page(request, row, next_path=next_path, status=403, error=message)
    if principal.subject != answer.subject:
        error = "The identity provider's tokens name different users."
        return _page(request, row, next_path=next_path, status=400, error=error)
    exp = token_lifetime(answer.access_token)
    return await _signed_in(
        request,
        row,
        principal,
        ttl=timedelta(seconds=settings.console_session_ttl_s),
        next_path=next_path,
        method="oidc",
        token_ttl=exp,
    )


def token_lifetime(token: str) -> timedelta:
    """How long the access token (verified just before) has left."""
    claims = jwt.decode(token, options={"verify_signature": False})
    left = float(claims.get("exp", 0)) - utcnow().timestamp()
    return timedelta(seconds=max(0.0, left))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _refusal(error: str | None) -> str:
    if error == "access_denied":
        return "Sign-in was cancelled at the identity provider."
    return "The identity provider did not sign you in; try again."


@router.post("/sign-out", name="console_sign_out")
async def sign_out(request: Request, visitor: Annotated[Visitor, signed_in()]) -> Response:
    """End the session here and in the browser."""
    row = await current_session(request)
    if row is not None:
        await run_in_threadpool(sessions.close, _engine(request), row)
    response = see_other("/console/sign-in")
    settings = _settings(request)
    response.delete_cookie(
        sessions.cookie_name(settings),
        path="/",
        secure=sessions.cookie_secure(settings),
        httponly=True,
        samesite="lax",
    )
    return response


@router.get("", name="console_home")
async def home(request: Request, visitor: Annotated[Visitor, signed_in()]) -> Response:
    """The sections this user may open."""
    return render(request, "home.html", visitor=visitor)
