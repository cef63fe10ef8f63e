"""The "oauth" credential kind: connect through the provider's consent, refresh inside the broker.

Connect: an admin asks for an authorization URL (`start_connect`); it carries a
single-use `state`, bound to tenant, admin and account, of which PostgreSQL keeps
only a hash. The provider sends the browser back to the callback (`finish_connect`),
which checks the provider's signature over the query in constant time, consumes the
state, exchanges the code, tests the new access token and stores the token set
through the integrations write protocol (pending mark, KV check-and-set, T2), then
redirects to an allowlisted platform URL carrying only the outcome.

Refresh: a fetch that finds the access token expired (or about to) refreshes it
under a PostgreSQL advisory lock per credential, so replicas never spend one
refresh token twice; the new set is in Vault before anyone gets it. A lost reply
needs no special path: nothing was stored, and the provider keeps the previous
refresh token valid until its replacement is used, so the next fetch repeats the
refresh with it. `invalid_grant` marks the integration `needs_reconnect`. Within a
process, a gate lets one thread per credential (and a few credentials at once) go on
to the advisory lock, so waiters do not hold database connections the refresher
needs. `refresh_if_due` and `due_for_refresh` do the same ahead of expiry, for a job.

Migration: `migrate_to_expiring` exchanges a pasted long-lived token for an expiring
set (token exchange), under the same locks and through the same write protocol.

Token requests go through Authlib's OAuth2Client over the egress guard's transport.
No token, code, state or client secret appears in a message, log line or audit row.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
import psycopg.errors
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, delete, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import context
from broker.core.db import unit_of_work
from broker.core.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PreconditionFailed,
    UpstreamUnavailable,
    ValidationFailed,
)
from broker.events import outbox
from broker.integrations import service
from broker.integrations.egress import EgressFailed, EgressRefused, GuardedTransport
from broker.integrations.providers import (
    ConnectionResult,
    Credentials,
    OAuthSpec,
    ProviderSpec,
    get_provider,
    mask_hint,
)
from broker.models import IntegrationCredential, OAuthState
from broker.vault.errors import VaultUnavailable
from broker.vault.gateway import VaultGateway

with warnings.catch_warnings():
    # Authlib prefers httpx2 and warns when it falls back to httpx. The egress guard's
    # transport is an httpx one, and the two packages do not mix, so httpx it is.
    # (Importing authlib.deprecate installs its own "always" filter; this one goes first.)
    import authlib.deprecate

    warnings.simplefilter("ignore", authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client, OAuthError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Outcome = Literal["connected", "refused", "failed"]

_SAFE_CODE = re.compile(r"[a-z_]{1,40}", re.ASCII)


class ReconnectRequired(BrokerError):
    """The provider no longer honours the stored grant: the tenant must connect again."""

    status = 409
    title = "Reconnect required"


class OAuthNotConfigured(UpstreamUnavailable):
    """The platform's OAuth app or the broker's callback settings are missing."""

    title = "OAuth is not configured"


class ProviderUnavailable(UpstreamUnavailable):
    """The provider's token endpoint did not answer usefully; retrying may help."""

    title = "Provider unavailable"


class TokenRefused(Exception):
    """The token endpoint refused the request; `error` is its OAuth error code (safe to show)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class OAuthApp:
    """The platform's app at a provider, read from Vault; `repr` hides the secret."""

    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True)
class TokenSet:
    """One access token with its refresh token and both expiries; `repr` hides the tokens.

    A Meta business token has no refresh token (""), and may never expire (None).
    """

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: datetime | None
    refresh_expires_at: datetime | None
    scope: str = ""

    def fresh(self, now: datetime, margin: timedelta) -> bool:
        """True while the access token has more than `margin` left."""
        return self.access_expires_at is None or self.access_expires_at - margin > now

    def secrets(self) -> dict[str, str]:
        """What is sealed: the tokens there are."""
        sealed = {"access_token": self.access_token}
        if self.refresh_token:
            sealed["refresh_token"] = self.refresh_token
        return sealed

    def times(self) -> dict[str, str | None]:
        """Both expiries, for the sealed public part."""
        return {
            "access_expires_at": (
                self.access_expires_at.isoformat() if self.access_expires_at else None
            ),
            "refresh_expires_at": (
                self.refresh_expires_at.isoformat() if self.refresh_expires_at else None
            ),
        }


class RefreshGate:
    """Within one process: one thread per credential goes on to refresh, a few at a time.

    Threads waiting here hold no database connection, unlike those waiting on the
    advisory lock; so a burst of fetches at the expiry moment cannot take the whole
    connection pool away from the refresh they all wait for.
    """

    def __init__(self, concurrency: int = 4) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._slots = threading.BoundedSemaphore(concurrency)

    @contextmanager
    def hold(self, key: str, timeout_s: float) -> Iterator[None]:
        """Be the one thread working on `key`, waiting at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=timeout_s):
                raise _busy()
            try:
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise _busy()
                try:
                    yield
                finally:
                    self._slots.release()
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def _busy() -> UpstreamUnavailable:
    return UpstreamUnavailable(
        "another refresh of these credentials is still running; retry", retry_after=1
    )


@dataclass(frozen=True)
class OAuthAccess:
    """What the OAuth flows need from the app: stores, egress, settings and a clock."""

    engine: Engine
    vault: VaultGateway
    outbound: service.Outbound
    redirect_base_url: str | None
    return_urls: tuple[str, ...]
    state_ttl: timedelta
    refresh_margin: timedelta
    lock_timeout_s: float
    clock: Clock
    gate: RefreshGate = field(default_factory=RefreshGate)
    apps: dict[str, OAuthApp] | None = field(default=None, compare=False)
    """A job run's platform apps, read from Vault once per run; None (the API) reads them
    on every use, so a rotated client secret takes effect at once."""

    def redirect_uri(self, provider: str) -> str:
        """The callback the provider sends the browser to."""
        if not self.redirect_base_url:
            raise OAuthNotConfigured("the broker's public URL for OAuth callbacks is not set")
        return f"{self.redirect_base_url.rstrip('/')}/v1/oauth/callback/{provider}"


@dataclass(frozen=True)
class Authorization:
    """Where to send the admin's browser, and until when it may be used."""

    url: str
    expires_at: datetime


