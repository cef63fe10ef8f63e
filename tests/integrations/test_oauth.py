"""Shopify OAuth connect, the callback's defences, and expiring tokens refreshed on fetch.

Real OpenBao and PostgreSQL from conftest; Shopify is the local fake in
tests/fakes/shopify_oauth.py, whose clock the broker shares.
"""

from __future__ import annotations

import io
import secrets
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import hvac
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.app import create_app
from broker.auth.principal import Principal
from broker.integrations.oauth import callback_signature, due_for_refresh, refresh_if_due
from broker.integrations.service import read_sealed
from broker.models import AuditEvent, OAuthState, TenantSettings
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth
from tests.support import oauth as oauth_connect
from tests.support.apps import VaultEndpoint, make_settings, provider_overrides
from tests.support.leaks import assert_served_only_to_fetches, pg_dump
from tests.support.oauth import admin, service
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

CLIENT_ID = "canary-client-" + secrets.token_hex(8)
CLIENT_SECRET = "shpss_canary" + secrets.token_hex(16)
REDIRECT_BASE = "https://broker.platform.test"
CALLBACK = f"{REDIRECT_BASE}/v1/oauth/callback/shopify"
RETURN = "https://app.platform.test/settings/integrations"
RETURN_ALT = "https://admin.platform.test/integrations?tab=shopify"
CONNECT = "/v1/tenants/settings/integrations/shopify/connect"


@pytest.fixture(scope="module")
def shopify(clock: FakeClock) -> Iterator[FakeShopifyOAuth]:
    """The local Shopify, knowing the platform app and the broker's callback."""
    with FakeShopifyOAuth(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock) as fake:
        fake.allowed_redirect_uris = [CALLBACK]
        yield fake


@pytest.fixture(scope="module")
def app_client(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    vault_admin: VaultGateway,
    providers: FakeProviders,
    shopify: FakeShopifyOAuth,
    clock: FakeClock,
) -> Iterator[TestClient]:
    """The broker, its Shopify calls pointed at the fake, the app's secret in Vault."""
    vault_admin.kv.write(
        "platform/shopify", {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, cas=None
    )
    vaults: list[VaultGateway] = []

    def build(**overrides: Any) -> TestClient:
        settings = make_settings(
            vault_endpoint,
            broker_vault_token,
            database_url,
            **{
                **provider_overrides(providers),
                "shopify_base_url": shopify.base_url,
                # Room for a slow token endpoint (longer than the Vault budget).
                "egress_timeout_s": 8.0,
                "oauth_redirect_base_url": REDIRECT_BASE,
                "oauth_return_urls": [RETURN, RETURN_ALT],
                **overrides,
            },
        )
        vaults.append(VaultGateway.from_settings(settings))
        app = create_app(
            settings,
            engine=engine,
            vault=vaults[-1],
            clock=lambda: datetime.fromtimestamp(clock.now(), UTC),
        )
        app.state.build = build  # for tests that need other settings
        return TestClient(app, raise_server_exceptions=False)

    yield build()
    for vault in vaults:
        vault.close()


def _shop() -> str:
    return f"shop-{secrets.token_hex(4)}.myshopify.com"


def start(client: TestClient, tenant: str, shop: str, **body: Any) -> str:
    """The state of a connect the tenant's admin started."""
    response = client.post(CONNECT, json={"shop": shop, **body}, headers=admin(tenant))
    assert response.status_code == 200, response.text
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(response.json()["authorization_url"]).query)
    return str(query["state"][0])


def consent(client: TestClient, tenant: str, shop: str) -> dict[str, str]:
    """Start a connect and let the merchant approve it at the fake: the signed callback query."""
    location = urllib.parse.urlsplit(
        oauth_connect.consent(client, tenant, shop).headers["location"]
    )
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    return dict(urllib.parse.parse_qsl(location.query))


def callback(client: TestClient, params: dict[str, str] | list[tuple[str, str]]) -> httpx.Response:
    """The browser arriving at the broker's callback."""
    return oauth_connect.callback(client, params)


def connected(client: TestClient, shop: str) -> str:
    """A tenant with a completed Shopify connect."""
    tenant = make_tenant(client)
    answer = callback(client, consent(client, tenant, shop))
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{RETURN}?integration=shopify&outcome=connected"
    return tenant


