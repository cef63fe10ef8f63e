"""The console over the credential lifecycle: health, age and delivery on the integrations
pages, the live leases with revoke, and the access report; same services and scopes as
the API (real Vault, PostgreSQL, fake providers)."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from broker.app import create_app
from broker.core.config import Settings
from broker.credential_health import age
from broker.events import outbox
from broker.models import DynamicLease, Event
from broker.vault.gateway import VaultGateway
from tests.console.conftest import ORIGIN, csrf_of, post_form, sign_in
from tests.fakes.providers import VALID, FakeProviders
from tests.health_checks.test_age import age_back
from tests.integrations.test_routes import admin as api_admin
from tests.integrations.test_routes import listing, put, valid_fields
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

DELIVERY = "/v1/tenants/settings/integrations/{provider}/delivery"


def service(tenant: str, subject: str) -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=(tenant,), subject=subject))


def dynamic_twilio(client: TestClient, tenant: str) -> None:
    """Twilio root credentials stored (tested against the fake), in dynamic delivery."""
    assert put(client, tenant, "twilio", dict(VALID["twilio"])).status_code == 200
    switched = client.put(
        DELIVERY.format(provider="twilio"), json={"mode": "dynamic"}, headers=api_admin(tenant)
    )
    assert switched.status_code == 200, switched.text


def lease_of(client: TestClient, tenant: str, subject: str) -> dict[str, Any]:
    fetched = client.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant, subject))
    assert fetched.status_code == 200, fetched.text
    body: dict[str, Any] = fetched.json()
    return body


def lease_state(engine: Engine, lease_id: str) -> str:
    with Session(engine) as session:
        row = session.get(DynamicLease, lease_id)
        assert row is not None
        return row.state


# -- integrations: health, age, delivery ----------------------------------------------


def test_an_integration_shows_its_health_age_and_delivery_in_console_api_and_settings(
    admin: TestClient,
    client: TestClient,
    shop: str,
    providers: FakeProviders,
    engine: Engine,
    settings: Settings,
) -> None:
    fields = {**valid_fields("twilio", providers), "auth_token": uuid.uuid4().hex}
    providers.accept("twilio", **fields)
    assert put(client, shop, "twilio", fields).status_code == 200
    switched = client.put(
        DELIVERY.format(provider="twilio"), json={"mode": "dynamic"}, headers=api_admin(shop)
    )
    assert switched.status_code == 200, switched.text
    # The key is revoked at Twilio: two checks (a retry before the flip) find it failing.
    providers.revoke("twilio", auth_token=fields["auth_token"])
    check = "/v1/tenants/settings/integrations/twilio/health/check"
    for _ in range(2):
        assert client.post(check, headers=api_admin(shop)).status_code == 200
    age_back(engine, shop, "twilio", 400)  # past its 365-day rotation period
    assert age.sweep(engine, settings) >= 1  # the hourly sweep notices, once

    # One integration carrying both its delivery and its health and age, in the API...
    view = listing(client, shop)["twilio"]
    assert (view["delivery"], view["health"], view["age"]) == ("dynamic", "failing", "overdue")
    assert view["health_reason"]
    assert view["health_checked_at"]
    assert view["created_at"]
    assert view["rotated_at"]
    assert view["rotation_due_at"] < view["health_checked_at"]
    assert listing(client, shop)["woocommerce"]["age"] is None  # nothing stored
    # ...in the settings' integrations_status...
    status = client.get("/v1/tenants/settings", headers=api_admin(shop)).json()[
        "integrations_status"
    ]["twilio"]
    assert (status["delivery"], status["health"], status["age"]) == (
        "dynamic",
        "failing",
        "overdue",
    )
    assert status["health_reason"]
    assert status["created_at"]
    assert status["rotated_at"]
    assert status["enabled"] is True
    # ...and on the console's pages.
    overview = admin.get("/console/integrations")
    assert overview.status_code == 200
    card = overview.text.split('id="integration-twilio"', 1)[1].split("</li>", 1)[0]
    assert "Failing its health checks" in card
    assert "Overdue for rotation" in card
    assert 'href="/console/leases"' in card
    detail = admin.get("/console/integrations/twilio").text
    assert 'id="state">Failing its health checks' in detail
    assert 'id="age">Overdue for rotation' in detail
    assert 'id="health-checked"' in detail
    assert 'id="rotation-due"' in detail
    assert "minted per service lease" in detail.split('id="delivery"', 1)[1].split("</dd>", 1)[0]
    assert fields["auth_token"] not in overview.text + detail


# -- live leases ----------------------------------------------------------------------


def revocations_announced(engine: Engine, tenant_id: str) -> list[tuple[str, str]]:
    """The lease.revoked events of a tenant: who revoked which lease, oldest first."""
    with Session(engine) as session:
        announced = session.exec(
            select(Event)
            .where(Event.tenant_id == tenant_id)
            .where(Event.type == outbox.LEASE_REVOKED)
            .order_by(col(Event.id))
        ).all()
    return [(e.actor, str(e.detail["lease_id"])) for e in announced]


def test_live_leases_are_listed_and_revoked_through_the_console(
    admin: TestClient,
    client: TestClient,
    shop: str,
    providers: FakeProviders,
    engine: Engine,
) -> None:
    dynamic_twilio(client, shop)
    messaging = lease_of(client, shop, "messaging")
    catalog = lease_of(client, shop, "catalog-sync")
    other_shop = make_tenant(client)
    dynamic_twilio(client, other_shop)
    foreign = lease_of(client, other_shop, "messaging")
    try:
        page = admin.get("/console/leases")
        assert page.status_code == 200
        for lease, subject in ((messaging, "messaging"), (catalog, "catalog-sync")):
            row = page.text.split(f'id="lease-{lease["lease_id"]}"', 1)[1].split("</tr>", 1)[0]
            assert subject in row
            assert lease["fields"]["api_key_sid"] in row  # the key's id, never its secret
            assert lease["fields"]["api_key_secret"] not in page.text
        assert foreign["lease_id"] not in page.text
        assert VALID["twilio"]["auth_token"] not in page.text

        revoked = post_form(
            admin, f"/console/leases/{messaging['lease_id']}/revoke", {}, page="/console/leases"
        )
        assert revoked.status_code == 303
        assert revoked.headers["location"] == "/console/leases?done=revoked"
        assert lease_state(engine, messaging["lease_id"]) == "revoked"
        assert messaging["fields"]["api_key_sid"] not in providers.keys.twilio  # deleted
        shown = admin.get(revoked.headers["location"]).text
        assert 'id="done"' in shown
        assert messaging["lease_id"] not in shown
        assert catalog["lease_id"] in shown
        assert revocations_announced(engine, shop) == [("user:console-dev", messaging["lease_id"])]

        # Another shop's lease cannot be revoked from this console: nothing matches.
        refused = post_form(
            admin, f"/console/leases/{foreign['lease_id']}/revoke", {}, page="/console/leases"
        )
        assert refused.headers["location"] == "/console/leases?done=none"
        assert lease_state(engine, foreign["lease_id"]) == "active"

        everything = post_form(admin, "/console/leases/revoke", {}, page="/console/leases")
        assert everything.headers["location"] == "/console/leases?done=revoked"
        assert lease_state(engine, catalog["lease_id"]) == "revoked"
        assert 'id="no-leases"' in admin.get("/console/leases").text
    finally:
        for tenant in (shop, other_shop):
            client.post("/v1/tenants/settings/leases/revoke", json={}, headers=api_admin(tenant))


def test_revoking_a_lease_needs_a_writer_the_sessions_token_and_the_consoles_origin(
    browser_factory: Any, client: TestClient, shop: str, engine: Engine
) -> None:
    dynamic_twilio(client, shop)
    lease = lease_of(client, shop, "messaging")
    path = f"/console/leases/{lease['lease_id']}/revoke"
    try:
        viewer = browser_factory()
        sign_in(viewer, shop, role="viewer")
        page = viewer.get("/console/leases")
        assert page.status_code == 200
        assert lease["lease_id"] in page.text
        assert path not in page.text  # no revoke button
        assert post_form(viewer, path, {}, page="/console/leases").status_code == 403

        finance = browser_factory()
        sign_in(finance, shop, role="finance")
        assert finance.get("/console/leases").status_code == 403
        assert 'href="/console/leases"' not in finance.get("/console").text

        owner = browser_factory()
        sign_in(owner, shop)
        token_ = csrf_of(owner.get("/console/leases").text)
        no_token = owner.post(path, data={}, headers={"Origin": ORIGIN})
        forged = owner.post(
            path, data={"csrf_token": token_}, headers={"Origin": "https://evil.example"}
        )
        assert (no_token.status_code, forged.status_code) == (403, 403)
        assert lease_state(engine, lease["lease_id"]) == "active"
        malformed = post_form(owner, "/console/leases/not-a-lease/revoke", {}, page="/console")
        assert malformed.status_code in (400, 404)
    finally:
        client.post("/v1/tenants/settings/leases/revoke", json={}, headers=api_admin(shop))


# -- the access report ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reporting_app(
    settings: Settings, engine: Engine, broker_vault: VaultGateway, vault_endpoint: VaultEndpoint
) -> Any:
    """The app, told where the session's OpenBao writes its audit log."""
    if vault_endpoint.audit_log is None:
        pytest.skip("the session's Vault audit log is not readable here")
    configured = settings.model_copy(update={"vault_audit_log_paths": [vault_endpoint.audit_log]})
    return create_app(configured, engine=engine, vault=broker_vault)


