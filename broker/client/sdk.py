"""The client SDK services use to fetch a tenant's credentials from the broker.

`BrokerClient` caches each lease in memory until shortly before it expires, lets
one caller per (tenant, provider) fetch while the others wait for that fetch,
retries outages with jittered backoff that honours `Retry-After`, and may serve
a recently expired lease during an outage within an explicit bound. In wrapped
mode the broker answers with a single-use Vault wrapping token, which the SDK
checks and unwraps directly against Vault.

No exception message or log line produced here contains a credential value or
a token.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import random
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Final, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential

__all__ = [
    "AccessDenied",
    "BrokerClient",
    "BrokerClientError",
    "BrokerUnavailable",
    "ChangeFollower",
    "CredentialsNotFound",
    "Lease",
    "OpenAICredentials",
    "ProviderCredentials",
    "ReconnectRequired",
    "ShopifyCredentials",
    "TwilioCredentials",
    "WhatsAppCredentials",
    "WooCommerceCredentials",
    "WrappingTokenTampered",
]

log = logging.getLogger(__name__)

WRAP_CREATION_PATH: Final = "sys/wrapping/wrap"
"""The only path a genuine broker wrapping token can come from."""

_TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
# Change-feed events after which a cached lease must not be served again.
_CHANGES: Final = frozenset(
    {
        "credential.saved",
        "credential.deleted",
        "credential.restored",
        "credential.rotated",
        "credential.reconnect_needed",
        "lease.revoked",
        "tenant.deleted",
    }
)
_USER_AGENT = "tenant-secrets-broker-sdk/0.1"


# ------------------------------------------------------------------------ errors


class BrokerClientError(Exception):
    """Base of every SDK error. Messages never contain credentials or tokens."""

    def __init__(
        self, message: str, *, status: int | None = None, request_id: str | None = None
    ) -> None:
        self.message = message
        self.status = status
        self.request_id = request_id
        super().__init__(message if request_id is None else f"{message} (request {request_id})")


class BrokerUnavailable(BrokerClientError):
    """The broker (or Vault) could not answer, after the retries allowed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.retry_after = retry_after


class CredentialsNotFound(BrokerClientError):
    """No such credentials, or a tenant the service token does not list (the broker's 404)."""


class AccessDenied(BrokerClientError):
    """The token is missing, invalid, expired, or lacks credentials:read (401/403)."""


class ReconnectRequired(BrokerClientError):
    """The provider revoked the tenant's OAuth connection: only the tenant can reconnect it.

    Retrying does not help; tell the tenant (the broker's integrations list says so too)."""


class WrappingTokenTampered(BrokerClientError):
    """The wrapping token did not come from `sys/wrapping/wrap`, was already used, or its
    content does not match what was asked for. Treat it as a security incident."""


# ------------------------------------------------------------------------ leases


@dataclasses.dataclass(frozen=True, eq=False)
class Lease:
    """A tenant's credentials for one provider, usable until `expires_at`."""

    tenant_id: str
    provider: str
    version: int
    fields: Mapping[str, str]
    issued_at: datetime
    expires_at: datetime
    lease_id: str | None = None
    """Set when the broker minted the key for this service (dynamic delivery); the key is
    revoked at `expires_at`, or earlier on demand."""

    def __repr__(self) -> str:
        return (
            f"Lease({self.tenant_id}/{self.provider} v{self.version}, "
            f"fields={sorted(self.fields)}, expires_at={self.expires_at.isoformat()})"
        )

    __str__ = __repr__