def new_connection(client: TestClient) -> tuple[str, str]:
    """A new shop, and a new tenant that completed its connect: (shop, tenant)."""
    shop = _shop()
    return shop, connected(client, shop)


def get_token(client: TestClient, tenant: str) -> httpx.Response:
    """The tenant's sync service fetching its Shopify credentials."""
    answer: httpx.Response = client.get(
        f"/v1/credentials/{tenant}/shopify", headers=service(tenant)
    )
    return answer


def stored(vault: VaultGateway, tenant: str) -> tuple[Any, dict[str, str]]:
    """The tenant's Shopify record in Vault and its unsealed token set."""
    return read_sealed(vault, tenant_id=tenant, provider="shopify")


def outcome(answer: httpx.Response) -> dict[str, str]:
    """The query of the redirect to the platform, after checking it goes to the allowlist."""
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith((RETURN + "?", RETURN_ALT + "&")), location
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


def events(engine: Engine, *, action: str, tenant: str | None = None) -> list[AuditEvent]:
    with Session(engine) as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if tenant is not None:
            query = query.where(AuditEvent.tenant_id == tenant)
        return list(session.exec(query))


def nothing_stored(client: TestClient, vault: VaultGateway, tenant: str) -> None:
    listed = client.get("/v1/tenants/settings/integrations", headers=admin(tenant)).json()
    shopify = next(item for item in listed if item["provider"] == "shopify")
    assert shopify["configured"] is False
    assert vault.kv.read(f"tenants/{tenant}/integrations/shopify") is None


# -- signature ------------------------------------------------------------------------------


def test_callback_signature_matches_shopifys_documented_vector() -> None:
    params = [
        ("code", "0907a61c0c8d55e99db179b68161bc00"),
        ("shop", "some-shop.myshopify.com"),
        ("state", "0.6784241404160823"),
        ("timestamp", "1337178173"),
        ("hmac", "ignored"),
    ]
    assert callback_signature(params, "hush") == (
        "700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf"
    )


# -- connect --------------------------------------------------------------------------------


def test_connect_stores_an_expiring_token_set_sealed_and_redirects_to_the_platform(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)

    record, sealed = stored(broker_vault, tenant)
    assert set(sealed) == {"access_token", "refresh_token"}
    assert shopify.token_valid(sealed["access_token"])
    assert shopify.refresh_token_valid(shop, sealed["refresh_token"])
    assert record.public["kind"] == "oauth"
    assert record.public["identifiers"] == {"shop_domain": shop}
    expires = datetime.fromisoformat(record.public["access_expires_at"]).timestamp()
    assert abs(expires - (clock.now() + 3600)) < 60  # expiring=1: one hour
    refresh_expires = datetime.fromisoformat(record.public["refresh_expires_at"]).timestamp()
    assert abs(refresh_expires - (clock.now() + 90 * 86400)) < 60

    listed = app_client.get("/v1/tenants/settings/integrations", headers=admin(tenant)).json()
    view = next(item for item in listed if item["provider"] == "shopify")
    assert view["configured"] is True
    assert view["kind"] == "oauth"
    assert view["needs_reconnect"] is False
    assert set(view["hints"]) == {"access_token"}
    assert view["identifiers"] == {"shop_domain": shop}
    assert view["last_test"]["ok"] is True
    (event,) = events(engine, action="integration.oauth.connect", tenant=tenant)
    assert event.actor == "user:alice"
    assert event.detail["kv_version"] == record.version == view["version"]


def test_connect_checks_shop_scope_and_return_url(app_client: TestClient) -> None:
    tenant = make_tenant(app_client)
    bad_shop = app_client.post(
        CONNECT, json={"shop": "evil.example.com/x.myshopify.com"}, headers=admin(tenant)
    )
    assert bad_shop.status_code == 422
    assert "evil.example.com" not in bad_shop.text
    viewer = bearer(token("integrations:view", tenant_id=tenant))
    assert app_client.post(CONNECT, json={"shop": _shop()}, headers=viewer).status_code == 403
    elsewhere = app_client.post(
        CONNECT,
        json={"shop": _shop(), "return_url": "https://evil.example/steal"},
        headers=admin(tenant),
    )
    assert elsewhere.status_code == 422
    assert "evil.example" not in elsewhere.text
    static_only = app_client.post(
        "/v1/tenants/settings/integrations/twilio/connect",
        json={"shop": _shop()},
        headers=admin(tenant),
    )
    assert static_only.status_code == 404