# -- the platform's app and the token client ------------------------------------------------


def oauth_spec(provider: str) -> tuple[ProviderSpec, OAuthSpec]:
    """The provider and its OAuth spec; NotFound for a provider without one."""
    spec = get_provider(provider)
    if spec.oauth is None:
        raise NotFound("this provider cannot be connected through OAuth")
    return spec, spec.oauth


def redirect_spec(provider: str) -> tuple[ProviderSpec, OAuthSpec]:
    """The provider and its OAuth spec, for the consent-URL-and-callback flow only."""
    spec, oauth = oauth_spec(provider)
    if oauth.flow != "redirect":
        raise NotFound(f"{spec.title} connects through its embedded signup, not a callback")
    return spec, oauth


def platform_app(vault: VaultGateway, oauth: OAuthSpec) -> OAuthApp:
    """The app's client id and secret from Vault KV (never from the environment)."""
    entry = vault.kv.read(oauth.client_path)
    data = entry.data if entry else {}
    client_id, client_secret = data.get("client_id"), data.get("client_secret")
    if not isinstance(client_id, str) or not isinstance(client_secret, str):
        raise OAuthNotConfigured(
            f"no OAuth app in Vault at {oauth.client_path} (fields client_id, client_secret)"
        )
    return OAuthApp(client_id, client_secret)


def _app(access: OAuthAccess, oauth: OAuthSpec) -> OAuthApp:
    """The platform app, from the run's cache when the access has one."""
    if access.apps is None:
        return platform_app(access.vault, oauth)
    app = access.apps.get(oauth.client_path)
    if app is None:
        app = access.apps[oauth.client_path] = platform_app(access.vault, oauth)
    return app


def _client(access: OAuthAccess, app: OAuthApp, *, redirect_uri: str | None = None) -> Any:
    policy = access.outbound.client.policy
    return OAuth2Client(
        client_id=app.client_id,
        client_secret=app.client_secret,
        token_endpoint_auth_method="client_secret_post",  # noqa: S106 - a method name
        redirect_uri=redirect_uri,
        transport=GuardedTransport(policy),
        timeout=policy.timeout_s,
        follow_redirects=False,
        trust_env=False,
    )


def _token_request(
    access: OAuthAccess, app: OAuthApp, title: str, call: Callable[[Any], Any]
) -> Mapping[str, Any]:
    """Run one token request; provider and transport failures become broker errors."""
    client = _client(access, app)
    try:
        token: Mapping[str, Any] = call(client)
        return token
    except OAuthError as exc:
        code = exc.error if isinstance(exc.error, str) and _SAFE_CODE.fullmatch(exc.error) else ""
        raise TokenRefused(code or _graph_error(exc.error)) from None
    except EgressRefused as exc:
        raise ProviderUnavailable(f"{title} is not a permitted egress target ({exc})") from None
    except (httpx.HTTPError, EgressFailed, ValueError):
        # httpx messages may carry the URL; only the provider's name is said.
        raise ProviderUnavailable(f"{title} did not answer the token request") from None
    finally:
        client.close()


@dataclass(frozen=True)
class _Answer:
    """A provider's answer to a token grant, with when it was asked (expiries count from
    then, never late) and the app that asked."""

    token: Mapping[str, Any]
    asked_at: datetime
    app: OAuthApp


def _grant(
    access: OAuthAccess,
    oauth: OAuthSpec,
    title: str,
    grant: Callable[[Any, OAuthApp], Any],
    *,
    app: OAuthApp | None = None,
) -> _Answer:
    """One token grant (code, refresh, exchange) as the platform's app."""
    asking = app or _app(access, oauth)
    asked_at = access.clock()
    token = _token_request(access, asking, title, lambda client: grant(client, asking))
    return _Answer(token, asked_at, asking)


def _account(oauth: OAuthSpec, public: Mapping[str, Any]) -> str:
    """The provider account a stored credential is for, from its public identifiers."""
    return str((public.get("identifiers") or {}).get(oauth.account_field) or "")


def _graph_error(error: object) -> str:
    """A safe name for Graph's error envelope `{"error": {"code", "error_subcode", ...}}`."""
    # Graph's message may quote the request; only the numeric codes are looked at.
    code = error.get("code") if isinstance(error, dict) else None
    if code == 100:
        return "invalid_code"  # subcodes 36007 (expired) and 36009 (already used)
    if code == 190:
        return "invalid_token"
    return "unrecognised_error"


