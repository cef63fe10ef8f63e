"""The client SDK against the real broker, served by uvicorn on loopback.

The broker runs on real OpenBao and PostgreSQL. Outages, replayed answers and
substituted wrapping tokens come from `BrokerProxy`, a real HTTP server between
the SDK and the broker; provider APIs are the local fakes of `tests.fakes`.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.client import (
    AccessDenied,
    BrokerClient,
    BrokerClientError,
    BrokerUnavailable,
    CredentialsNotFound,
    OpenAICredentials,
    ShopifyCredentials,
    TargetRefused,
    TwilioCredentials,
    WhatsAppCredentials,
    WooCommerceCredentials,
    WrappingTokenTampered,
    create_shopify_service_for_tenant,
    create_twilio_service_for_tenant,
    create_woo_service_for_tenant,
)
from broker.integrations.egress import EgressPolicy
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint
from tests.support.loopback import LoopbackServer
from tests.support.serving import serving
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

CREDENTIALS_ROUTE = "/v1/credentials/{tenant_id}/{provider}"
LEASE_S = 300  # the broker's default lease; no provider cap is lower
# The fake providers listen on http://127.0.0.1: the factories reach them only by opting in.
LOCAL = EgressPolicy(allow_http=True, allow_loopback=True)


# ----------------------------------------------------------------- the broker


@pytest.fixture(scope="module")
def broker_url(app: Any) -> Iterator[str]:
    """The session's app under uvicorn on 127.0.0.1, for the length of this module."""
    with serving(app) as url:
        yield url


def fetch_count(broker_url: str) -> int:
    """How many credential fetches the broker has answered, from its own /metrics."""
    text = httpx.get(f"{broker_url}/metrics").text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "broker_http_requests_total"
            and sample.labels.get("route") == CREDENTIALS_ROUTE
            and sample.labels.get("method") == "GET"
        )
    )


# ------------------------------------------------------------------ the proxy