def test_a_connect_asking_to_return_elsewhere_is_refused_and_audited(
    app_client: TestClient, engine: Engine
) -> None:
    tenant, shop = make_tenant(app_client), _shop()
    elsewhere = app_client.post(
        CONNECT,
        json={"shop": shop, "return_url": f"{RETURN}.evil.example/"},
        headers=admin(tenant),
    )
    assert elsewhere.status_code == 422
    (event,) = events(engine, action="integration.oauth.start", tenant=tenant)
    assert (event.outcome, event.actor, event.detail) == (
        "denied",
        "user:alice",
        {"reason": "return_url_not_allowed", "account": shop},
    )
    assert "evil.example" not in str(event.resource)
    with Session(engine) as session:
        started = select(OAuthState).where(OAuthState.tenant_id == tenant)
        assert session.exec(started).first() is None


def test_connect_url_asks_for_offline_access_with_a_fresh_state(app_client: TestClient) -> None:
    tenant = make_tenant(app_client)
    shop = _shop()
    response = app_client.post(CONNECT, json={"shop": shop}, headers=admin(tenant))
    body = response.json()
    url = urllib.parse.urlsplit(body["authorization_url"])
    query = urllib.parse.parse_qs(url.query)
    assert url.path == "/admin/oauth/authorize"
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == [CALLBACK]
    assert query["scope"] == ["read_products,read_orders"]
    assert "grant_options[]" not in query  # offline, not per-user
    assert len(query["state"][0]) >= 40
    assert start(app_client, tenant, shop) != query["state"][0]
    assert CLIENT_SECRET not in response.text


# -- callback attacks -----------------------------------------------------------------------