def _token_set(oauth: OAuthSpec, answer: _Answer, title: str) -> TokenSet:
    """Map a token answer to a TokenSet; anything missing or odd is the provider's fault."""
    keys, token, now = oauth.mapping, answer.token, answer.asked_at
    access_token, refresh_token = token.get(keys.access_token), token.get(keys.refresh_token)
    expires_in, refresh_in = token.get(keys.expires_in), token.get(keys.refresh_expires_in)
    if (
        not isinstance(access_token, str)
        or not isinstance(refresh_token, str)
        or not isinstance(expires_in, int)
        or expires_in <= 0
        or not (refresh_in is None or isinstance(refresh_in, int))
    ):
        raise ProviderUnavailable(f"{title} answered without an expiring token and refresh token")
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token,
        access_expires_at=now + timedelta(seconds=expires_in),
        refresh_expires_at=now + timedelta(seconds=refresh_in) if refresh_in else None,
        scope=str(token.get(keys.scope) or ""),
    )


# -- connect --------------------------------------------------------------------------------


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _allowed_return_url(
    access: OAuthAccess,
    principal: Principal,
    tenant_id: str,
    provider: str,
    account: str,
    return_url: str | None,
) -> str:
    """The platform return URL the connect ends on: the one asked for, if it is configured."""
    if not access.return_urls:
        raise OAuthNotConfigured("no platform return URL is configured for OAuth")
    if return_url is None:
        return access.return_urls[0]
    if return_url not in access.return_urls:
        # An open-redirect attempt, or a misconfigured platform: either way, on record
        # (without the URL, which the request chose).
        trail.record_separately(
            access.engine,
            action="integration.oauth.start",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="denied",
            principal=principal,
            tenant_id=tenant_id,
            detail={"reason": "return_url_not_allowed", "account": account},
        )
        raise ValidationFailed(
            "return_url is not one of the platform's configured return URLs",
            errors=[{"field": "return_url", "message": "not an allowed return URL"}],
        )
    return return_url


def start_connect(
    access: OAuthAccess,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    account: str,
    return_url: str | None,
) -> Authorization:
    """An authorization URL with a fresh single-use state bound to tenant, admin and account."""
    spec, oauth = redirect_spec(provider)
    if not oauth.account_pattern.fullmatch(account):
        raise ValidationFailed(
            f"invalid {spec.title} account",
            errors=[{"field": "shop", "message": "must be a domain like example.myshopify.com"}],
        )
    account = account.lower()
    return_url = _allowed_return_url(access, principal, tenant_id, provider, account, return_url)
    redirect_uri = access.redirect_uri(provider)
    app = _app(access, oauth)
    state = secrets.token_urlsafe(32)
    now = access.clock()
    expires_at = now + access.state_ttl
    with unit_of_work(access.engine) as session:
        service.live_tenant(session, tenant_id)
        # States long expired are of no use, not even to recognise a replay.
        session.execute(
            delete(OAuthState).where(col(OAuthState.expires_at) < now - timedelta(days=1))
        )
        session.add(
            OAuthState(
                state_hash=_hash(state),
                tenant_id=tenant_id,
                provider=provider,
                actor=principal.actor,
                shop=account,
                return_url=return_url,
                created_at=now,
                expires_at=expires_at,
            )
        )
        trail.record(
            session,
            action="integration.oauth.start",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"account": account},
        )
    url = _authorization_url(access, app, oauth, account, state, redirect_uri)
    return Authorization(url=url, expires_at=expires_at)


def _authorization_url(
    access: OAuthAccess, app: OAuthApp, oauth: OAuthSpec, account: str, state: str, redirect: str
) -> str:
    """Where the admin's browser goes to grant the platform app access to `account`."""
    client = _client(access, app, redirect_uri=redirect)
    try:
        url, _ = client.create_authorization_url(
            oauth.authorize_url(access.outbound.endpoints, account),
            state=state,
            scope=oauth.scope_separator.join(oauth.scopes),
        )
    finally:
        client.close()
    return str(url)


def callback_signature(params: Iterable[tuple[str, str]], secret: str) -> str:
    """Shopify's HMAC-SHA256 (hex) over the callback query, without `hmac` and `signature`."""

    def escape(value: str, *, name: bool) -> str:
        value = value.replace("%", "%25").replace("&", "%26")
        return value.replace("=", "%3D") if name else value

    message = "&".join(
        f"{escape(name, name=True)}={escape(value, name=False)}"
        for name, value in sorted(params)
        if name not in ("hmac", "signature")
    )
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


@dataclass
class _Callback:
    """What the callback has established so far, for the audit event and the redirect."""

    provider: str
    tenant_id: str | None = None
    account: str | None = None
    return_url: str | None = None
    actor: str | None = None


