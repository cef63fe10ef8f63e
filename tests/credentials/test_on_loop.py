"""The credential fetch of an app serving its lifespan: the Vault reads go over the event
loop's own connections, audited, bounded and with the same answers as the threaded path
(broker/vault/loop.py; the gateway-level cases are in tests/vault/test_loop.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.vault.gateway import VaultGateway
from tests.credentials.test_routes import save, service
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint, app_behind_slow_vault
from tests.support.tenants import make_tenant


@pytest.fixture
def served(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    """A client for an app with its lifespan running (its own Vault gateway)."""
    vault = VaultGateway.from_settings(settings)
    app = create_app(settings, engine=engine, vault=vault)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_a_fetch_served_on_the_loop_is_complete_and_audited(
    served: TestClient, providers: FakeProviders, vault_endpoint: VaultEndpoint
) -> None:
    shop = make_tenant(served)
    save(served, shop, "shopify", dict(VALID["shopify"]))
    response = served.get(
        f"/v1/credentials/{shop}/shopify", headers=service(shop, subject="loop-reader")
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["fields"] == dict(VALID["shopify"])
    assert (body["tenant_id"], body["provider"], body["version"]) == (shop, "shopify", 1)
    assert body["lease_id"] is None
    missing = served.get(f"/v1/credentials/{shop}/openai", headers=service(shop))
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    if vault_endpoint.audit_log is None:
        return
    request_id = response.headers["x-request-id"]
    requests = [
        entry
        for entry in map(json.loads, vault_endpoint.audit_log.read_text().splitlines())
        if entry["type"] == "request" and request_id in json.dumps(entry)
    ]
    assert {e["request"]["path"] for e in requests} == {
        f"secret/data/tenants/{shop}/integrations/shopify",
        f"transit/decrypt/tenant-{shop}",
    }
    for entry in requests:
        headers = entry["request"]["headers"]
        assert headers["x-broker-actor"] == ["service:loop-reader"]
        assert headers["x-broker-tenant"] == [shop]
        assert headers["x-broker-action"] == ["credentials.fetch:shopify"]


def test_a_wrapped_fetch_still_wraps(served: TestClient, providers: FakeProviders) -> None:
    shop = make_tenant(served)
    save(served, shop, "shopify", dict(VALID["shopify"]))
    response = served.get(
        f"/v1/credentials/{shop}/shopify", params={"wrap_ttl": "60s"}, headers=service(shop)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "fields" not in body
    assert body["wrap"]["ttl"] == 60
    assert VALID["shopify"]["access_token"] not in response.text


def test_a_hung_vault_answers_503_with_retry_after(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders,
) -> None:
    with app_behind_slow_vault(
        vault_endpoint, broker_vault_token, database_url, engine, providers
    ) as (client, proxy):
        shop = make_tenant(client)
        save(client, shop, "shopify", dict(VALID["shopify"]))
        with client:  # the lifespan: reads on the loop
            assert client.get(f"/v1/credentials/{shop}/shopify", headers=service(shop)).is_success
            proxy.delay(b"POST /v1/transit/decrypt/", 5.0)
            hung = client.get(f"/v1/credentials/{shop}/shopify", headers=service(shop))
            proxy.clear()
    assert hung.status_code == 503
    assert int(hung.headers["retry-after"]) > 0
    assert hung.headers["content-type"] == "application/problem+json"
    assert VALID["shopify"]["access_token"] not in hung.text