def test_a_forged_signature_is_refused_stores_nothing_and_is_audited(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, shop = make_tenant(app_client), _shop()
    state = start(app_client, tenant, shop)
    forged = shopify.callback_query(shop=shop, state=state, secret="not-the-app-secret")
    assert outcome(callback(app_client, forged)) == {
        "integration": "shopify",
        "outcome": "refused",
        "reason": "bad_signature",
    }
    nothing_stored(app_client, broker_vault, tenant)
    (event,) = events(engine, action="integration.oauth.callback", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("denied", "bad_signature")
    # The state was not spent by a forgery: the real callback still works.
    genuine = shopify.callback_query(shop=shop, state=state)
    assert outcome(callback(app_client, genuine))["outcome"] == "connected"


def test_a_replayed_state_is_refused(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, shop = make_tenant(app_client), _shop()
    params = consent(app_client, tenant, shop)
    assert outcome(callback(app_client, params))["outcome"] == "connected"
    before = stored(broker_vault, tenant)[0].version
    # The same state again, even with a fresh code Shopify signed.
    again = shopify.callback_query(shop=shop, state=params["state"])
    assert outcome(callback(app_client, again))["reason"] == "replayed_state"
    assert outcome(callback(app_client, params))["reason"] == "replayed_state"
    assert stored(broker_vault, tenant)[0].version == before
    refused = events(engine, action="integration.oauth.callback", tenant=tenant)
    assert [e.detail["reason"] for e in refused] == ["replayed_state", "replayed_state"]


def test_another_tenants_state_cannot_carry_a_shops_code(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    victim, attacker, shop = make_tenant(app_client), make_tenant(app_client), _shop()
    victims = consent(app_client, victim, shop)
    attackers_state = start(app_client, attacker, shop)
    # The victim's signed code, with the attacker's state swapped in.
    swapped = {**victims, "state": attackers_state}
    assert outcome(callback(app_client, swapped))["reason"] == "bad_signature"
    nothing_stored(app_client, broker_vault, attacker)
    nothing_stored(app_client, broker_vault, victim)
    (event,) = events(engine, action="integration.oauth.callback", tenant=attacker)
    assert event.outcome == "denied"


def test_a_state_for_another_shop_is_refused(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant = make_tenant(app_client)
    state = start(app_client, tenant, _shop())
    other_shop = shopify.callback_query(shop=_shop(), state=state)  # genuinely signed
    assert outcome(callback(app_client, other_shop))["reason"] == "account_mismatch"
    nothing_stored(app_client, broker_vault, tenant)
    (event,) = events(engine, action="integration.oauth.callback", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("denied", "account_mismatch")


def test_an_expired_state_is_refused(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
) -> None:
    tenant, shop = make_tenant(app_client), _shop()
    state = start(app_client, tenant, shop)
    clock.advance(601)
    late = shopify.callback_query(shop=shop, state=state)
    assert outcome(callback(app_client, late))["reason"] == "expired_state"
    nothing_stored(app_client, broker_vault, tenant)
    (event,) = events(engine, action="integration.oauth.callback", tenant=tenant)
    assert event.detail["reason"] == "expired_state"


def test_the_callback_never_redirects_where_the_request_says(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, shop = make_tenant(app_client), _shop()
    state = start(app_client, tenant, shop, return_url=RETURN_ALT)
    params = shopify.callback_query(shop=shop, state=state)
    # Unsigned additions: refused, and still sent to the platform's own URL.
    for name in ("return_url", "redirect_uri", "next"):
        tampered = {**params, name: "https://evil.example/steal"}
        answer = callback(app_client, tampered)
        assert outcome(answer)["reason"] == "bad_signature"
        assert "evil.example" not in answer.headers["location"]
    # Even a signed one is ignored: the state's allowlisted URL is the only target.
    signed = {k: v for k, v in params.items() if k != "hmac"}
    signed["return_url"] = "https://evil.example/steal"
    signed["hmac"] = callback_signature(signed.items(), CLIENT_SECRET)
    answer = callback(app_client, signed)
    assert answer.headers["location"] == f"{RETURN_ALT}&integration=shopify&outcome=connected"
    # A duplicated parameter is malformed, whatever its signature.
    duplicated = [*params.items(), ("state", "other")]
    assert outcome(callback(app_client, duplicated))["reason"] == "malformed"
    assert len(events(engine, action="integration.oauth.callback", tenant=tenant)) == 3


def test_a_code_is_exchanged_once(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway
) -> None:
    first, shop = make_tenant(app_client), _shop()
    params = consent(app_client, first, shop)
    assert outcome(callback(app_client, params))["outcome"] == "connected"
    second = make_tenant(app_client)
    state = start(app_client, second, shop)
    reused = shopify.callback_query(shop=shop, state=state, code=params["code"])
    assert outcome(callback(app_client, reused)) == {
        "integration": "shopify",
        "outcome": "failed",
        "reason": "code_refused",
    }
    nothing_stored(app_client, broker_vault, second)


# -- service fetch and refresh --------------------------------------------------------------


def test_a_service_gets_only_the_access_token_leased_until_its_expiry(
    app_client: TestClient,
    broker_vault: VaultGateway,
    vault_endpoint: VaultEndpoint,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)
    _, sealed = stored(broker_vault, tenant)
    response = get_token(app_client, tenant)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fields"] == {"shop_domain": shop, "access_token": sealed["access_token"]}
    assert sealed["refresh_token"] not in response.text
    expires = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert abs(expires - (clock.now() + 3600)) < 60  # the token's own hour, not a 5-min lease

    wrapped = app_client.get(
        f"/v1/credentials/{tenant}/shopify",
        params={"wrap_ttl": "60s"},
        headers=service(tenant),
    )
    assert wrapped.status_code == 200
    assert sealed["access_token"] not in wrapped.text
    unwrapped: Any = hvac.Client(url=vault_endpoint.addr, token=wrapped.json()["wrap"]["token"])
    inside = unwrapped.sys.unwrap()["data"]
    assert inside["fields"] == {"shop_domain": shop, "access_token": sealed["access_token"]}
    assert datetime.fromisoformat(inside["expires_at"]) == datetime.fromisoformat(
        body["expires_at"]
    )


def test_an_expired_token_is_refreshed_once_and_persisted_before_it_is_served(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)
    before, old = stored(broker_vault, tenant)
    clock.advance(3600)
    assert not shopify.token_valid(old["access_token"])
    calls = shopify.refresh_calls

    def fetch(_: int) -> httpx.Response:
        answer: httpx.Response = app_client.get(
            f"/v1/credentials/{tenant}/shopify", headers=service(tenant)
        )
        return answer

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(fetch, range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert shopify.refresh_calls == calls + 1
    served = {a.json()["fields"]["access_token"] for a in answers}
    after, new = stored(broker_vault, tenant)
    assert served == {new["access_token"]}
    assert shopify.token_valid(new["access_token"])
    assert after.version == before.version + 1
    assert new["refresh_token"] != old["refresh_token"]
    (event,) = events(engine, action="integration.oauth.refresh", tenant=tenant)
    assert event.actor == "service:sync"
    # Still fresh: no further refresh.
    assert fetch(0).json()["fields"]["access_token"] == new["access_token"]
    assert shopify.refresh_calls == calls + 1


def test_a_lost_refresh_reply_is_recovered_with_the_previous_refresh_token(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)
    before, old = stored(broker_vault, tenant)
    clock.advance(3600)
    shopify.lose_next_refresh_reply = True
    calls = shopify.refresh_calls
    lost = get_token(app_client, tenant)
    assert lost.status_code == 503
    assert "Retry-After" in lost.headers
    # Nothing was stored: Vault still holds the previous refresh token, still honoured.
    assert stored(broker_vault, tenant)[1] == old
    retried = get_token(app_client, tenant)
    assert retried.status_code == 200, retried.text
    assert shopify.refresh_calls == calls + 2
    after, new = stored(broker_vault, tenant)
    assert retried.json()["fields"]["access_token"] == new["access_token"]
    assert shopify.token_valid(new["access_token"])
    assert after.version == before.version + 1


def test_invalid_grant_marks_the_integration_for_reconnect(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)
    shopify.revoke_grant(shop)  # the merchant uninstalled the app
    clock.advance(3600)
    calls = shopify.refresh_calls
    refused = get_token(app_client, tenant)
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["title"] == "Reconnect required"
    assert "must reconnect" in problem["detail"]
    assert problem["reconnect_required"] is True
    # Known dead: the next fetch does not spend another call at Shopify.
    again = get_token(app_client, tenant)
    assert again.status_code == 409
    assert shopify.refresh_calls == calls + 1

    listed = app_client.get("/v1/tenants/settings/integrations", headers=admin(tenant)).json()
    assert next(i for i in listed if i["provider"] == "shopify")["needs_reconnect"] is True
    with Session(engine) as session:
        settings = session.get(TenantSettings, tenant)
        assert settings is not None
        assert settings.integrations_status["shopify"]["needs_reconnect"] is True
    (event,) = events(engine, action="integration.needs_reconnect", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("failed", "invalid_grant")

    # Connecting again clears it.
    assert outcome(callback(app_client, consent(app_client, tenant, shop)))["outcome"] == (
        "connected"
    )
    fresh = get_token(app_client, tenant)
    assert fresh.status_code == 200
    listed = app_client.get("/v1/tenants/settings/integrations", headers=admin(tenant)).json()
    assert next(i for i in listed if i["provider"] == "shopify")["needs_reconnect"] is False


def test_an_oauth_version_cannot_be_restored(app_client: TestClient) -> None:
    tenant = connected(app_client, _shop())
    restored = app_client.post(
        "/v1/tenants/settings/integrations/shopify/versions/1/restore", headers=admin(tenant)
    )
    assert restored.status_code == 422


# -- canaries -------------------------------------------------------------------------------


def test_tokens_codes_and_the_client_secret_never_leak(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    vault_endpoint: VaultEndpoint,
    database_url: str,
    clock: FakeClock,
    captured_logs: io.StringIO,
) -> None:
    shop = _shop()
    tenant = make_tenant(app_client)
    responses: list[httpx.Response] = []
    params = consent(app_client, tenant, shop)
    responses.append(callback(app_client, params))
    responses.append(callback(app_client, params))  # replayed
    responses.append(callback(app_client, {**params, "hmac": "0" * 64}))  # forged
    _, first = stored(broker_vault, tenant)
    clock.advance(3600)
    shopify.lose_next_refresh_reply = True
    fetch = f"/v1/credentials/{tenant}/shopify"
    responses.append(app_client.get(fetch, headers=service(tenant)))  # lost reply: 503
    responses.append(app_client.get(fetch, headers=service(tenant)))  # recovered
    _, second = stored(broker_vault, tenant)
    shopify.revoke_grant(shop)
    clock.advance(3600)
    responses.append(app_client.get(fetch, headers=service(tenant)))  # reconnect required
    for path in ("/v1/tenants/settings/integrations", "/v1/tenants/settings"):
        responses.append(app_client.get(path, headers=admin(tenant)))
    assert [r.status_code for r in responses] == [303, 303, 303, 503, 200, 409, 200, 200]

    # The access token a service is given may appear in its own fetch; nothing else may.
    database = pg_dump(database_url)
    assert_served_only_to_fetches(
        responses,
        fetch,
        never=[CLIENT_SECRET, params["code"], first["refresh_token"], second["refresh_token"]],
        served=[first["access_token"], second["access_token"]],
        logs=captured_logs.getvalue(),
        database=database,
        vault=vault_endpoint,
    )
    assert tenant in database


# -- migrating pasted tokens ----------------------------------------------------------------

MIGRATE = "/v1/tenants/settings/integrations/shopify/migrate-expiring"


def pasted(client: TestClient, shopify: FakeShopifyOAuth, shop: str) -> tuple[str, str]:
    """A tenant whose admin pasted a non-expiring Shopify token, as before OAuth."""
    tenant = make_tenant(client)
    old = shopify.issue_offline_token(shop)
    saved = client.put(
        "/v1/tenants/settings/integrations/shopify",
        json={"fields": {"shop_domain": shop, "access_token": old}},
        headers=admin(tenant),
    )
    assert saved.status_code == 200, saved.text
    return tenant, old


def test_a_pasted_token_is_exchanged_for_an_expiring_set(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
) -> None:
    shop = _shop()
    tenant, old = pasted(app_client, shopify, shop)
    dry = app_client.post(MIGRATE, params={"dry_run": "true"}, headers=admin(tenant))
    assert dry.json() == {"outcome": "would_migrate", "version": 1}
    assert shopify.token_valid(old)

    done = app_client.post(MIGRATE, headers=admin(tenant))
    assert done.status_code == 200, done.text
    assert done.json() == {"outcome": "migrated", "version": 2}
    assert not shopify.token_valid(old)  # Shopify revoked it
    record, sealed = stored(broker_vault, tenant)
    assert record.public["kind"] == "oauth"
    assert shopify.refresh_token_valid(shop, sealed["refresh_token"])
    fetched = get_token(app_client, tenant)
    assert fetched.json()["fields"]["access_token"] == sealed["access_token"]
    assert old not in done.text + fetched.text
    (event,) = events(engine, action="integration.oauth.migrate", tenant=tenant)
    assert (event.outcome, event.detail["kv_version"]) == ("success", 2)

    again = app_client.post(MIGRATE, headers=admin(tenant))
    assert again.json() == {"outcome": "already_expiring", "version": 2}
    nothing = app_client.post(MIGRATE, headers=admin(make_tenant(app_client)))
    assert nothing.json() == {"outcome": "not_configured", "version": None}


def test_a_lost_exchange_reply_is_recovered_with_the_same_pasted_token(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway
) -> None:
    shop = _shop()
    tenant, old = pasted(app_client, shopify, shop)
    shopify.lose_next_exchange_reply = True
    lost = app_client.post(MIGRATE, headers=admin(tenant))
    assert lost.status_code == 503
    assert not shopify.token_valid(old)  # revoked, though the broker never heard back
    assert stored(broker_vault, tenant)[0].version == 1
    retried = app_client.post(MIGRATE, headers=admin(tenant))
    assert retried.json() == {"outcome": "migrated", "version": 2}
    _, sealed = stored(broker_vault, tenant)
    assert shopify.token_valid(sealed["access_token"])
    assert shopify.refresh_token_valid(shop, sealed["refresh_token"])


def test_a_token_shopify_will_not_exchange_is_refused_and_kept(
    app_client: TestClient, shopify: FakeShopifyOAuth, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant = make_tenant(app_client)
    stranger = "shpat_" + secrets.token_hex(16)  # Shopify never issued it
    saved = app_client.put(
        "/v1/tenants/settings/integrations/shopify",
        json={
            "fields": {"shop_domain": _shop(), "access_token": stranger},
            "skip_connection_test": True,
        },
        headers=admin(tenant),
    )
    assert saved.status_code == 200
    refused = app_client.post(MIGRATE, headers=admin(tenant))
    assert refused.status_code == 422
    assert "invalid_grant" in refused.json()["detail"]
    assert stranger not in refused.text
    record, _ = stored(broker_vault, tenant)
    assert (record.version, record.public.get("kind")) == (1, None)
    (event,) = events(engine, action="integration.oauth.migrate", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("failed", "invalid_grant")


def test_a_slow_token_endpoint_does_not_eat_the_vault_budget_of_the_store(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    clock: FakeClock,
) -> None:
    # Longer than the request's Vault budget (3 s in tests), shorter than the egress timeout.
    shop, tenant = new_connection(app_client)
    clock.advance(3600)
    shopify.refresh_reply_delay_s = 3.5
    try:
        fetched = get_token(app_client, tenant)
    finally:
        shopify.refresh_reply_delay_s = 0
    assert fetched.status_code == 200, fetched.text
    _, sealed = stored(broker_vault, tenant)
    assert fetched.json()["fields"]["access_token"] == sealed["access_token"]


def test_a_token_near_expiry_is_listed_and_refreshed_ahead_once(
    app_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
) -> None:
    shop, tenant = new_connection(app_client)
    access = app_client.app.state.oauth  # type: ignore[attr-defined]

    def now() -> datetime:
        return datetime.fromtimestamp(clock.now(), UTC)

    def due() -> list[str]:
        window = now() + timedelta(minutes=10)
        return due_for_refresh(engine, provider="shopify", before=window, limit=100_000)

    listed = app_client.get("/v1/tenants/settings/integrations", headers=admin(tenant)).json()
    expires = next(i for i in listed if i["provider"] == "shopify")["token_expires_at"]
    assert abs(datetime.fromisoformat(expires).timestamp() - (clock.now() + 3600)) < 60
    assert tenant not in due()

    clock.advance(3600 - 300)  # five minutes left
    assert tenant in due()
    worker = Principal(subject="refresher", kind="service", scopes=frozenset())
    calls = shopify.refresh_calls
    ahead = timedelta(minutes=10)
    assert refresh_if_due(
        access, principal=worker, tenant_id=tenant, provider="shopify", within=ahead
    )
    assert not refresh_if_due(
        access, principal=worker, tenant_id=tenant, provider="shopify", within=ahead
    )
    assert shopify.refresh_calls == calls + 1
    assert tenant not in due()
    _, sealed = stored(broker_vault, tenant)
    fetched = get_token(app_client, tenant)
    assert fetched.json()["fields"]["access_token"] == sealed["access_token"]
    assert shopify.refresh_calls == calls + 1


def test_forged_callbacks_past_the_failure_limit_are_answered_429_unrecorded(
    app_client: TestClient, shopify: FakeShopifyOAuth, engine: Engine
) -> None:
    strict = app_client.app.state.build(rate_limit_auth_failures="3/hour")  # type: ignore[attr-defined]
    tenant, shop = make_tenant(strict), _shop()
    state = start(strict, tenant, shop)
    forged = shopify.callback_query(shop=shop, state=state, secret="guessed")
    answers = [callback(strict, forged) for _ in range(5)]
    assert [a.status_code for a in answers] == [303, 303, 303, 429, 429]
    assert answers[-1].headers["Retry-After"]
    assert len(events(engine, action="integration.oauth.callback", tenant=tenant)) == 3
    # The genuine callback from elsewhere still works; here it waits like the rest.
    assert callback(strict, shopify.callback_query(shop=shop, state=state)).status_code == 429
    genuine = callback(app_client, shopify.callback_query(shop=shop, state=state))
    assert outcome(genuine)["outcome"] == "connected"