class _Refused(Exception):
    def __init__(self, reason: str, outcome: Outcome = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome: Outcome = outcome


@dataclass(frozen=True)
class Finished:
    """Where the callback sends the browser, and whether the callback was refused."""

    location: str
    refused: bool


def finish_connect(access: OAuthAccess, *, provider: str, query: list[tuple[str, str]]) -> Finished:
    """Verify a provider's callback, exchange its code and store the tokens; then redirect.

    Every refusal stores nothing, is recorded in the audit trail, and still ends on a
    platform URL from the allowlist (never one named by the request).
    """
    seen = _Callback(provider)
    try:
        spec, oauth = redirect_spec(provider)
        if not access.return_urls:
            raise OAuthNotConfigured("no platform return URL is configured for OAuth")
        try:
            row, app = _verify_callback(access, oauth, query, seen)
            _connect(access, spec, oauth, app, row, query, seen)
        except UpstreamUnavailable as exc:
            raise _Refused(_reason_of(exc), "failed") from None
    except _Refused as refused:
        trail.record_separately(
            access.engine,
            action="integration.oauth.callback",
            resource=f"tenants/{seen.tenant_id or '-'}/integrations/{provider}",
            outcome="denied" if refused.outcome == "refused" else "failed",
            tenant_id=seen.tenant_id,
            detail={"reason": refused.reason, "account": seen.account},
        )
        location = _outcome_url(access, seen, refused.outcome, refused.reason)
        return Finished(location, refused=refused.outcome == "refused")
    return Finished(_outcome_url(access, seen, "connected", None), refused=False)


def _reason_of(exc: BrokerError) -> str:
    if isinstance(exc, OAuthNotConfigured):
        return "not_configured"
    if isinstance(exc, ProviderUnavailable):
        return "provider_unavailable"
    if isinstance(exc, VaultUnavailable):
        return "vault_unavailable"
    return "unavailable"


def _verify_callback(
    access: OAuthAccess, oauth: OAuthSpec, query: list[tuple[str, str]], seen: _Callback
) -> tuple[OAuthState, OAuthApp]:
    names = [name for name, _ in query]
    if len(names) != len(set(names)):
        raise _Refused("malformed")
    params = dict(query)
    if not all(params.get(name) for name in ("code", "hmac", "shop", "state", "timestamp")):
        raise _Refused("malformed")
    app = _app(access, oauth)
    expected = callback_signature(query, app.client_secret)
    # Constant time: a timing difference would let an attacker build a valid signature.
    if not hmac.compare_digest(expected.encode(), params["hmac"].lower().encode()):
        _attribute(access, params["state"], seen)
        raise _Refused("bad_signature")
    if not oauth.account_pattern.fullmatch(params["shop"]):
        raise _Refused("bad_account")
    seen.account = params["shop"].lower()
    return _consume_state(access, params["state"], seen), app


def _attribute(access: OAuthAccess, state: str, seen: _Callback) -> None:
    """For the audit event only: whose connect a forged callback names (nothing is consumed)."""
    try:
        with unit_of_work(access.engine) as session:
            row = session.get(OAuthState, _hash(state))
            if row is not None and row.provider == seen.provider:
                seen.tenant_id = row.tenant_id
    except BrokerError:
        pass


def _consume_state(access: OAuthAccess, state: str, seen: _Callback) -> OAuthState:
    """Mark the state used, once; refuse an unknown, used, expired or other-account one."""
    now = access.clock()
    with unit_of_work(access.engine) as session:
        row = session.get(OAuthState, _hash(state), with_for_update=True)
        if row is None or row.provider != seen.provider:
            reason = "unknown_state"
        else:
            seen.tenant_id, seen.return_url, seen.actor = row.tenant_id, row.return_url, row.actor
            if row.used_at is not None:
                reason = "replayed_state"
            elif row.expires_at <= now:
                reason = "expired_state"
            elif row.shop != seen.account:
                reason = "account_mismatch"
            else:
                reason = ""
            if row.used_at is None:
                # Whatever happens next, this state has been presented: it never works again.
                row.used_at = now
                session.add(row)
        if row is None or reason:
            session.commit()
            raise _Refused(reason)
        return row


def _exchange_code(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    app: OAuthApp,
    state: OAuthState,
    query: list[tuple[str, str]],
    seen: _Callback,
) -> TokenSet:
    """The token set the callback's code buys, refused unless every scope was granted."""
    code = dict(query)["code"]
    redirect_uri = access.redirect_uri(seen.provider)
    try:
        answer = _grant(
            access,
            oauth,
            spec.title,
            lambda client, _: client.fetch_token(
                oauth.token_url(access.outbound.endpoints, state.shop),
                code=code,
                redirect_uri=redirect_uri,
                **oauth.token_params,
            ),
            app=app,  # the one that checked the callback's signature
        )
    except TokenRefused:
        raise _Refused("code_refused", "failed") from None
    tokens = _token_set(oauth, answer, spec.title)
    granted = {s.strip() for s in tokens.scope.split(oauth.scope_separator) if s.strip()}
    if not set(oauth.scopes) <= granted:
        raise _Refused("scope_not_granted", "failed")
    return tokens


def _connect(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    app: OAuthApp,
    state: OAuthState,
    query: list[tuple[str, str]],
    seen: _Callback,
) -> None:
    tokens = _exchange_code(access, spec, oauth, app, state, query, seen)
    try:
        result = _test(access, spec, oauth, state.shop, tokens)
    except ValidationFailed:
        # The token does not look like one of this provider's: never store it.
        raise _Refused("unexpected_token", "failed") from None
    if not result.ok:
        raise _Refused(f"connection_test_{result.code}", "failed")
    context.restart_vault_budget()  # the code exchange and the test were Shopify's time
    # The admin who started the connect is the one who stored the tokens.
    principal = Principal(
        subject=state.actor.split(":", 1)[-1],
        kind="user",
        scopes=frozenset(),
        tenant_id=state.tenant_id,
    )
    try:
        service.store_token_set(
            access.engine,
            access.vault,
            principal=principal,
            tenant_id=state.tenant_id,
            provider=seen.provider,
            secrets=tokens.secrets(),
            identifiers={oauth.account_field: state.shop},
            public=_public(oauth, state.shop, tokens, principal, result),
            action="integration.oauth.connect",
            if_match=None,
            test=result,
        )
    except UpstreamUnavailable:
        raise
    except (Conflict, NotFound) as exc:
        reason = "store_conflict" if isinstance(exc, Conflict) else "no_tenant"
        raise _Refused(reason, "failed") from None
    except BrokerError:
        # Whatever else refused the write (tampered data, a precondition): the browser
        # still goes back to the platform, and the trail says it failed.
        raise _Refused("store_failed", "failed") from None


def _public(
    oauth: OAuthSpec,
    account: str,
    tokens: TokenSet,
    principal: Principal,
    result: ConnectionResult | None,
) -> dict[str, Any]:
    return {
        "kind": "oauth",
        "hints": {"access_token": mask_hint(tokens.access_token)},
        "identifiers": {oauth.account_field: account},
        "updated_by": principal.actor,
        "connection_test": "passed" if result is not None else "none",
        "scope": tokens.scope,
        **tokens.times(),
    }


def _test(
    access: OAuthAccess, spec: ProviderSpec, oauth: OAuthSpec, account: str, tokens: TokenSet
) -> ConnectionResult:
    creds = Credentials(
        spec.name, {oauth.account_field: account, "access_token": tokens.access_token}
    )
    return spec.connection_test(access.outbound.client, access.outbound.endpoints, creds)


def _outcome_url(access: OAuthAccess, seen: _Callback, outcome: Outcome, reason: str | None) -> str:
    # Only a URL from the allowlist, re-checked now: the state's, else the default.
    base = seen.return_url if seen.return_url in access.return_urls else None
    base = base or (access.return_urls[0] if access.return_urls else "/")
    params = {"integration": seen.provider, "outcome": outcome}
    if reason:
        params["reason"] = reason
    separator = "&" if urllib.parse.urlsplit(base).query else "?"
    return f"{base}{separator}{urllib.parse.urlencode(params)}"


# -- refresh on demand ----------------------------------------------------------------------


def stored_tokens(public: Mapping[str, Any], sealed: Mapping[str, str]) -> TokenSet:
    """The token set of an opened oauth record."""
    refresh_at, access_at = public.get("refresh_expires_at"), public.get("access_expires_at")
    return TokenSet(
        access_token=sealed["access_token"],
        refresh_token=sealed.get("refresh_token", ""),
        access_expires_at=datetime.fromisoformat(str(access_at)) if access_at else None,
        refresh_expires_at=datetime.fromisoformat(str(refresh_at)) if refresh_at else None,
        scope=str(public.get("scope") or ""),
    )


def current_tokens(
    access: OAuthAccess,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    version: int,
    public: Mapping[str, Any],
    sealed: Mapping[str, str],
    margin: timedelta | None = None,
) -> tuple[TokenSet, int]:
    """The stored token set if its access token has more than `margin` left, else a new one.

    One refresh per credential at a time, across every process: an advisory lock
    keyed by tenant and provider, waited for at most `lock_timeout_s`. Whoever
    waited finds the new set in Vault and does not refresh again.
    """
    spec, oauth = oauth_spec(provider)
    if not oauth.refreshable:
        return _unrefreshable(access, spec, principal, tenant_id, version, public, sealed)
    margin = access.refresh_margin if margin is None else margin
    tokens = stored_tokens(public, sealed)
    if tokens.fresh(access.clock(), margin):
        return tokens, version
    with _exclusive(access, tenant_id, provider) as session:
        row = session.get(IntegrationCredential, (tenant_id, provider))
        if row is not None and row.needs_reconnect:
            raise ReconnectRequired(_RECONNECT.format(title=spec.title), reconnect_required=True)
        # Someone may have refreshed while this one waited for the lock.
        record, sealed_now = service.read_sealed(
            access.vault, tenant_id=tenant_id, provider=provider
        )
        if record.public.get("kind") != "oauth":
            raise Conflict("the credentials changed while they were read; retry")
        tokens = stored_tokens(record.public, sealed_now)
        if tokens.fresh(access.clock(), margin):
            return tokens, record.version
        return _refresh(
            access, spec, oauth, principal, tenant_id, record.version, record.public, tokens
        )


def _unrefreshable(
    access: OAuthAccess,
    spec: ProviderSpec,
    principal: Principal,
    tenant_id: str,
    version: int,
    public: Mapping[str, Any],
    sealed: Mapping[str, str],
) -> tuple[TokenSet, int]:
    """A token nothing can renew: good until its own expiry, then the tenant reconnects.

    The row is read too: a connection test that found the token dead (Graph code 190)
    marked it, and a dead token is not handed out while PostgreSQL can say so.
    """
    tokens = stored_tokens(public, sealed)
    try:
        with unit_of_work(access.engine) as session:
            row = session.get(IntegrationCredential, (tenant_id, spec.name))
            marked = row is not None and row.needs_reconnect and row.kv_version == version
    except UpstreamUnavailable:
        # A PostgreSQL outage must not stop messaging: the token's expiry, sealed in
        # Vault, is still enforced below; only a mark set meanwhile goes unseen.
        marked = False
    if marked:
        raise ReconnectRequired(_RECONNECT.format(title=spec.title), reconnect_required=True)
    if not tokens.fresh(access.clock(), timedelta(0)):
        # Without PostgreSQL the mark waits for a later fetch; the answer does not.
        with suppress(UpstreamUnavailable):
            service.mark_needs_reconnect(
                access.engine,
                principal=principal,
                tenant_id=tenant_id,
                provider=spec.name,
                reason="token_expired",
            )
        raise ReconnectRequired(_RECONNECT.format(title=spec.title), reconnect_required=True)
    return tokens, version


def due_for_refresh(
    engine: Engine, *, provider: str, before: datetime, limit: int = 100
) -> list[str]:
    """Tenants whose OAuth access token for `provider` expires before `before`, soonest first.

    For a periodic job: refreshing them ahead of time keeps fetches off the slow path.
    Integrations that need a reconnect are left out; only the tenant can fix them.
    """
    with unit_of_work(engine) as session:
        return list(
            session.exec(
                select(IntegrationCredential.tenant_id)
                .where(IntegrationCredential.provider == provider)
                .where(IntegrationCredential.credential_kind == "oauth")
                .where(IntegrationCredential.needs_reconnect == False)  # noqa: E712
                .where(col(IntegrationCredential.token_expires_at) < before)
                .order_by(col(IntegrationCredential.token_expires_at))
                .limit(limit)
            )
        )


def refresh_if_due(
    access: OAuthAccess,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    within: timedelta,
) -> bool:
    """Refresh one credential whose access token expires within `within`.

    True when a newer token set is stored afterwards (this call's, or a concurrent one's).

    Idempotent, and safe beside fetches and other workers: it takes the same locks,
    and finds a token someone else refreshed meanwhile fresh enough.
    """
    try:
        record, sealed = service.read_sealed(access.vault, tenant_id=tenant_id, provider=provider)
    except NotFound:
        return False
    if record.public.get("kind") != "oauth":
        return False
    _, version = current_tokens(
        access,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        version=record.version,
        public=record.public,
        sealed=sealed,
        margin=within,
    )
    return version != record.version


_RECONNECT = (
    "the {title} connection was revoked or has expired; the tenant must reconnect it "
    "in the integration settings"
)


@contextmanager
def _exclusive(access: OAuthAccess, tenant_id: str, provider: str) -> Iterator[Session]:
    """Refresh or migrate one credential alone: this process's gate, then every process's lock.

    Yields the transaction that holds the advisory lock.
    """
    with (
        access.gate.hold(f"{tenant_id}/{provider}", access.lock_timeout_s),
        unit_of_work(access.engine) as session,
    ):
        _refresh_lock(session, tenant_id, provider, access.lock_timeout_s)
        # The wait for another refresh was not spent on Vault.
        context.restart_vault_budget()
        yield session


def _refresh_lock(session: Session, tenant_id: str, provider: str, timeout_s: float) -> None:
    """Take the credential's refresh lock for this transaction, waiting at most `timeout_s`."""
    # lock_timeout cannot be a bind parameter; it is a number formatted here.
    session.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'"))
    try:
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('oauth-refresh'), hashtext(:key))"),
            {"key": f"{tenant_id}/{provider}"},
        )
    except OperationalError as exc:
        if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
            raise _busy() from None
        raise