_SECRET: Final = {"secret": True}
C = TypeVar("C", bound="ProviderCredentials")


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class ProviderCredentials:
    """Base of the typed credentials; `repr` masks every secret field."""

    provider: ClassVar[str]
    version: int
    expires_at: datetime

    @classmethod
    def from_lease(cls, lease: Lease) -> Self:
        """Typed credentials from a lease; BrokerClientError when a required field is absent."""
        values: dict[str, Any] = {"version": lease.version, "expires_at": lease.expires_at}
        for spec in dataclasses.fields(cls):
            if spec.name in values:
                continue
            value = lease.fields.get(spec.name)
            if value is None and spec.default is dataclasses.MISSING:
                raise BrokerClientError(f"the {cls.provider} lease lacks {spec.name}")
            if value is not None:
                values[spec.name] = value
        return cls(**values)

    def __repr__(self) -> str:
        shown = []
        specs = dataclasses.fields(self)
        # The provider's fields first, then version and expiry.
        for spec in [*specs[2:], *specs[:2]]:
            value = getattr(self, spec.name)
            if spec.metadata.get("secret") and value is not None:
                shown.append(f"{spec.name}='****'")
            elif isinstance(value, datetime):
                shown.append(f"{spec.name}={value.isoformat()}")
            else:
                shown.append(f"{spec.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class TwilioCredentials(ProviderCredentials):
    """Twilio account SID and either the auth token (static delivery) or an API key minted
    for this service (dynamic delivery); `basic_auth()` is right in both."""

    provider: ClassVar[str] = "twilio"
    account_sid: str = dataclasses.field(metadata=_SECRET)
    auth_token: str | None = dataclasses.field(default=None, metadata=_SECRET)
    webhook_secret: str | None = dataclasses.field(default=None, metadata=_SECRET)
    api_key_sid: str | None = dataclasses.field(default=None, metadata=_SECRET)
    api_key_secret: str | None = dataclasses.field(default=None, metadata=_SECRET)

    def basic_auth(self) -> tuple[str, str]:
        """What Twilio's Basic auth takes: the API key when there is one, else the account."""
        if self.api_key_sid and self.api_key_secret:
            return self.api_key_sid, self.api_key_secret
        if self.auth_token:
            return self.account_sid, self.auth_token
        raise BrokerClientError("the twilio lease lacks auth_token")


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class WooCommerceCredentials(ProviderCredentials):
    """WooCommerce store URL, REST API key pair and optional webhook secret."""

    provider: ClassVar[str] = "woocommerce"
    store_url: str
    consumer_key: str = dataclasses.field(metadata=_SECRET)
    consumer_secret: str = dataclasses.field(metadata=_SECRET)
    webhook_secret: str | None = dataclasses.field(default=None, metadata=_SECRET)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class ShopifyCredentials(ProviderCredentials):
    """Shopify shop domain, Admin API access token and optional webhook secret."""

    provider: ClassVar[str] = "shopify"
    shop_domain: str
    access_token: str = dataclasses.field(metadata=_SECRET)
    webhook_secret: str | None = dataclasses.field(default=None, metadata=_SECRET)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class WhatsAppCredentials(ProviderCredentials):
    """WhatsApp Business Account id and Graph API access token."""

    provider: ClassVar[str] = "whatsapp"
    business_id: str = dataclasses.field(metadata=_SECRET)
    access_token: str = dataclasses.field(metadata=_SECRET)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class OpenAICredentials(ProviderCredentials):
    """OpenAI API key and optional organization and project ids."""

    provider: ClassVar[str] = "openai"
    api_key: str = dataclasses.field(metadata=_SECRET)
    org_id: str | None = dataclasses.field(default=None, metadata=_SECRET)
    project_id: str | None = dataclasses.field(default=None, metadata=_SECRET)


# ------------------------------------------------------------- wire formats


class _LeaseBody(BaseModel):
    tenant_id: str
    provider: str
    version: int
    fields: dict[str, str]
    issued_at: datetime
    expires_at: datetime
    lease_id: str | None = None


class _WrapBody(BaseModel):
    token: str
    creation_path: str


class _WrappedBody(BaseModel):
    tenant_id: str
    provider: str
    version: int
    wrap: _WrapBody


class _LookupBody(BaseModel):
    creation_path: str


class _FeedEvent(BaseModel):
    type: str
    tenant_id: str | None = None
    provider: str | None = None
    version: int | None = None
    detail: dict[str, Any] = {}


class _FeedPage(BaseModel):
    events: list[_FeedEvent]
    cursor: str


def _parse(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError:
        # A ValidationError's text quotes the input, which may be a secret.
        raise BrokerClientError(f"malformed {what}") from None


# ---------------------------------------------------------------------- cache


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A cached lease and when, on the client's clock, it expires."""

    lease: Lease
    expires_mono: float
    refresh_mono: float


# Revoked, deleted, disconnected or suspicious: the cached copy is never served again.
_FORGET_ON = (CredentialsNotFound, AccessDenied, WrappingTokenTampered, ReconnectRequired)


class _Flight:
    """One fetch in progress; other callers for the same key wait for its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: _Entry | None = None
        self.error: BaseException | None = None


class _RetryAfterBeyond(stop_base):
    """Stop when the server asks for a longer pause than we may wait: never retry early."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        return retry_after is not None and retry_after > self.limit_s


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _reconnect_required(response: httpx.Response) -> bool:
    """Whether a problem+json answer says the tenant must reconnect an OAuth connection."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("reconnect_required") is True


def _problem_detail(response: httpx.Response) -> str:
    """The broker's problem+json detail (safe by contract); nothing from other bodies."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        return f"HTTP {response.status_code}"
    return f"HTTP {response.status_code}: {detail[:200]}"


# --------------------------------------------------------------------- client


def _check_options(
    base_url: str,
    *,
    one_token_source: bool,
    unwrappable: bool,
    retry_attempts: int,
    durations_s: tuple[float, ...],
) -> None:
    """Refuse a client that could never work, before it makes a request."""
    if not one_token_source:
        raise ValueError("give exactly one of token or token_provider")
    if not unwrappable:
        raise ValueError("wrapped mode needs vault_addr, to unwrap directly against Vault")
    if retry_attempts < 1:
        raise ValueError("retry_attempts must be at least 1")
    if any(duration < 0 for duration in durations_s):
        raise ValueError("margins and backoffs must not be negative")
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise ValueError("base_url must be an http:// or https:// URL")


def _json_client(
    base_url: str,
    timeout_s: float,
    verify: ssl.SSLContext | str | bool,
    transport: httpx.BaseTransport | None,
) -> httpx.Client:
    """A JSON client for one origin that never follows a redirect elsewhere."""
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        headers={"Accept": "application/json", "User-Agent": _USER_AGENT},
        timeout=timeout_s,
        verify=verify,
        transport=transport,
        follow_redirects=False,
    )


class BrokerClient:
    """Fetches, caches and refreshes tenants' credentials from the broker. Thread-safe."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        token_provider: Callable[[], str] | None = None,
        vault_addr: str | None = None,
        wrapped: bool = False,
        wrap_ttl: str = "60s",
        refresh_margin_s: float = 30,
        max_stale_s: float = 0,
        retry_attempts: int = 4,
        backoff_base_s: float = 0.2,
        max_backoff_s: float = 10,
        timeout_s: float = 5,
        verify: ssl.SSLContext | str | bool = True,
        transport: httpx.BaseTransport | None = None,
        vault_transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_options(
            base_url,
            one_token_source=(token is None) != (token_provider is None),
            unwrappable=not wrapped or bool(vault_addr),
            retry_attempts=retry_attempts,
            durations_s=(refresh_margin_s, max_stale_s, max_backoff_s),
        )
        fixed = token
        self._token: Callable[[], str] = token_provider or (lambda: fixed or "")
        self._wrapped = wrapped
        self._wrap_ttl = wrap_ttl
        self._refresh_margin_s = refresh_margin_s
        self._max_stale_s = max_stale_s
        self._retry_attempts = retry_attempts
        self._max_backoff_s = max_backoff_s
        self._backoff = wait_random_exponential(multiplier=backoff_base_s, max=max_backoff_s)
        self._clock = clock
        self._timeout_s = timeout_s
        self._feed_cursor: str | None = None
        self._followers: list[ChangeFollower] = []
        # Two clients on purpose: the broker's bearer token must never reach Vault,
        # and a wrapping token must never reach the broker.
        self._http = _json_client(base_url, timeout_s, verify, transport)
        self._vault: httpx.Client | None = None
        if vault_addr:
            self._vault = _json_client(vault_addr, timeout_s, verify, vault_transport)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop following changes, close the HTTP connections and forget every cached lease."""
        for follower in self._followers:
            follower.stop(timeout_s=0)
        with self._lock:
            self._cache.clear()
        self._http.close()
        if self._vault is not None:
            self._vault.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --------------------------------------------------------------- getters

    def twilio(self, tenant_id: str) -> TwilioCredentials:
        """The tenant's Twilio credentials."""
        return TwilioCredentials.from_lease(self.lease(tenant_id, "twilio"))

    def woocommerce(self, tenant_id: str) -> WooCommerceCredentials:
        """The tenant's WooCommerce credentials."""
        return WooCommerceCredentials.from_lease(self.lease(tenant_id, "woocommerce"))

    def shopify(self, tenant_id: str) -> ShopifyCredentials:
        """The tenant's Shopify credentials."""
        return ShopifyCredentials.from_lease(self.lease(tenant_id, "shopify"))

    def whatsapp(self, tenant_id: str) -> WhatsAppCredentials:
        """The tenant's WhatsApp credentials."""
        return WhatsAppCredentials.from_lease(self.lease(tenant_id, "whatsapp"))

    def openai(self, tenant_id: str) -> OpenAICredentials:
        """The tenant's OpenAI credentials."""
        return OpenAICredentials.from_lease(self.lease(tenant_id, "openai"))

    def credentials(self, tenant_id: str, kind: type[C]) -> C:
        """Typed credentials of any provider, e.g. `credentials(t, TwilioCredentials)`."""
        return kind.from_lease(self.lease(tenant_id, kind.provider))

    # ----------------------------------------------------------------- cache

    def invalidate(self, tenant_id: str, provider: str) -> None:
        """Forget the cached lease, so the next call fetches (e.g. right after a save)."""
        key = (tenant_id, provider)
        with self._lock:
            self._cache.pop(key, None)
            # A fetch already under way may carry the old version: let it finish for
            # its waiters, but neither cache its result nor let new callers join it.
            self._flights.pop(key, None)

    def _invalidate_lease(self, tenant_id: str, provider: str, lease_id: str) -> None:
        """Forget the cached lease if it is the one revoked (a minted key now dead).

        A fetch under way may be handing out that very lease: it is not cached either.
        """
        key = (tenant_id, provider)
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry.lease.lease_id == lease_id:
                self._cache.pop(key, None)
                self._flights.pop(key, None)

    def invalidate_tenant(self, tenant_id: str) -> None:
        """Forget every cached lease of one tenant."""
        with self._lock:
            for key in [k for k in (*self._cache, *self._flights) if k[0] == tenant_id]:
                self._cache.pop(key, None)
                self._flights.pop(key, None)

    # ------------------------------------------------------------ change feed

    def poll_changes(self, *, wait_s: float = 25) -> int:
        """One round of the broker's change feed: drop cached leases whose credentials changed.

        Waits up to `wait_s` for a change (long-poll); returns how many events were read.
        The first call only finds the feed's current position. Raises the client's usual
        errors when the feed cannot be read; cached leases then live to their expiry.
        """
        params: dict[str, str | float] = {"wait": wait_s if self._feed_cursor else 0}
        if self._feed_cursor is not None:
            params["after"] = self._feed_cursor
        request_id = str(uuid.uuid4())
        try:
            response = self._http.get(
                "/v1/events",
                params=params,
                headers={"Authorization": f"Bearer {self._token()}", "X-Request-Id": request_id},
                timeout=wait_s + self._timeout_s,
            )
        except httpx.TransportError as exc:
            raise BrokerUnavailable(f"cannot reach the broker ({type(exc).__name__})") from None
        self._check(response, response.headers.get("X-Request-Id", request_id))
        try:
            page: _FeedPage = _parse(_FeedPage, response.json(), "change feed page")
        except ValueError:
            raise BrokerClientError("the broker sent no JSON", request_id=request_id) from None
        for event in page.events:
            if event.type not in _CHANGES or event.tenant_id is None:
                continue
            lease_id = event.detail.get("lease_id")
            if event.type == "lease.revoked" and event.provider and isinstance(lease_id, str):
                # Another service's lease ending says nothing about this one's key.
                self._invalidate_lease(event.tenant_id, event.provider, lease_id)
            elif event.provider is None:
                self.invalidate_tenant(event.tenant_id)
            else:
                self.invalidate(event.tenant_id, event.provider)
        self._feed_cursor = page.cursor
        return len(page.events)

    def follow_changes(self, *, wait_s: float = 25, retry_s: float = 5) -> ChangeFollower:
        """Follow the change feed on a daemon thread until `stop()` (or `close()`).

        A lease is dropped within one long-poll round of its credentials changing. While
        the feed cannot be read, the follower retries every `retry_s` and the cache falls
        back to lease expiry.
        """
        follower = ChangeFollower(self, wait_s=wait_s, retry_s=retry_s)
        self._followers.append(follower)
        follower.start()
        return follower

    def clear(self) -> None:
        """Forget every cached lease."""
        with self._lock:
            self._cache.clear()
            self._flights.clear()

    def lease(self, tenant_id: str, provider: str) -> Lease:
        """The tenant's current lease for `provider`, from the cache while it is fresh."""
        key = (tenant_id, provider)
        with self._lock:
            entry = self._cache.get(key)
            now = self._clock()
            if entry is not None and now < entry.refresh_mono:
                return entry.lease
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if entry is not None and now < entry.expires_mono:
                return entry.lease  # another caller is refreshing; this one is still valid
            flight.done.wait()
            return self._outcome(key, entry, flight)
        try:
            flight.entry = self._fetch(tenant_id, provider)
        except BaseException as exc:
            flight.error = exc
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
                    if flight.entry is not None:
                        self._cache[key] = flight.entry
                    elif isinstance(flight.error, _FORGET_ON):
                        # Revoked, deleted or suspicious: never serve the old copy again.
                        self._cache.pop(key, None)
            flight.done.set()
        return self._outcome(key, entry, flight)

    def _outcome(self, key: tuple[str, str], cached: _Entry | None, flight: _Flight) -> Lease:
        if flight.entry is not None:
            return flight.entry.lease
        error = flight.error
        if error is None:
            raise RuntimeError("a finished refresh holds neither a lease nor an error")
        if isinstance(error, BrokerUnavailable) and cached is not None:
            overdue = self._clock() - cached.expires_mono
            if overdue < 0:
                log.warning(
                    "broker unavailable; using the cached %s/%s lease v%d, valid %.0fs more",
                    *key,
                    cached.lease.version,
                    -overdue,
                )
                return cached.lease
            if overdue <= self._max_stale_s:
                log.warning(
                    "broker unavailable; serving the %s/%s lease v%d, expired %.0fs ago "
                    "(allowed: %.0fs)",
                    *key,
                    cached.lease.version,
                    overdue,
                    self._max_stale_s,
                )
                return cached.lease
        raise error

    # ------------------------------------------------------------------ fetch

    def _fetch(self, tenant_id: str, provider: str) -> _Entry:
        retrying = Retrying(
            stop=stop_any(
                stop_after_attempt(self._retry_attempts), _RetryAfterBeyond(self._max_backoff_s)
            ),
            wait=self._wait,
            retry=retry_if_exception_type(BrokerUnavailable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        entry: _Entry = retrying(self._fetch_once, tenant_id, provider)
        return entry

    def _wait(self, state: RetryCallState) -> float:
        """Jittered exponential backoff, never shorter than the server's Retry-After."""
        backoff = float(self._backoff(state))
        error = state.outcome.exception() if state.outcome else None
        retry_after: float | None = getattr(error, "retry_after", None)
        if retry_after is None:
            return backoff
        # Spread clients told the same Retry-After a little, so they do not return at once.
        spread = random.uniform(0, min(1.0, 0.1 * retry_after))  # noqa: S311 - jitter, not a secret
        return max(backoff, min(retry_after + spread, self._max_backoff_s), retry_after)

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "credential fetch failed (%s, attempt %d); retrying in %.2fs",
            getattr(error, "message", type(error).__name__),
            state.attempt_number,
            wait,
        )

    def _fetch_once(self, tenant_id: str, provider: str) -> _Entry:
        started = self._clock()
        path = (
            f"/v1/credentials/{urllib.parse.quote(tenant_id, safe='')}"
            f"/{urllib.parse.quote(provider, safe='')}"
        )
        params = {"wrap_ttl": self._wrap_ttl} if self._wrapped else None
        request_id = str(uuid.uuid4())
        try:
            response = self._http.get(
                path,
                params=params,
                headers={"Authorization": f"Bearer {self._token()}", "X-Request-Id": request_id},
            )
        except httpx.TransportError as exc:
            raise BrokerUnavailable(f"cannot reach the broker ({type(exc).__name__})") from None
        request_id = response.headers.get("X-Request-Id", request_id)
        self._check(response, request_id)
        try:
            body = response.json()
        except ValueError:
            raise BrokerClientError("the broker sent no JSON", request_id=request_id) from None
        if self._wrapped:
            lease = self._open_wrapped(body, tenant_id=tenant_id, provider=provider)
        else:
            parsed: _LeaseBody = _parse(_LeaseBody, body, "lease from the broker")
            if (parsed.tenant_id, parsed.provider) != (tenant_id, provider):
                raise BrokerClientError(
                    "the broker answered for other credentials", request_id=request_id
                )
            lease = _lease(parsed)
        duration = max(0.0, (lease.expires_at - lease.issued_at).total_seconds())
        # The deadline is on our own clock, from when we asked: immune to clock skew.
        margin = min(self._refresh_margin_s, duration / 2)
        return _Entry(lease, started + duration, started + duration - margin)

    @staticmethod
    def _check(response: httpx.Response, request_id: str) -> None:
        status = response.status_code
        if status == 200:
            return
        detail = _problem_detail(response)
        if status in _TRANSIENT_STATUSES:
            raise BrokerUnavailable(
                f"the broker is unavailable ({detail})",
                status=status,
                request_id=request_id,
                retry_after=_retry_after(response),
            )
        if status == 404:
            raise CredentialsNotFound(
                f"no such credentials ({detail})", status=status, request_id=request_id
            )
        if status in (401, 403):
            raise AccessDenied(
                f"the broker refused the token ({detail})", status=status, request_id=request_id
            )
        if status == 409 and _reconnect_required(response):
            raise ReconnectRequired(
                f"the tenant must reconnect ({detail})", status=status, request_id=request_id
            )
        raise BrokerClientError(
            f"the broker refused the request ({detail})", status=status, request_id=request_id
        )

    # ---------------------------------------------------------------- wrapping

    def _open_wrapped(self, body: Any, *, tenant_id: str, provider: str) -> Lease:
        """Check the wrapping token's origin, unwrap it once, and check what was inside."""
        vault = self._vault
        if vault is None:
            raise RuntimeError("wrapped leases need the Vault address (vault_addr)")
        wrapped: _WrappedBody = _parse(_WrappedBody, body, "wrapped lease from the broker")
        if (wrapped.tenant_id, wrapped.provider) != (tenant_id, provider):
            raise WrappingTokenTampered("the wrapped lease names other credentials")
        token = wrapped.wrap.token
        # Look the token up first (no auth needed, and it does not consume the token):
        # a token minted anywhere but sys/wrapping/wrap, e.g. a wrapped response of some
        # other Vault call, must be refused before it is unwrapped.
        response = self._vault_call(vault, "/v1/sys/wrapping/lookup", json={"token": token})
        if response.status_code == 400:
            raise WrappingTokenTampered("the wrapping token is invalid or was already used")
        self._vault_check(response)
        lookup: _LookupBody = _parse(
            _LookupBody, _vault_data(response), "wrapping token lookup from Vault"
        )
        if lookup.creation_path != WRAP_CREATION_PATH:
            raise WrappingTokenTampered(
                "the wrapping token was not created by sys/wrapping/wrap "
                f"(created by {lookup.creation_path[:100]!r})"
            )
        response = self._vault_call(
            vault, "/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": token}
        )
        if response.status_code == 400:
            # Someone unwrapped it between our lookup and our unwrap.
            raise WrappingTokenTampered("the wrapping token was already used")
        self._vault_check(response)
        inner: _LeaseBody = _parse(_LeaseBody, _vault_data(response), "unwrapped lease")
        if (inner.tenant_id, inner.provider, inner.version) != (
            tenant_id,
            provider,
            wrapped.version,
        ):
            raise WrappingTokenTampered("the unwrapped lease does not match the request")
        return _lease(inner)

    @staticmethod
    def _vault_call(vault: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return vault.post(path, **kwargs)
        except httpx.TransportError as exc:
            raise BrokerUnavailable(f"cannot reach Vault ({type(exc).__name__})") from None

    @staticmethod
    def _vault_check(response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in _TRANSIENT_STATUSES or status >= 500:
            raise BrokerUnavailable(
                f"Vault is unavailable (HTTP {status})",
                status=status,
                retry_after=_retry_after(response),
            )
        if status in (401, 403):
            raise WrappingTokenTampered(f"Vault refused the wrapping token (HTTP {status})")
        raise BrokerClientError(f"Vault refused the request (HTTP {status})", status=status)


def _vault_data(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        raise BrokerClientError("Vault sent no JSON") from None
    return body.get("data") if isinstance(body, dict) else None


def _lease(body: _LeaseBody) -> Lease:
    return Lease(
        tenant_id=body.tenant_id,
        provider=body.provider,
        version=body.version,
        fields=MappingProxyType(dict(body.fields)),
        issued_at=body.issued_at,
        expires_at=body.expires_at,
        lease_id=body.lease_id,
    )


class ChangeFollower:
    """A daemon thread running `BrokerClient.poll_changes` in a loop."""

    def __init__(self, client: BrokerClient, *, wait_s: float, retry_s: float) -> None:
        self.client = client
        self.wait_s = wait_s
        self.retry_s = retry_s
        self.healthy = False
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-changes", daemon=True)

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the current round (waits for it up to `timeout_s`)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.poll_changes(wait_s=self.wait_s)
                self.healthy = True
            except (BrokerClientError, RuntimeError) as exc:
                if self._stop.is_set():
                    return  # RuntimeError: the client was closed under us
                if self.healthy or self.rounds == 0:
                    log.warning(
                        "cannot follow the broker's change feed (%s); cached leases live "
                        "to their expiry",
                        getattr(exc, "message", type(exc).__name__),
                    )
                self.healthy = False
                self._stop.wait(self.retry_s)
            self.rounds += 1
