"""Ready-to-use provider API clients for one tenant, replacing the seed's Phase 3 factories.

Each factory returns an `httpx.Client` whose base URL and authentication come from the
tenant's credentials in the broker. The credentials are not baked into the client:
an `httpx.Auth` asks the `BrokerClient` for the (cached) lease on every request, so
an expired lease is fetched again and a rotation reaches the client transparently,
including a changed store URL, shop domain or account SID.

Redirects are never followed: a custom header such as `X-Shopify-Access-Token` would
otherwise be resent to whatever host the redirect names.

Every connection goes through the broker's egress policy (`GuardedTransport`): https
only, and a host that is, or resolves to, a loopback, private, link-local/metadata or
otherwise non-public address is refused with `TargetRefused` before anything is sent.
Each new connection dials the address that was checked, so a DNS answer that changes
afterwards cannot redirect the credentials. Tests and local development opt in to
plain http and loopback with `egress=EgressPolicy(allow_http=True, allow_loopback=True)`;
`resolver` replaces the system resolver.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Generator

import httpx

from broker.client.sdk import BrokerClient, BrokerClientError, Lease
from broker.integrations.egress import (
    EgressPolicy,
    EgressRefused,
    GuardedTransport,
    Resolver,
    screen_url,
)

__all__ = [
    "LeaseAuth",
    "TargetRefused",
    "create_openai_client_for_tenant",
    "create_shopify_service_for_tenant",
    "create_twilio_service_for_tenant",
    "create_woo_service_for_tenant",
]

Apply = Callable[[httpx.Request, Lease], None]
BaseFor = Callable[[Lease], str]


class TargetRefused(BrokerClientError):
    """The provider URL is not a public https address; nothing was sent to it."""


class _ProviderTransport(GuardedTransport):
    """The guarded transport, raising the SDK's own error for a refused target."""

    def __init__(self, provider: str, policy: EgressPolicy, resolver: Resolver | None) -> None:
        super().__init__(policy, resolver)
        self._provider = provider

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except EgressRefused as exc:
            # The egress messages never contain the URL's path, query or credentials.
            raise TargetRefused(
                f"refusing to send {self._provider} credentials to this address ({exc})"
            ) from None


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _field(lease: Lease, name: str) -> str:
    value = lease.fields.get(name)
    if not value:
        raise BrokerClientError(f"the {lease.provider} lease lacks {name}")
    return value


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


class LeaseAuth(httpx.Auth):
    """Authenticates each request with the tenant's current lease from the broker."""

    requires_request_body = True  # a 401 retry resends the body

    def __init__(
        self,
        broker: BrokerClient,
        tenant_id: str,
        provider: str,
        *,
        base_for: BaseFor,
        apply: Apply,
    ) -> None:
        self._broker = broker
        self._tenant_id = tenant_id
        self._provider = provider
        self._base_for = base_for
        self._apply = apply
        self.initial_base = _with_slash(base_for(self._lease()))
        """The base URL the httpx client was built with; rotations are rebased from it."""

    @property
    def provider(self) -> str:
        """The provider whose credentials this authenticates with."""
        return self._provider

    def _lease(self) -> Lease:
        return self._broker.lease(self._tenant_id, self._provider)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Attach the current credentials; after a 401, refetch once if they have changed."""
        lease = self._lease()
        self._prepare(request, lease)
        response = yield request
        if response.status_code != 401:
            return
        # The tenant may have rotated the credentials since our lease was issued, or
        # revoked the key minted for us (dynamic delivery): fetch once more, and retry
        # only with different credentials.
        self._broker.invalidate(self._tenant_id, self._provider)
        fresh = self._lease()
        if fresh.version != lease.version or fresh.lease_id != lease.lease_id:
            self._prepare(request, fresh)
            yield request

    def _prepare(self, request: httpx.Request, lease: Lease) -> None:
        base = _with_slash(self._base_for(lease))
        url = str(request.url)
        if base != self.initial_base and url.startswith(self.initial_base):
            request.url = httpx.URL(base + url[len(self.initial_base) :])
            request.headers["Host"] = request.url.netloc.decode("ascii")
        target = httpx.URL(base)
        if (request.url.scheme, request.url.netloc) != (target.scheme, target.netloc):
            # Never hand a tenant's credentials to a host other than its provider's.
            raise BrokerClientError(
                f"refusing to send {self._provider} credentials to another host"
            )
        self._apply(request, lease)


def _client(
    auth: LeaseAuth,
    timeout_s: float,
    egress: EgressPolicy | None,
    resolver: Resolver | None,
) -> httpx.Client:
    policy = egress or EgressPolicy()
    try:
        # Fail at construction for what needs no DNS (a stored 169.254.169.254, say);
        # the transport checks again, with DNS, on every new connection.
        screen_url(auth.initial_base, policy)
    except EgressRefused as exc:
        raise TargetRefused(
            f"refusing to send {auth.provider} credentials to this address ({exc})"
        ) from None
    return httpx.Client(
        base_url=auth.initial_base,
        auth=auth,
        timeout=timeout_s,
        headers={"Accept": "application/json"},
        follow_redirects=False,
        transport=_ProviderTransport(auth.provider, policy, resolver),
    )


def create_woo_service_for_tenant(
    client: BrokerClient,
    tenant_id: str,
    *,
    timeout_s: float = 10,
    egress: EgressPolicy | None = None,
    resolver: Resolver | None = None,
) -> httpx.Client:
    """An httpx client on the tenant's WooCommerce REST API (`{store_url}/wp-json/wc/v3/`)."""

    def base_for(lease: Lease) -> str:
        return f"{_field(lease, 'store_url').rstrip('/')}/wp-json/wc/v3"

    def apply(request: httpx.Request, lease: Lease) -> None:
        request.headers["Authorization"] = _basic(
            _field(lease, "consumer_key"), _field(lease, "consumer_secret")
        )

    auth = LeaseAuth(client, tenant_id, "woocommerce", base_for=base_for, apply=apply)
    return _client(auth, timeout_s, egress, resolver)