def _refresh(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    principal: Principal,
    tenant_id: str,
    version: int,
    public: Mapping[str, Any],
    tokens: TokenSet,
) -> tuple[TokenSet, int]:
    account = _account(oauth, public)
    answer = _request_refresh(access, spec, oauth, principal, tenant_id, version, account, tokens)
    new = _token_set(oauth, answer, spec.title)
    # Persisted (check-and-set against the version refreshed) before anyone uses it.
    try:
        stored = _store_renewed(
            access, oauth, principal, tenant_id, spec.name, account, new, version, "refresh"
        )
    except (Conflict, PreconditionFailed):
        # An admin saved or connected meanwhile: theirs stands; the next fetch reads it.
        raise UpstreamUnavailable(
            "the credentials changed during the refresh; retry", retry_after=1
        ) from None
    return new, stored


def _store_renewed(
    access: OAuthAccess,
    oauth: OAuthSpec,
    principal: Principal,
    tenant_id: str,
    provider: str,
    account: str,
    tokens: TokenSet,
    version: int,
    step: Literal["refresh", "migrate"],
) -> int:
    """Store a token set the provider renewed over the version it came from (check-and-set).

    Returns the new KV version.
    """
    # The provider has already rotated: the store must not fail for time it took.
    context.restart_vault_budget()
    stored = service.store_token_set(
        access.engine,
        access.vault,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        secrets=tokens.secrets(),
        identifiers={oauth.account_field: account},
        public=_public(oauth, account, tokens, principal, None),
        action=f"integration.oauth.{step}",
        if_match=service.etag_of(version),
        test=None,
    )
    return stored.kv_version