class BrokerProxy(LoopbackServer):
    """A real HTTP server in front of the broker that can fail, hang up or alter answers."""

    thread_name = "broker-proxy"
    join_handlers = False

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = httpx.Client(base_url=upstream, timeout=10)
        self.failures: list[tuple[int, str | None]] = []
        self.outage: str | None = None
        """"hangup": close every connection without an answer; "503": answer 503."""
        self.swap_wrap_token: str | None = None
        self.replay_wrapped = False
        self.arrivals: list[float] = []
        self._last_wrapped: bytes | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.base_url

    def fail_next(self, count: int, status: int = 503, retry_after: str | None = "1") -> None:
        """Answer the next `count` requests with `status` (and Retry-After) instead."""
        with self._lock:
            self.failures.extend([(status, retry_after)] * count)

    def close(self) -> None:
        """Stop serving, then let go of the broker."""
        super().close()
        self.upstream.close()

    def _answer(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.arrivals.append(time.monotonic())
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None or self.outage == "503":
            status, retry_after = failure or (503, None)
            extra = {"Retry-After": retry_after} if retry_after else {}
            body = {"type": "about:blank", "title": "Unavailable", "status": status}
            return status, {"Content-Type": "application/problem+json", **extra}, _json(body)
        if self.replay_wrapped and self._last_wrapped is not None:
            return 200, {"Content-Type": "application/json"}, self._last_wrapped
        forwarded = {k: v for k, v in headers.items() if k in ("authorization", "x-request-id")}
        response = self.upstream.get(path, headers=forwarded)
        content = response.content
        if response.status_code == 200 and "wrap_ttl=" in path:
            body = response.json()
            if self.swap_wrap_token is not None:
                body["wrap"]["token"] = self.swap_wrap_token
                content = _json(body)
            self._last_wrapped = content
        kept = {
            name: value
            for name, value in response.headers.items()
            if name.lower() in ("content-type", "retry-after", "x-request-id")
        }
        return response.status_code, kept, content

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # request lines and headers carry tokens

            def do_GET(self) -> None:
                self.close_connection = True
                if proxy.outage == "hangup":
                    with proxy._lock:
                        proxy.arrivals.append(time.monotonic())
                    return
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, extra, body = proxy._answer(self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[BrokerProxy]:
    with BrokerProxy(broker_url) as running:
        yield running


# -------------------------------------------------------------------- helpers


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service_token(*tenants: str) -> str:
    return token("credentials:read", kind="service", tenants=tenants, subject="messaging-worker")


def fields_for(provider: str, fake: FakeProviders, **changes: str) -> dict[str, str]:
    fields = dict(VALID[provider])
    if provider == "woocommerce":
        fields["store_url"] = fake.base_url
    fields.update(changes)
    return fields


def save(client: TestClient, tenant: str, provider: str, fields: dict[str, str]) -> int:
    """Store credentials as the tenant's admin would; the new version."""
    response = client.put(
        f"/v1/tenants/settings/integrations/{provider}",
        json={"fields": fields, "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert response.status_code == 200, response.text
    version: int = response.json()["version"]
    return version


def twilio_tenant(client: TestClient, providers: FakeProviders) -> str:
    """A new tenant with working Twilio credentials saved."""
    tenant = make_tenant(client)
    save(client, tenant, "twilio", fields_for("twilio", providers))
    return tenant


def sdk(url: str, tenant: str, **options: Any) -> BrokerClient:
    return BrokerClient(url, token=service_token(tenant), **options)


def all_secret_values() -> list[str]:
    return [
        value
        for fields in VALID.values()
        for name, value in fields.items()
        if name not in ("shop_domain", "store_url")
    ]


def vault_wrap_lookup(vault: VaultEndpoint, wrapping_token: str) -> httpx.Response:
    return httpx.post(f"{vault.addr}/v1/sys/wrapping/lookup", json={"token": wrapping_token})


# ---------------------------------------------------------------------- tests


def test_typed_getters_return_each_providers_fields_and_mask_them_in_repr(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    versions = {
        provider: save(client, tenant, provider, fields_for(provider, providers))
        for provider in VALID
    }
    calls = []

    def token_provider() -> str:
        calls.append(1)
        return service_token(tenant)

    with BrokerClient(broker_url, token_provider=token_provider) as broker:
        twilio = broker.twilio(tenant)
        woo = broker.woocommerce(tenant)
        shopify = broker.shopify(tenant)
        whatsapp = broker.whatsapp(tenant)
        openai = broker.openai(tenant)

    assert isinstance(twilio, TwilioCredentials)
    assert (twilio.account_sid, twilio.auth_token, twilio.webhook_secret) == (
        VALID["twilio"]["account_sid"],
        VALID["twilio"]["auth_token"],
        VALID["twilio"]["webhook_secret"],
    )
    assert isinstance(woo, WooCommerceCredentials)
    assert woo.store_url == providers.base_url
    assert (woo.consumer_key, woo.consumer_secret) == (
        VALID["woocommerce"]["consumer_key"],
        VALID["woocommerce"]["consumer_secret"],
    )
    assert isinstance(shopify, ShopifyCredentials)
    assert (shopify.shop_domain, shopify.access_token) == (
        VALID["shopify"]["shop_domain"],
        VALID["shopify"]["access_token"],
    )
    assert isinstance(whatsapp, WhatsAppCredentials)
    assert whatsapp.business_id == VALID["whatsapp"]["business_id"]
    assert isinstance(openai, OpenAICredentials)
    assert (openai.api_key, openai.org_id) == (
        VALID["openai"]["api_key"],
        VALID["openai"]["org_id"],
    )
    assert twilio.version == versions["twilio"]
    assert len(calls) == 5  # the token is asked for on every fetch, so it may rotate

    shown = " ".join(repr(c) + str(c) for c in (twilio, woo, shopify, whatsapp, openai))
    for secret in all_secret_values():
        assert secret not in shown
    assert "shop_domain='demo-shop.myshopify.com'" in shown  # identifiers stay readable


def test_two_calls_fetch_once(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = twilio_tenant(client, providers)
    before = fetch_count(broker_url)
    with sdk(broker_url, tenant) as broker:
        first = broker.twilio(tenant)
        second = broker.twilio(tenant)
    assert first == second
    assert fetch_count(broker_url) - before == 1


def test_ten_concurrent_callers_share_one_fetch(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "shopify", fields_for("shopify", providers))
    before = fetch_count(broker_url)
    start = threading.Barrier(10)

    with sdk(broker_url, tenant) as broker:

        def call() -> ShopifyCredentials:
            start.wait(5)
            return broker.shopify(tenant)

        with ThreadPoolExecutor(10) as pool:
            results = [f.result(10) for f in [pool.submit(call) for _ in range(10)]]

    assert {r.access_token for r in results} == {VALID["shopify"]["access_token"]}
    assert fetch_count(broker_url) - before == 1


def test_lease_is_refreshed_shortly_before_it_expires(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "openai", fields_for("openai", providers))
    clock = FakeClock()
    before = fetch_count(broker_url)
    with sdk(broker_url, tenant, clock=clock, refresh_margin_s=30) as broker:
        first = broker.openai(tenant)
        clock.now += LEASE_S - 31
        assert broker.openai(tenant) is not None
        assert fetch_count(broker_url) - before == 1
        clock.now += 2  # now inside the 30 s margin
        refreshed = broker.openai(tenant)
    assert fetch_count(broker_url) - before == 2
    assert refreshed.expires_at > first.expires_at


def test_invalidate_after_a_save_gives_the_new_version(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    old = save(client, tenant, "twilio", fields_for("twilio", providers))
    with sdk(broker_url, tenant) as broker:
        assert broker.twilio(tenant).version == old
        new_token = uuid.uuid4().hex
        new = save(client, tenant, "twilio", fields_for("twilio", providers, auth_token=new_token))
        assert broker.twilio(tenant).version == old  # cached until invalidated
        broker.invalidate(tenant, "twilio")
        fresh = broker.twilio(tenant)
    assert (fresh.version, fresh.auth_token) == (new, new_token)
    assert new > old


def test_wrapped_mode_unwraps_once_and_a_replayed_token_is_tampering(
    client: TestClient,
    providers: FakeProviders,
    vault_endpoint: VaultEndpoint,
    proxy: BrokerProxy,
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "woocommerce", fields_for("woocommerce", providers))
    with sdk(proxy.url, tenant, wrapped=True, vault_addr=vault_endpoint.addr) as broker:
        creds = broker.woocommerce(tenant)
        assert creds.consumer_secret == VALID["woocommerce"]["consumer_secret"]
        assert proxy._last_wrapped is not None
        used = json.loads(proxy._last_wrapped)["wrap"]["token"]
        # The broker handed out a wrapping token, not the fields, and the SDK used it up.
        assert "fields" not in json.loads(proxy._last_wrapped)
        assert vault_wrap_lookup(vault_endpoint, used).status_code == 400

        proxy.replay_wrapped = True  # someone replays the captured answer
        broker.invalidate(tenant, "woocommerce")
        with pytest.raises(WrappingTokenTampered) as caught:
            broker.woocommerce(tenant)
    assert used not in str(caught.value)
    assert not isinstance(caught.value, CredentialsNotFound | AccessDenied | BrokerUnavailable)


def wrap_as_root(vault_endpoint: VaultEndpoint) -> dict[str, str]:
    """Headers for a root call whose answer Vault wraps."""
    return {"X-Vault-Token": vault_endpoint.root_token, "X-Vault-Wrap-TTL": "60s"}


def refused_as_tampered(
    proxy: BrokerProxy, vault_endpoint: VaultEndpoint, tenant: str, substitute: str, match: str
) -> None:
    """The broker's wrapping token swapped for `substitute` on the way: the SDK refuses it."""
    proxy.swap_wrap_token = substitute
    with (
        sdk(proxy.url, tenant, wrapped=True, vault_addr=vault_endpoint.addr) as broker,
        pytest.raises(WrappingTokenTampered, match=match),
    ):
        broker.twilio(tenant)


def test_wrapped_token_from_another_vault_path_is_refused_before_unwrapping(
    client: TestClient,
    providers: FakeProviders,
    vault_endpoint: VaultEndpoint,
    proxy: BrokerProxy,
) -> None:
    tenant = twilio_tenant(client, providers)
    # A genuine wrapping token, but of some other Vault response (a token lookup).
    foreign = httpx.get(
        f"{vault_endpoint.addr}/v1/auth/token/lookup-self",
        headers=wrap_as_root(vault_endpoint),
    ).json()["wrap_info"]
    assert foreign["creation_path"] != "sys/wrapping/wrap"
    refused_as_tampered(
        proxy, vault_endpoint, tenant, foreign["token"], "not created by sys/wrapping/wrap"
    )
    # Refused on the lookup: the token was not consumed and is left for investigation.
    assert vault_wrap_lookup(vault_endpoint, foreign["token"]).status_code == 200


def test_wrapped_token_holding_another_tenants_lease_is_tampering(
    client: TestClient,
    providers: FakeProviders,
    vault_endpoint: VaultEndpoint,
    proxy: BrokerProxy,
) -> None:
    tenant = twilio_tenant(client, providers)
    substitute = httpx.post(
        f"{vault_endpoint.addr}/v1/sys/wrapping/wrap",
        headers=wrap_as_root(vault_endpoint),
        json={
            "tenant_id": "someone-else",
            "provider": "twilio",
            "version": 1,
            "fields": {"account_sid": "AC" + "0" * 32, "auth_token": "0" * 32},
            "issued_at": "2030-01-01T00:00:00+00:00",
            "expires_at": "2030-01-01T00:05:00+00:00",
        },
    ).json()["wrap_info"]["token"]
    refused_as_tampered(proxy, vault_endpoint, tenant, substitute, "does not match")


def test_token_for_another_tenant_or_missing_credentials_is_not_found_without_retries(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant, other = twilio_tenant(client, providers), make_tenant(client)
    before = fetch_count(broker_url)
    with sdk(broker_url, other, retry_attempts=4) as broker:
        with pytest.raises(CredentialsNotFound):
            broker.twilio(tenant)
        with pytest.raises(CredentialsNotFound):
            broker.shopify(other)  # listed, but never configured
    assert fetch_count(broker_url) - before == 2


def test_invalid_or_wrong_kind_of_token_is_access_denied(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = twilio_tenant(client, providers)
    garbage = "not-a-jwt-" + uuid.uuid4().hex
    with BrokerClient(broker_url, token=garbage) as broker, pytest.raises(AccessDenied) as bad:
        broker.twilio(tenant)
    assert bad.value.status == 401
    assert garbage not in str(bad.value)
    admin = token("tenant:admin", tenant_id=tenant)
    with BrokerClient(broker_url, token=admin) as broker, pytest.raises(AccessDenied) as user:
        broker.twilio(tenant)
    assert user.value.status == 403


def test_503_is_retried_no_sooner_than_retry_after(
    client: TestClient, providers: FakeProviders, proxy: BrokerProxy
) -> None:
    tenant = twilio_tenant(client, providers)
    proxy.fail_next(2, 503, retry_after="1")
    with sdk(proxy.url, tenant, retry_attempts=4, backoff_base_s=0.01, max_backoff_s=5) as broker:
        creds = broker.twilio(tenant)
    assert creds.auth_token == VALID["twilio"]["auth_token"]
    assert len(proxy.arrivals) == 3
    gaps = [b - a for a, b in zip(proxy.arrivals, proxy.arrivals[1:], strict=False)]
    assert all(gap >= 1.0 for gap in gaps), gaps


def test_gives_up_after_the_attempts_or_when_told_to_wait_too_long(
    client: TestClient, providers: FakeProviders, proxy: BrokerProxy
) -> None:
    tenant = twilio_tenant(client, providers)
    proxy.fail_next(10, 429, retry_after=None)
    with (
        sdk(proxy.url, tenant, retry_attempts=3, backoff_base_s=0.01) as broker,
        pytest.raises(BrokerUnavailable),
    ):
        broker.twilio(tenant)
    assert len(proxy.arrivals) == 3

    proxy.failures.clear()
    proxy.arrivals.clear()
    proxy.fail_next(10, 503, retry_after="30")
    with (
        sdk(proxy.url, tenant, retry_attempts=4, max_backoff_s=5) as broker,
        pytest.raises(BrokerUnavailable) as caught,
    ):
        broker.twilio(tenant)
    assert len(proxy.arrivals) == 1  # retrying within 5 s would ignore Retry-After: 30
    assert caught.value.retry_after == 30


def test_outage_serves_the_cached_lease_within_the_stale_bound_only(
    client: TestClient,
    providers: FakeProviders,
    proxy: BrokerProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "woocommerce", fields_for("woocommerce", providers))
    clock = FakeClock()
    options: dict[str, Any] = {"clock": clock, "retry_attempts": 2, "backoff_base_s": 0.01}
    caplog.set_level(logging.INFO, logger="broker.client")
    with (
        sdk(proxy.url, tenant, max_stale_s=60, **options) as lenient,
        sdk(proxy.url, tenant, **options) as strict,
    ):
        cached = lenient.woocommerce(tenant)
        strict_cached = strict.woocommerce(tenant)
        proxy.outage = "hangup"  # connections are cut: a transport error, not an HTTP answer

        clock.now += LEASE_S - 10  # due for refresh, but still valid: both serve it
        assert lenient.woocommerce(tenant) == cached
        assert strict.woocommerce(tenant) == strict_cached

        clock.now += 40  # expired 30 s ago
        assert lenient.woocommerce(tenant) == cached
        with pytest.raises(BrokerUnavailable):
            strict.woocommerce(tenant)

        clock.now += 60  # expired 90 s ago: beyond the bound
        with pytest.raises(BrokerUnavailable) as caught:
            lenient.woocommerce(tenant)

        proxy.outage = None
        assert lenient.woocommerce(tenant).expires_at > cached.expires_at

    assert "expired 30s ago" in caplog.text
    for secret in [*all_secret_values(), service_token(tenant)]:
        assert secret not in caplog.text
        assert secret not in str(caught.value)


def test_factories_call_the_providers_with_the_tenants_credentials(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    for provider in ("woocommerce", "shopify", "twilio"):
        save(client, tenant, provider, fields_for(provider, providers))
    sid = VALID["twilio"]["account_sid"]
    before = fetch_count(broker_url)
    with sdk(broker_url, tenant) as broker:
        with create_woo_service_for_tenant(broker, tenant, egress=LOCAL) as woo:
            assert woo.get("products").json()[0]["id"] == 794
            assert woo.get("products", params={"per_page": 1}).status_code == 200
        with create_shopify_service_for_tenant(
            broker, tenant, base_url_override=providers.base_url, egress=LOCAL
        ) as shopify:
            assert shopify.get("shop.json").json()["shop"]["name"] == "Demo Shop"
        with create_twilio_service_for_tenant(
            broker, tenant, base_url=providers.base_url, egress=LOCAL
        ) as tw:
            account = tw.get(f"{providers.base_url}/2010-04-01/Accounts/{sid}.json")
            assert account.json()["sid"] == sid
            tw.get("Messages.json")  # the fake has no such route, but records the call
            with pytest.raises(BrokerClientError, match="another host"):
                tw.get("http://127.0.0.2:9/steal")
    assert fetch_count(broker_url) - before == 3  # one lease per provider, then the cache

    woo_auth = (
        "Basic "
        + base64.b64encode(
            f"{VALID['woocommerce']['consumer_key']}:{VALID['woocommerce']['consumer_secret']}".encode()
        ).decode()
    )
    twilio_auth = (
        "Basic " + base64.b64encode(f"{sid}:{VALID['twilio']['auth_token']}".encode()).decode()
    )
    seen = [(r.provider, r.path, r.headers) for r in providers.requests]
    assert seen[0][:2] == ("woocommerce", "/wp-json/wc/v3/products")
    assert seen[0][2]["authorization"] == woo_auth
    assert seen[2][:2] == ("shopify", "/admin/api/2024-10/shop.json")
    assert seen[2][2]["x-shopify-access-token"] == VALID["shopify"]["access_token"]
    assert seen[3][2]["authorization"] == twilio_auth
    assert seen[4][1] == f"/2010-04-01/Accounts/{sid}/Messages.json"
    assert seen[4][2]["authorization"] == twilio_auth
    assert len(seen) == 5  # nothing reached the foreign host's fake or any other


def test_factory_clients_follow_rotations_transparently(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "woocommerce", fields_for("woocommerce", providers))
    rejected = "shpat_" + "a" * 32  # well-formed, but the provider does not know it
    save(client, tenant, "shopify", fields_for("shopify", providers, access_token=rejected))
    clock = FakeClock()
    with sdk(broker_url, tenant, clock=clock) as broker:
        woo = create_woo_service_for_tenant(broker, tenant, egress=LOCAL)
        shopify = create_shopify_service_for_tenant(
            broker, tenant, base_url_override=providers.base_url, egress=LOCAL
        )
        with woo, shopify:
            # A token the provider rejects while the lease is still valid: after the
            # tenant saves a working one, the client refetches once and retries.
            save(client, tenant, "shopify", fields_for("shopify", providers))
            assert shopify.get("shop.json").status_code == 200

            assert woo.get("products").status_code == 200
            # The store moves under a prefix; the lease expires; the same client follows.
            moved = f"{providers.base_url}/shop2"
            fields = fields_for("woocommerce", providers, store_url=moved)
            save(client, tenant, "woocommerce", fields)
            clock.now += LEASE_S + 1
            assert woo.get("products").status_code == 200

    seen = [(r.path, r.headers.get("x-shopify-access-token")) for r in providers.requests]
    assert seen == [
        ("/admin/api/2024-10/shop.json", rejected),
        ("/admin/api/2024-10/shop.json", VALID["shopify"]["access_token"]),
        ("/wp-json/wc/v3/products", None),
        ("/shop2/wp-json/wc/v3/products", None),
    ]


def test_factories_refuse_non_public_targets_by_default(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    """Without the opt-in, the fakes on http://127.0.0.1 are targets nothing is sent to."""
    tenant = make_tenant(client)
    for provider in ("woocommerce", "shopify", "twilio"):
        save(client, tenant, provider, fields_for(provider, providers))
    with sdk(broker_url, tenant) as broker:
        attempts: dict[str, Callable[[], object]] = {
            "woocommerce": lambda: create_woo_service_for_tenant(broker, tenant),
            "shopify": lambda: create_shopify_service_for_tenant(
                broker, tenant, base_url_override=providers.base_url
            ),
            "twilio": lambda: create_twilio_service_for_tenant(
                broker, tenant, base_url=providers.base_url
            ),
            "shopify over https": lambda: create_shopify_service_for_tenant(
                broker, tenant, base_url_override="https://169.254.169.254"
            ),
        }
        for name, attempt in attempts.items():
            with pytest.raises(TargetRefused) as refused:
                attempt()
            assert "127.0.0.1" not in str(refused.value), name
    assert providers.requests == []


def test_factory_clients_refuse_a_host_that_resolves_to_a_private_address(
    client: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    """Checked per connection with DNS: a name that now points inward gets nothing."""
    tenant = make_tenant(client)
    store_url = providers.base_url.replace("127.0.0.1", "localhost")
    save(client, tenant, "woocommerce", fields_for("woocommerce", providers, store_url=store_url))
    answers = {"localhost": ["127.0.0.1"]}
    with sdk(broker_url, tenant) as broker:
        woo = create_woo_service_for_tenant(
            broker, tenant, egress=LOCAL, resolver=lambda host, port: answers[host]
        )
        with woo:
            assert woo.get("products", headers={"Connection": "close"}).status_code == 200
            answers["localhost"] = ["10.0.0.7"]
            with pytest.raises(TargetRefused, match="non-public"):
                woo.post("products", json={"name": "x"})
    assert [r.path for r in providers.requests] == ["/wp-json/wc/v3/products"]


def test_the_sdk_does_not_import_the_server() -> None:
    """Services install the SDK next to their own code: no web framework, ORM or hvac."""
    import subprocess
    import sys

    script = (
        "import sys; from broker.client import TargetRefused, create_woo_service_for_tenant; "
        "print(sorted(m for m in ('fastapi', 'sqlmodel', 'sqlalchemy', 'hvac', 'psycopg', "
        "'stripe', 'broker.core.config', 'broker.integrations.providers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
