"""Service delivery: leases, wrapped delivery, tenant isolation, failure modes."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import hvac
import hvac.exceptions
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def save(client: TestClient, tenant: str, provider: str, fields: dict[str, str]) -> None:
    response = client.put(
        f"/v1/tenants/settings/integrations/{provider}",
        json={"fields": fields, "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert response.status_code == 200, response.text


def service(*tenants: str, subject: str = "messaging-worker") -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=tenants, subject=subject))


@pytest.fixture
def shop(client: TestClient, providers: FakeProviders) -> str:
    tenant = make_tenant(client)
    save(client, tenant, "shopify", dict(VALID["shopify"]))
    return tenant


def test_a_service_gets_a_short_lease_that_is_never_cached(client: TestClient, shop: str) -> None:
    response = client.get(f"/v1/credentials/{shop}/shopify", headers=service(shop))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["fields"]["access_token"] == VALID["shopify"]["access_token"]
    assert body["fields"]["shop_domain"] == VALID["shopify"]["shop_domain"]
    assert body["version"] == 1
    lease = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["issued_at"])
    assert lease.total_seconds() == 300


def test_leases_are_capped_per_provider(client: TestClient, providers: FakeProviders) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "openai", dict(VALID["openai"]))
    body = client.get(f"/v1/credentials/{tenant}/openai", headers=service(tenant)).json()
    lease = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["issued_at"])
    assert lease.total_seconds() <= 600


def test_read_after_write_serves_the_new_version(
    client: TestClient, providers: FakeProviders, shop: str
) -> None:
    new = dict(VALID["shopify"]) | {"access_token": "shpat_" + "b" * 32}
    save(client, shop, "shopify", new)
    body = client.get(f"/v1/credentials/{shop}/shopify", headers=service(shop)).json()
    assert (body["version"], body["fields"]["access_token"]) == (2, new["access_token"])


def test_a_tenant_outside_the_token_is_a_recorded_404(
    client: TestClient, engine: Engine, shop: str
) -> None:
    other = make_tenant(client)
    response = client.get(f"/v1/credentials/{shop}/shopify", headers=service(other))
    missing = client.get(
        "/v1/credentials/no-such-tenant/shopify", headers=service("no-such-tenant")
    )
    assert response.status_code == missing.status_code == 404
    assert response.json()["detail"] == missing.json()["detail"]
    assert VALID["shopify"]["access_token"] not in response.text
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT actor, tenant_id, outcome FROM audit_events WHERE request_id = :r"),
            {"r": response.headers["x-request-id"]},
        ).one()
    assert (row.actor, row.tenant_id, row.outcome) == ("service:messaging-worker", shop, "denied")


@pytest.mark.parametrize("digits", ["223165835579", "447700900123"])
def test_a_registered_tenant_with_a_long_number_in_its_id_is_named_in_the_trail(
    client: TestClient, engine: Engine, shop: str, digits: str
) -> None:
    """A generated id may be all digits (12 hex characters from a UUID sometimes are):
    a refusal against a real tenant names it, as for any other tenant."""
    # Letters after the number: more digits there could read as a card number, which
    # tenant creation rightly refuses.
    registered = make_tenant(client, f"t-{digits}-" + "".join(random.choices("abcdefgh", k=8)))
    response = client.get(f"/v1/credentials/{registered}/shopify", headers=service(shop))
    assert response.status_code == 404
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT tenant_id, resource FROM audit_events WHERE request_id = :r"),
            {"r": response.headers["x-request-id"]},
        ).one()
    assert row.tenant_id == registered
    assert row.resource == f"tenants/{registered}/integrations/shopify"


@pytest.mark.parametrize(
    "pasted", ["sk_live_" + "Q7" * 12, "0123456789abcdef0123456789abcdef", "hvs.CAESI" + "x" * 24]
)
def test_a_refused_fetch_keeps_no_pasted_tenant_in_the_trail(
    client: TestClient, engine: Engine, shop: str, pasted: str
) -> None:
    response = client.get(f"/v1/credentials/{pasted}/shopify", headers=service(shop))
    assert response.status_code == 404
    assert pasted not in response.text
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT tenant_id, resource FROM audit_events WHERE request_id = :r"),
            {"r": response.headers["x-request-id"]},
        ).one()
    assert row.tenant_id is None
    assert row.resource == "tenants/{tenant_id}/integrations/shopify"


def test_user_tokens_cannot_fetch_even_with_the_scope(client: TestClient, shop: str) -> None:
    user = bearer(token("credentials:read", "tenant:admin", tenant_id=shop))
    assert client.get(f"/v1/credentials/{shop}/shopify", headers=user).status_code == 403


def test_unconfigured_provider_and_unknown_provider_are_404(client: TestClient, shop: str) -> None:
    assert client.get(f"/v1/credentials/{shop}/twilio", headers=service(shop)).status_code == 404
    assert client.get(f"/v1/credentials/{shop}/myspace", headers=service(shop)).status_code == 404


def test_wrapped_delivery_unwraps_once_directly_against_vault(
    client: TestClient, vault_endpoint: VaultEndpoint, shop: str
) -> None:
    response = client.get(
        f"/v1/credentials/{shop}/shopify", params={"wrap_ttl": "60s"}, headers=service(shop)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "fields" not in body
    assert VALID["shopify"]["access_token"] not in response.text
    wrap = body["wrap"]
    assert wrap["ttl"] == 60
    assert wrap["creation_path"] == "sys/wrapping/wrap"
    # The wrapping token is its own credential: the service needs no Vault token of its own.
    # hvac's API classes are untyped: reached through Any, as the broker's gateway does.
    vault: Any = hvac.Client(url=vault_endpoint.addr, token=wrap["token"])
    unwrapped = vault.sys.unwrap()
    assert unwrapped["data"]["fields"]["access_token"] == VALID["shopify"]["access_token"]
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        vault.sys.unwrap()


@pytest.mark.parametrize(
    "ttl", ["0s", "-5", "1d", "abc", "99999", "60 s", "3601s", "6" * 17, "4111111111111111s"]
)
def test_malformed_wrap_ttl_is_422(client: TestClient, shop: str, ttl: str) -> None:
    response = client.get(
        f"/v1/credentials/{shop}/shopify", params={"wrap_ttl": ttl}, headers=service(shop)
    )
    assert response.status_code == 422
    if len(ttl) > 5:  # a short one may be part of the message's own "3600s"
        assert ttl not in response.text


def test_the_document_names_the_fetch_parameters_the_route_reads_itself(app: Any) -> None:
    operation = app.openapi()["paths"]["/v1/credentials/{tenant_id}/{provider}"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert {(p["name"], p["in"], p["required"]) for p in parameters.values()} == {
        ("tenant_id", "path", True),
        ("provider", "path", True),
        ("wrap_ttl", "query", False),
    }
    assert parameters["provider"]["schema"]["enum"] == [
        "twilio",
        "woocommerce",
        "shopify",
        "whatsapp",
        "openai",
    ]
    assert parameters["wrap_ttl"]["schema"]["maxLength"] == 16
    assert "422" in operation["responses"]


def test_every_vault_call_names_the_service_in_the_audit_log(
    client: TestClient, vault_endpoint: VaultEndpoint, shop: str
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    import json

    response = client.get(
        f"/v1/credentials/{shop}/shopify", headers=service(shop, subject="catalog-sync")
    )
    request_id = response.headers["x-request-id"]
    entries = [
        json.loads(line)
        for line in vault_endpoint.audit_log.read_text().splitlines()
        if request_id in line
    ]
    requests = [e for e in entries if e["type"] == "request"]
    assert {e["request"]["path"] for e in requests} >= {
        f"secret/data/tenants/{shop}/integrations/shopify",
        f"transit/decrypt/tenant-{shop}",
    }
    for entry in requests:
        headers = entry["request"]["headers"]
        assert headers["x-broker-actor"] == ["service:catalog-sync"]
        assert headers["x-broker-tenant"] == [shop]
        assert headers["x-broker-client-addr"] == ["testclient"]
    assert VALID["shopify"]["access_token"] not in "\n".join(json.dumps(e) for e in entries)