def _request_refresh(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    principal: Principal,
    tenant_id: str,
    version: int,
    account: str,
    tokens: TokenSet,
) -> _Answer:
    """The provider's answer to the refresh; a refusal is recorded and raised as what it means."""
    try:
        return _grant(
            access,
            oauth,
            spec.title,
            lambda client, _: client.refresh_token(
                oauth.token_url(access.outbound.endpoints, account),
                refresh_token=tokens.refresh_token,
            ),
        )
    except ProviderUnavailable as exc:
        _refresh_failed(access, principal, tenant_id, spec.name, version, "provider_unavailable")
        raise exc from None
    except TokenRefused as exc:
        if exc.error != "invalid_grant":
            _refresh_failed(
                access, principal, tenant_id, spec.name, version, exc.error or "refused"
            )
            raise ProviderUnavailable(f"{spec.title} refused the refresh ({exc.error})") from None
        service.mark_needs_reconnect(
            access.engine, principal=principal, tenant_id=tenant_id, provider=spec.name
        )
        raise ReconnectRequired(
            _RECONNECT.format(title=spec.title), reconnect_required=True
        ) from None


def _refresh_failed(
    access: OAuthAccess,
    principal: Principal,
    tenant_id: str,
    provider: str,
    version: int,
    reason: str,
) -> None:
    """Announce a refresh that failed for a reason a later try may not share (best effort)."""
    try:
        with unit_of_work(access.engine) as session:
            outbox.emit(
                session,
                outbox.REFRESH_FAILED,
                actor=principal.actor,
                tenant_id=tenant_id,
                provider=provider,
                version=version,
                state="refresh_failed",
                detail={"reason": reason},
            )
    except UpstreamUnavailable:
        log.warning("could not record a failed OAuth refresh event")