@pytest.fixture
def reporting_browser(reporting_app: Any) -> Iterator[Any]:
    made: list[TestClient] = []

    def make() -> TestClient:
        made.append(TestClient(reporting_app, base_url=ORIGIN, raise_server_exceptions=False))
        return made[-1]

    yield make
    for browser in made:
        browser.close()


def test_the_access_report_page_shows_who_read_the_shops_credentials(
    reporting_browser: Any, client: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    shop, other = make_tenant(client), make_tenant(client)
    for tenant in (shop, other):
        assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    assert client.get(f"/v1/credentials/{shop}/openai", headers=service(shop, "sync")).is_success
    refused = client.get(f"/v1/credentials/{shop}/openai", headers=service(other, "intruder"))
    assert refused.status_code == 404
    assert client.get(
        f"/v1/credentials/{other}/openai", headers=service(other, "elsewhere")
    ).is_success

    owner = reporting_browser()
    sign_in(owner, shop)
    home = owner.get("/console").text
    assert 'href="/console/access"' in home
    page = owner.get("/console/access")
    assert page.status_code == 200, page.text
    assert 'id="no-vault-log"' not in page.text
    table = page.text.split('id="access"', 1)[1]
    assert "service:sync" in table
    assert "service:intruder" in table
    assert "denied" in table
    assert "allowed" in table
    assert "service:elsewhere" not in table  # the other shop's reads stay its own
    assert VALID["openai"]["api_key"] not in page.text

    filtered = owner.get("/console/access", params={"provider": "twilio"})
    assert 'id="no-reads"' in filtered.text
    assert owner.get("/console/access", params={"provider": "myspace"}).status_code == 422

    exported = owner.get("/console/access.csv")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert {"service:sync", "service:intruder"} <= {r["actor"] for r in rows}
    with engine.connect() as conn:
        audited = conn.execute(
            text(
                "SELECT detail->>'format' FROM audit_events WHERE action = 'audit.access_report'"
                " AND tenant_id = :t AND actor = 'user:console-dev' ORDER BY id"
            ),
            {"t": shop},
        ).scalars()
        assert list(audited) == ["html", "html", "csv"]


@pytest.mark.parametrize("role", ["viewer", "finance"])
def test_only_a_tenant_admin_sees_the_access_report(
    reporting_browser: Any, shop: str, role: str
) -> None:
    browser = reporting_browser()
    sign_in(browser, shop, role=role)
    assert 'href="/console/access"' not in browser.get("/console").text
    assert browser.get("/console/access").status_code == 403
    assert browser.get("/console/access.csv").status_code == 403
