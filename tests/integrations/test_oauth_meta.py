"""WhatsApp connect through Meta's Embedded Signup: code exchange, expiry, reconnect.

Real OpenBao and PostgreSQL from conftest; Graph is the local fake in
tests/fakes/meta_graph.py, whose clock the broker shares.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.app import create_app
from broker.integrations.service import read_sealed
from broker.models import AuditEvent, TenantSettings
from broker.vault.gateway import VaultGateway
from tests.fakes.meta_graph import SIXTY_DAYS_S, FakeMetaGraph, Signup
from tests.fakes.providers import FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.support.apps import VaultEndpoint, clocked_client, make_settings, provider_overrides
from tests.support.leaks import assert_served_only_to_fetches, pg_dump
from tests.support.oauth import admin, service
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

APP_ID = str(secrets.randbelow(10**15) + 10**14)
APP_SECRET = "metacanary" + secrets.token_hex(16)
SIGNUP = "/v1/tenants/settings/integrations/whatsapp/embedded-signup"
INTEGRATIONS = "/v1/tenants/settings/integrations"


@pytest.fixture(scope="module")
def meta(clock: FakeClock) -> Iterator[FakeMetaGraph]:
    """The local Graph, knowing the platform's Meta app."""
    with FakeMetaGraph(app_id=APP_ID, app_secret=APP_SECRET, clock=clock) as fake:
        yield fake


@pytest.fixture(scope="module")
def app_client(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    vault_admin: VaultGateway,
    providers: FakeProviders,
    meta: FakeMetaGraph,
    clock: FakeClock,
    meta_app: None,
) -> Iterator[TestClient]:
    """The broker, its Graph calls pointed at the fake, the Meta app's secret in Vault.

    Written after the session's `meta_app`, so this module's app is the one in Vault.
    """
    vault_admin.kv.write(
        "platform/meta", {"client_id": APP_ID, "client_secret": APP_SECRET}, cas=None
    )
    settings = make_settings(
        vault_endpoint,
        broker_vault_token,
        database_url,
        **{**provider_overrides(providers), "graph_base_url": meta.base_url},
    )
    with clocked_client(settings, engine, clock.now) as client:
        yield client


def _now(clock: FakeClock) -> datetime:
    return datetime.fromtimestamp(clock.now(), UTC)


def whatsapp(client: TestClient, tenant: str) -> dict[str, Any]:
    listed = client.get(INTEGRATIONS, headers=admin(tenant)).json()
    found: dict[str, Any] = next(item for item in listed if item["provider"] == "whatsapp")
    return found


def status(engine: Engine, tenant: str) -> dict[str, Any]:
    with Session(engine) as session:
        settings = session.get(TenantSettings, tenant)
        assert settings is not None
        entry: dict[str, Any] = settings.integrations_status["whatsapp"]
        return entry


def events(engine: Engine, *, action: str, tenant: str) -> list[AuditEvent]:
    with Session(engine) as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        return list(session.exec(query.where(AuditEvent.tenant_id == tenant)))


def connected(client: TestClient, meta: FakeMetaGraph, **signup: Any) -> tuple[str, Signup]:
    tenant, done = make_tenant(client), meta.signup(**signup)
    answer = client.post(SIGNUP, json=done.body(), headers=admin(tenant))
    assert answer.status_code == 200, answer.text
    return tenant, done