# -- migrating a pasted token ---------------------------------------------------------------

MigrationOutcome = Literal["migrated", "already_expiring", "not_configured", "would_migrate"]


@dataclass(frozen=True)
class Migration:
    """What migrating one tenant's pasted token did."""

    tenant_id: str
    outcome: MigrationOutcome
    version: int | None = None


def _exchange_pasted(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    principal: Principal,
    tenant_id: str,
    account: str,
    pasted: str,
) -> _Answer:
    """The expiring token set the provider gives for a pasted token; a refusal is recorded."""
    try:
        return _grant(
            access,
            oauth,
            spec.title,
            lambda client, _: client.fetch_token(
                oauth.token_url(access.outbound.endpoints, account),
                subject_token=pasted,
                **oauth.token_exchange,
                **oauth.token_params,
            ),
        )
    except TokenRefused as exc:
        _record_failure(access, principal, tenant_id, spec, "migrate", exc.error)
        # invalid_grant: the token itself is refused; others (invalid_client) are ours.
        hint = "; connect the account instead" if exc.error == "invalid_grant" else ""
        raise ValidationFailed(
            f"{spec.title} refused to exchange the stored token ({exc.error}){hint}"
        ) from None


def migrate_to_expiring(
    access: OAuthAccess,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    dry_run: bool = False,
) -> Migration:
    """Exchange a pasted non-expiring token for an expiring set, stored like a connect.

    The provider revokes the pasted token when it answers, so the answer is stored
    through the write protocol before anything else; a lost answer is recovered by
    repeating the exchange with the same pasted token, which Shopify answers with
    the same set for 7 days. Migrations and refreshes of one credential share one
    lock, so two operators (or a fetch) never run one at the same time.
    """
    spec, oauth = oauth_spec(provider)
    if not oauth.token_exchange:
        raise NotFound("this provider has no token exchange")
    with unit_of_work(access.engine) as session:
        service.live_tenant(session, tenant_id)
    try:
        record, _ = service.read_sealed(access.vault, tenant_id=tenant_id, provider=provider)
    except NotFound:
        return Migration(tenant_id, "not_configured")
    if record.public.get("kind") == "oauth":
        return Migration(tenant_id, "already_expiring", record.version)
    if dry_run:
        return Migration(tenant_id, "would_migrate", record.version)
    with _exclusive(access, tenant_id, provider):
        record, sealed = service.read_sealed(access.vault, tenant_id=tenant_id, provider=provider)
        if record.public.get("kind") == "oauth":
            return Migration(tenant_id, "already_expiring", record.version)
        account = _account(oauth, record.public)
        if not oauth.account_pattern.fullmatch(account):
            raise ValidationFailed(f"the stored {spec.title} account is not a valid one")
        answer = _exchange_pasted(
            access, spec, oauth, principal, tenant_id, account, sealed["access_token"]
        )
        tokens = _token_set(oauth, answer, spec.title)
        version = record.version
        stored = _store_renewed(
            access, oauth, principal, tenant_id, provider, account, tokens, version, "migrate"
        )
        return Migration(tenant_id, "migrated", stored)


@dataclass
class MigrationReport:
    """What a run over many tenants did; `failures` hold safe messages only."""

    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no tenant failed."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"outcomes": dict(self.outcomes), "failures": list(self.failures), "ok": self.ok}


def pasted_tenants(engine: Engine, *, provider: str) -> list[str]:
    """Tenants whose credentials for `provider` are a pasted token: what is left to migrate."""
    with unit_of_work(engine) as session:
        return list(
            session.exec(
                select(IntegrationCredential.tenant_id)
                .where(IntegrationCredential.provider == provider)
                .where(IntegrationCredential.configured == True)  # noqa: E712
                .where(IntegrationCredential.credential_kind == "static")
                .order_by(col(IntegrationCredential.tenant_id))
            )
        )


def migrate_tenants(
    access: OAuthAccess,
    *,
    principal: Principal,
    provider: str,
    tenant_ids: Iterable[str],
    dry_run: bool,
    on_done: Callable[[str, str], None] | None = None,
) -> MigrationReport:
    """Migrate each tenant in turn; one tenant's failure is reported, never fatal.

    Resumable by construction: a migrated tenant answers `already_expiring`.
    """
    report = MigrationReport()
    for tenant_id in tenant_ids:
        try:
            outcome: str = migrate_to_expiring(
                access, principal=principal, tenant_id=tenant_id, provider=provider, dry_run=dry_run
            ).outcome
        except BrokerError as exc:
            outcome = "failed"
            report.failures.append({"tenant_id": tenant_id, "error": exc.message})
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
        if on_done is not None:
            on_done(tenant_id, outcome)
    return report


# -- Meta's Embedded Signup -----------------------------------------------------------------


@dataclass(frozen=True)
class SignupResult:
    """What the platform's page got from Embedded Signup; `repr` hides the code."""

    code: str = field(repr=False)
    waba_id: str
    phone_number_id: str
    business_id: str