def create_shopify_service_for_tenant(
    client: BrokerClient,
    tenant_id: str,
    *,
    api_version: str = "2024-10",
    base_url_override: str | None = None,
    timeout_s: float = 10,
    egress: EgressPolicy | None = None,
    resolver: Resolver | None = None,
) -> httpx.Client:
    """An httpx client on the tenant's Shopify Admin API (`https://{shop}/admin/api/{v}/`).

    `base_url_override` replaces `https://{shop_domain}` (local test servers).
    """

    def base_for(lease: Lease) -> str:
        host = base_url_override or f"https://{_field(lease, 'shop_domain')}"
        return f"{host.rstrip('/')}/admin/api/{api_version}"

    def apply(request: httpx.Request, lease: Lease) -> None:
        request.headers["X-Shopify-Access-Token"] = _field(lease, "access_token")

    auth = LeaseAuth(client, tenant_id, "shopify", base_for=base_for, apply=apply)
    return _client(auth, timeout_s, egress, resolver)


def create_twilio_service_for_tenant(
    client: BrokerClient,
    tenant_id: str,
    *,
    base_url: str = "https://api.twilio.com",
    timeout_s: float = 10,
    egress: EgressPolicy | None = None,
    resolver: Resolver | None = None,
) -> httpx.Client:
    """An httpx client on the tenant's Twilio account (`{base}/2010-04-01/Accounts/{sid}/`).

    Paths are relative to the account: `client.post("Messages.json", data=...)`.
    """

    def base_for(lease: Lease) -> str:
        return f"{base_url.rstrip('/')}/2010-04-01/Accounts/{_field(lease, 'account_sid')}"

    def apply(request: httpx.Request, lease: Lease) -> None:
        # Dynamic delivery: a Standard API key minted for this service, the account
        # still in the path; static: the account SID and auth token.
        if lease.fields.get("api_key_sid"):
            user, password = _field(lease, "api_key_sid"), _field(lease, "api_key_secret")
        else:
            user, password = _field(lease, "account_sid"), _field(lease, "auth_token")
        request.headers["Authorization"] = _basic(user, password)

    auth = LeaseAuth(client, tenant_id, "twilio", base_for=base_for, apply=apply)
    return _client(auth, timeout_s, egress, resolver)


def create_openai_client_for_tenant(
    client: BrokerClient,
    tenant_id: str,
    *,
    base_url: str = "https://api.openai.com/v1",
    timeout_s: float = 30,
    egress: EgressPolicy | None = None,
    resolver: Resolver | None = None,
) -> httpx.Client:
    """An httpx client on the OpenAI API (`{base}/`, e.g. `client.get("models")`).

    The same in both deliveries: the stored API key, or a service-account key minted for
    this service and expiring with its lease.
    """

    def base_for(lease: Lease) -> str:
        return base_url.rstrip("/")

    def apply(request: httpx.Request, lease: Lease) -> None:
        request.headers["Authorization"] = f"Bearer {_field(lease, 'api_key')}"
        org_id = lease.fields.get("org_id")
        if org_id:
            request.headers["OpenAI-Organization"] = org_id

    auth = LeaseAuth(client, tenant_id, "openai", base_for=base_for, apply=apply)
    return _client(auth, timeout_s, egress, resolver)