def test_embedded_signup_stores_the_business_token_sealed_with_the_ids(
    app_client: TestClient, meta: FakeMetaGraph, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, done = make_tenant(app_client), meta.signup()
    answer = app_client.post(SIGNUP, json=done.body(), headers=admin(tenant))
    assert answer.status_code == 200, answer.text
    view = answer.json()
    ids = {
        "business_id": done.waba_id,  # the WABA, as in pasted credentials
        "phone_number_id": done.phone_number_id,
        "business_portfolio_id": done.business_id,
    }
    assert (view["kind"], view["configured"], view["identifiers"]) == ("oauth", True, ids)
    assert view["token_expires_at"] is None  # a business token that never expires
    assert view["last_test"]["ok"] is True
    listed = whatsapp(app_client, tenant)
    assert (listed["kind"], listed["identifiers"], listed["version"]) == ("oauth", ids, 1)

    record, sealed = read_sealed(broker_vault, tenant_id=tenant, provider="whatsapp")
    assert set(sealed) == {"access_token"}  # no refresh token: Meta gives none
    assert meta.token_valid(sealed["access_token"])
    assert record.public["kind"] == "oauth"
    assert record.public["access_expires_at"] is None
    (event,) = events(engine, action="integration.oauth.connect", tenant=tenant)
    assert (event.outcome, event.actor) == ("success", "user:alice")

    fetched = app_client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["fields"] == {**ids, "access_token": sealed["access_token"]}


@pytest.mark.parametrize("exchange_says_expiry", [True, False], ids=["expires_in", "debug_token"])
def test_a_sixty_day_token_has_its_expiry_shown_and_leased(
    app_client: TestClient,
    meta: FakeMetaGraph,
    engine: Engine,
    clock: FakeClock,
    exchange_says_expiry: bool,
) -> None:
    meta.exchange_says_expiry = exchange_says_expiry
    try:
        tenant, _ = connected(app_client, meta, sixty_days=True)
    finally:
        meta.exchange_says_expiry = True
    expected = _now(clock) + timedelta(seconds=SIXTY_DAYS_S)
    shown = datetime.fromisoformat(whatsapp(app_client, tenant)["token_expires_at"])
    assert abs(shown - expected) < timedelta(minutes=1)
    assert datetime.fromisoformat(status(engine, tenant)["connection_expires_at"]) == shown
    fetched = app_client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
    assert fetched.status_code == 200, fetched.text
    # The lease is the token's own life, not the broker's default lease.
    assert datetime.fromisoformat(fetched.json()["expires_at"]) == shown


@pytest.mark.parametrize("how", ["reused", "expired"])
def test_a_dead_code_is_refused_stores_nothing_and_is_audited(
    app_client: TestClient,
    meta: FakeMetaGraph,
    broker_vault: VaultGateway,
    engine: Engine,
    clock: FakeClock,
    how: str,
) -> None:
    tenant, done = make_tenant(app_client), meta.signup()
    if how == "reused":
        # Someone else's page (or a replay) already spent the code.
        other = make_tenant(app_client)
        assert app_client.post(SIGNUP, json=done.body(), headers=admin(other)).status_code == 200
    else:
        clock.advance(31)  # a code lives 30 s
    refused = app_client.post(SIGNUP, json=done.body(), headers=admin(tenant))
    assert refused.status_code == 422
    assert "run the embedded signup again" in refused.json()["detail"]
    assert done.code not in refused.text
    assert whatsapp(app_client, tenant)["configured"] is False
    assert broker_vault.kv.read(f"tenants/{tenant}/integrations/whatsapp") is None
    (event,) = events(engine, action="integration.oauth.connect", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("failed", "invalid_code")


def test_a_code_posted_beside_another_customers_waba_is_refused(
    app_client: TestClient, meta: FakeMetaGraph, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, own, victim = make_tenant(app_client), meta.signup(), meta.signup()
    body = {**own.body(), "waba_id": victim.waba_id}
    refused = app_client.post(SIGNUP, json=body, headers=admin(tenant))
    assert refused.status_code == 422
    assert broker_vault.kv.read(f"tenants/{tenant}/integrations/whatsapp") is None
    (event,) = events(engine, action="integration.oauth.connect", tenant=tenant)
    assert (event.outcome, event.detail["reason"]) == ("failed", "waba_not_granted")


def test_signup_needs_manage_scope_valid_ids_and_is_whatsapps_only(
    app_client: TestClient, meta: FakeMetaGraph
) -> None:
    tenant, done = make_tenant(app_client), meta.signup()
    viewer = bearer(token("integrations:view", tenant_id=tenant))
    assert app_client.post(SIGNUP, json=done.body(), headers=viewer).status_code == 403
    bad = app_client.post(SIGNUP, json={**done.body(), "waba_id": "../x"}, headers=admin(tenant))
    assert bad.status_code == 422
    assert done.code not in bad.text
    shopify = SIGNUP.replace("whatsapp", "shopify")
    assert app_client.post(shopify, json=done.body(), headers=admin(tenant)).status_code == 404
    # WhatsApp has no consent URL or callback of the broker's.
    connect = app_client.post(
        f"{INTEGRATIONS}/whatsapp/connect",
        json={"shop": "a.myshopify.com"},
        headers=admin(tenant),
    )
    assert connect.status_code == 404
    # None of this spent the code.
    assert app_client.post(SIGNUP, json=done.body(), headers=admin(tenant)).status_code == 200


def test_an_expired_token_needs_a_reconnect_and_services_are_told(
    app_client: TestClient, meta: FakeMetaGraph, engine: Engine, clock: FakeClock
) -> None:
    tenant, _ = connected(app_client, meta, sixty_days=True)
    clock.advance(SIXTY_DAYS_S + 1)
    calls = sum(meta.calls.values())
    refused = app_client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["reconnect_required"] is True
    assert "must reconnect" in problem["detail"]
    assert sum(meta.calls.values()) == calls  # nothing pretends to refresh it
    assert whatsapp(app_client, tenant)["needs_reconnect"] is True
    assert status(engine, tenant)["needs_reconnect"] is True
    (event,) = events(engine, action="integration.needs_reconnect", tenant=tenant)
    assert event.detail["reason"] == "token_expired"

    # A new signup clears it.
    again = meta.signup()
    assert app_client.post(SIGNUP, json=again.body(), headers=admin(tenant)).status_code == 200
    assert whatsapp(app_client, tenant)["needs_reconnect"] is False
    fetched = app_client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
    assert fetched.status_code == 200


def test_a_token_graph_calls_dead_needs_a_reconnect(
    app_client: TestClient, meta: FakeMetaGraph, broker_vault: VaultGateway, engine: Engine
) -> None:
    tenant, _ = connected(app_client, meta)
    _, sealed = read_sealed(broker_vault, tenant_id=tenant, provider="whatsapp")
    meta.revoke(sealed["access_token"])  # the customer removed the app: code 190
    tested = app_client.post(f"{INTEGRATIONS}/whatsapp/test", headers=admin(tenant))
    assert tested.status_code == 200
    assert tested.json()["code"] == "rejected"
    assert whatsapp(app_client, tenant)["needs_reconnect"] is True
    assert status(engine, tenant)["needs_reconnect"] is True
    refused = app_client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
    assert refused.status_code == 409
    assert refused.json()["reconnect_required"] is True
    (event,) = events(engine, action="integration.needs_reconnect", tenant=tenant)
    assert event.detail["reason"] == "token_rejected"


def test_the_code_token_and_app_secret_never_leak(
    app_client: TestClient,
    meta: FakeMetaGraph,
    broker_vault: VaultGateway,
    vault_endpoint: VaultEndpoint,
    database_url: str,
    clock: FakeClock,
    captured_logs: io.StringIO,
) -> None:
    tenant, done = make_tenant(app_client), meta.signup(sixty_days=True)
    responses: list[httpx.Response] = []
    responses.append(app_client.post(SIGNUP, json=done.body(), headers=admin(tenant)))
    responses.append(app_client.post(SIGNUP, json=done.body(), headers=admin(tenant)))  # reused
    _, sealed = read_sealed(broker_vault, tenant_id=tenant, provider="whatsapp")
    fetch = f"/v1/credentials/{tenant}/whatsapp"
    responses.append(app_client.get(fetch, headers=service(tenant)))
    clock.advance(SIXTY_DAYS_S + 1)
    responses.append(app_client.get(fetch, headers=service(tenant)))  # reconnect required
    for path in (INTEGRATIONS, "/v1/tenants/settings"):
        responses.append(app_client.get(path, headers=admin(tenant)))
    assert [r.status_code for r in responses] == [200, 422, 200, 409, 200, 200]

    database = pg_dump(database_url)
    assert_served_only_to_fetches(
        responses,
        fetch,
        never=[APP_SECRET, done.code],
        served=[sealed["access_token"]],
        logs=captured_logs.getvalue(),
        database=database,
        vault=vault_endpoint,
    )
    assert tenant in database


def test_a_postgresql_outage_does_not_stop_a_valid_token_being_served(
    app_client: TestClient,
    meta: FakeMetaGraph,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    providers: FakeProviders,
    clock: FakeClock,
) -> None:
    tenant, _ = connected(app_client, meta, sixty_days=True)
    # Nothing listens on port 9: every database connection is refused.
    dead = make_settings(
        vault_endpoint,
        broker_vault_token,
        "postgresql+psycopg://postgres@127.0.0.1:9/broker",
        **{**provider_overrides(providers), "graph_base_url": meta.base_url},
    )
    vault = VaultGateway.from_settings(dead)
    app = create_app(dead, vault=vault, clock=lambda: _now(clock))
    try:
        client = TestClient(app, raise_server_exceptions=False)
        fetched = client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
        assert fetched.status_code == 200, fetched.text
        # The expiry, sealed in Vault, still holds without the database.
        clock.advance(SIXTY_DAYS_S + 1)
        expired = client.get(f"/v1/credentials/{tenant}/whatsapp", headers=service(tenant))
        assert expired.status_code == 409
        assert expired.json()["reconnect_required"] is True
        assert "access_token" not in expired.text
    finally:
        vault.close()
        app.state.engine.dispose()