def _signup_tokens(
    access: OAuthAccess,
    spec: ProviderSpec,
    oauth: OAuthSpec,
    principal: Principal,
    tenant_id: str,
    signup: SignupResult,
) -> TokenSet:
    """The business token an Embedded Signup code buys; a refusal is recorded and final."""
    try:
        answer = _grant(
            access,
            oauth,
            spec.title,
            # Graph wants client_id, client_secret and code in a GET query, no redirect_uri.
            lambda client, app: client.fetch_token(
                oauth.token_url(access.outbound.endpoints, signup.waba_id),
                method="GET",
                auth=httpx.Auth(),
                code=signup.code,
                client_id=app.client_id,
                client_secret=app.client_secret,
            ),
        )
        token = answer.token.get(oauth.mapping.access_token)
        if not isinstance(token, str) or not token:
            raise ProviderUnavailable(f"{spec.title} answered the code without a token")
        expires_at = _token_expiry(access, oauth, spec.title, signup, token, answer)
    except TokenRefused as exc:
        _record_failure(access, principal, tenant_id, spec, "connect", exc.error)
        raise ValidationFailed(
            f"{spec.title} refused the signup code ({exc.error}): it lasts 30 seconds and "
            "works once; run the embedded signup again"
        ) from None
    return TokenSet(
        access_token=token,
        refresh_token="",
        access_expires_at=expires_at,
        refresh_expires_at=None,
        scope=oauth.scope_separator.join(oauth.scopes),
    )


def connect_embedded_signup(
    access: OAuthAccess,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    signup: SignupResult,
) -> IntegrationCredential:
    """Exchange an Embedded Signup code for the business token, check it and store it.

    The code dies after 30 s or one use, so a refusal is final: nothing is stored, the
    trail says why, and the admin runs the signup again.
    """
    spec, oauth = oauth_spec(provider)
    if oauth.flow != "embedded_signup":
        raise NotFound(f"{spec.title} connects through its consent URL, not an embedded signup")
    with unit_of_work(access.engine) as session:
        service.live_tenant(session, tenant_id)
    tokens = _signup_tokens(access, spec, oauth, principal, tenant_id, signup)
    result = _test(access, spec, oauth, signup.waba_id, tokens)
    if not result.ok:
        reason = f"connection_test_{result.code}"
        _record_failure(access, principal, tenant_id, spec, "connect", reason)
        raise ValidationFailed(f"the new {spec.title} token failed its test: {result.reason}")
    context.restart_vault_budget()  # the exchange and the checks were Meta's time
    identifiers = {
        oauth.account_field: signup.waba_id,
        "phone_number_id": signup.phone_number_id,
        "business_portfolio_id": signup.business_id,
    }
    public = _public(oauth, signup.waba_id, tokens, principal, result)
    public["identifiers"] = identifiers
    return service.store_token_set(
        access.engine,
        access.vault,
        principal=principal,
        tenant_id=tenant_id,
        provider=spec.name,
        secrets=tokens.secrets(),
        identifiers=identifiers,
        public=public,
        action="integration.oauth.connect",
        if_match=None,
        test=result,
    )


def _record_failure(
    access: OAuthAccess,
    principal: Principal,
    tenant_id: str,
    spec: ProviderSpec,
    step: Literal["connect", "migrate"],
    reason: str,
) -> None:
    """On record, in its own transaction: a connect or migration the provider refused."""
    trail.record_separately(
        access.engine,
        action=f"integration.oauth.{step}",
        resource=f"tenants/{tenant_id}/integrations/{spec.name}",
        outcome="failed",
        principal=principal,
        tenant_id=tenant_id,
        detail={"reason": reason},
    )


def _token_expiry(
    access: OAuthAccess,
    oauth: OAuthSpec,
    title: str,
    signup: SignupResult,
    token: str,
    answer: _Answer,
) -> datetime | None:
    """Ask Graph's debug_token about a new business token: valid, ours, for this WABA.

    Its expiry: `expires_in` of the exchange, else debug_token's `expires_at`; 0 or
    absent means it never expires.
    """
    app, now = answer.app, answer.asked_at
    base = oauth.base_url(access.outbound.endpoints, signup.waba_id).rstrip("/")
    query = urllib.parse.urlencode({"input_token": token})
    try:
        # The app token (id|secret) goes in a header, never in a URL.
        response = access.outbound.client.get(
            f"{base}/debug_token?{query}",
            headers={"Authorization": f"Bearer {app.client_id}|{app.client_secret}"},
        )
        body = response.json() if response.status_code == 200 else None
    except (EgressRefused, EgressFailed):
        raise ProviderUnavailable(f"{title} did not answer the token check") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ProviderUnavailable(f"{title} did not answer the token check")
    if data.get("is_valid") is not True or str(data.get("app_id")) != app.client_id:
        raise TokenRefused("invalid_token")
    # The page's ids are the browser's word: the token must be for that very WABA, or a
    # tenant could post its own code beside another customer's WABA id.
    grants = [
        grant
        for grant in data.get("granular_scopes") or []
        if isinstance(grant, dict) and grant.get("scope") == "whatsapp_business_management"
    ]
    # A grant without target_ids covers every asset the token can reach.
    if not any(
        "target_ids" not in grant or signup.waba_id in map(str, grant["target_ids"] or [])
        for grant in grants
    ):
        raise TokenRefused("waba_not_granted")
    expires_in, expires_at = answer.token.get(oauth.mapping.expires_in), data.get("expires_at")
    if isinstance(expires_in, int) and expires_in > 0:
        return now + timedelta(seconds=expires_in)
    if isinstance(expires_at, int) and expires_at > 0:
        return datetime.fromtimestamp(expires_at, now.tzinfo)
    return None
