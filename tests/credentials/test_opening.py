"""A fetch's KV read and Transit decrypt made at once (broker/credentials/opening.py): the
decrypt of the ciphertext last opened starts with the read, and the answers stay those of
a fetch that reads, then decrypts. Each test fetches once first, so the second fetch has a
ciphertext to expect, and checks that it had one."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.credentials.opening import MAX_REMEMBERED, LastOpened, read_and_open
from broker.credentials.service import Delivery
from broker.leases import service as leases
from broker.vault.errors import CiphertextRetired
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, key_name
from tests.credentials.test_routes import save, service
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint, app_through
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

SHOPIFY = "integrations/shopify"
OPS = bearer(token("platform:admin", subject="ops"))


@pytest.fixture
def served(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    """A client for an app with its lifespan running: both Vault calls on its loop."""
    vault = VaultGateway.from_settings(settings)
    app = create_app(settings, engine=engine, vault=vault)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        vault.close()


def delivery(client: TestClient) -> Delivery:
    found: Delivery = client.app.state.delivery  # type: ignore[attr-defined]
    return found


def fetched(client: TestClient, tenant: str, provider: str = "shopify", **who: Any) -> Any:
    """A fetch, after checking the app had a ciphertext to expect for it."""
    assert delivery(client).opened.get(tenant, f"integrations/{provider}") is not None
    return client.get(f"/v1/credentials/{tenant}/{provider}", headers=service(tenant, **who))


def first_fetch(client: TestClient, tenant: str, provider: str = "shopify") -> dict[str, Any]:
    response = client.get(f"/v1/credentials/{tenant}/{provider}", headers=service(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def shop(served: TestClient, providers: FakeProviders) -> str:
    """A tenant with Shopify credentials, fetched once."""
    tenant = make_tenant(served)
    save(served, tenant, "shopify", dict(VALID["shopify"]))
    first_fetch(served, tenant)
    return tenant


def test_the_remembered_ciphertexts_stay_bounded_the_least_recently_opened_dropped() -> None:
    opened = LastOpened(size=3)
    for n in range(5):
        opened.remember(f"t{n}", SHOPIFY, f"vault:v1:{n}")
    opened.remember("t2", SHOPIFY, "vault:v1:2")  # opened again: now the most recent
    opened.remember("t5", SHOPIFY, "vault:v1:5")
    assert len(opened) == 3
    assert [opened.get(f"t{n}", SHOPIFY) for n in range(6)] == [
        None,
        None,
        "vault:v1:2",
        None,
        "vault:v1:4",
        "vault:v1:5",
    ]
    opened.forget("t4", SHOPIFY)
    assert len(opened) == 2


def test_only_the_ciphertext_is_remembered(
    served: TestClient, shop: str, vault_admin: VaultGateway
) -> None:
    entry = vault_admin.kv.read(f"tenants/{shop}/{SHOPIFY}")
    assert entry is not None
    assert delivery(served).opened.get(shop, SHOPIFY) == entry.data["ciphertext"]
    assert delivery(served).opened.size == MAX_REMEMBERED


def test_a_changed_credential_is_served_at_once(served: TestClient, shop: str) -> None:
    new = dict(VALID["shopify"]) | {"access_token": "shpat_" + "c" * 32}
    save(served, shop, "shopify", new)
    response = fetched(served, shop)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], body["fields"]["access_token"]) == (2, new["access_token"])
    again = fetched(served, shop)  # now expecting the new ciphertext
    assert again.json()["fields"]["access_token"] == new["access_token"]


def test_a_deleted_credential_is_404_and_forgotten(served: TestClient, shop: str) -> None:
    deleted = served.delete(
        "/v1/tenants/settings/integrations/shopify",
        headers=bearer(token("tenant:admin", tenant_id=shop)),
    )
    assert deleted.status_code == 204, deleted.text
    response = fetched(served, shop)
    assert response.status_code == 404
    assert VALID["shopify"]["access_token"] not in response.text
    assert delivery(served).opened.get(shop, SHOPIFY) is None


def test_a_provider_switched_to_dynamic_delivery_never_hands_out_its_root_credential(
    served: TestClient, providers: FakeProviders
) -> None:
    tenant = make_tenant(served)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    saved = served.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": dict(VALID["twilio"])},
        headers=admin,
    )
    assert saved.status_code == 200, saved.text
    assert first_fetch(served, tenant, "twilio")["fields"] == dict(VALID["twilio"])
    # Another process, which did not make the switch, still expects the stored ciphertext.
    elsewhere = delivery(served).opened.get(tenant, "integrations/twilio")
    switched = served.put(
        "/v1/tenants/settings/integrations/twilio/delivery", json={"mode": "dynamic"}, headers=admin
    )
    assert switched.status_code == 200, switched.text
    # The process that made it no longer guesses the root credential's ciphertext.
    assert delivery(served).opened.get(tenant, "integrations/twilio") is None
    assert elsewhere is not None
    delivery(served).opened.remember(tenant, "integrations/twilio", elsewhere)
    try:
        response = fetched(served, tenant, "twilio")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["lease_id"] is not None
        assert "auth_token" not in body["fields"]
        assert body["fields"]["api_key_sid"]  # a key minted for this service
        assert VALID["twilio"]["auth_token"] not in response.text
        assert delivery(served).opened.get(tenant, "integrations/twilio") is None
    finally:
        leasing: leases.Leasing = served.app.state.leasing  # type: ignore[attr-defined]
        leases.revoke_matching(
            leasing,
            leases.Selector(tenant_id=tenant),
            principal=leases.WORKER,
            reason="test_teardown",
        )


def test_a_ciphertext_retired_by_key_rotation_still_serves_the_current_one(
    served: TestClient, shop: str, vault_admin: VaultGateway, broker_vault: VaultGateway
) -> None:
    retired = delivery(served).opened.get(shop, SHOPIFY)
    assert retired is not None
    rotated = served.post(f"/v1/tenants/{shop}/keys/rotate", headers=OPS)
    assert rotated.status_code == 200, rotated.text
    info = vault_admin.transit.key_info(key_name(shop))
    assert info is not None
    assert info["min_decryption_version"] == 2
    with pytest.raises(CiphertextRetired):  # what the early decrypt now meets
        broker_vault.transit.decrypt(key_name(shop), retired, context=f"{shop}/shopify")
    response = fetched(served, shop)
    assert response.status_code == 200, response.text
    assert response.json()["fields"]["access_token"] == VALID["shopify"]["access_token"]
    current = vault_admin.kv.read(f"tenants/{shop}/{SHOPIFY}")
    assert current is not None
    assert delivery(served).opened.get(shop, SHOPIFY) == current.data["ciphertext"] != retired


def test_a_tampered_public_part_is_still_refused(
    served: TestClient, shop: str, vault_admin: VaultGateway
) -> None:
    path = f"tenants/{shop}/{SHOPIFY}"
    entry = vault_admin.kv.read(path)
    assert entry is not None
    public = json.loads(json.dumps(entry.data["public"]))
    public["identifiers"]["shop_domain"] = "attacker.myshopify.com"
    # The same ciphertext (the one the fetch expects) beside a public part of one's choosing.
    vault_admin.kv.write(path, {"ciphertext": entry.data["ciphertext"], "public": public}, cas=None)
    response = fetched(served, shop)
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert VALID["shopify"]["access_token"] not in response.text


def test_both_calls_of_an_overlapped_fetch_name_the_caller_in_the_vault_audit_log(
    vault_endpoint: VaultEndpoint,
    vault_proxy: SlowProxy,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders,
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    client = app_through(vault_proxy.addr, broker_vault_token, database_url, engine, providers)
    with client:  # the lifespan: both calls on the loop
        tenant = make_tenant(client)
        save(client, tenant, "shopify", dict(VALID["shopify"]))
        first_fetch(client, tenant)
        # The KV read reaches Vault late: a decrypt made at the same time reaches it first.
        vault_proxy.delay(f"GET /v1/secret/data/tenants/{tenant}/".encode(), 0.5)
        response = fetched(client, tenant, subject="overlapped")
        vault_proxy.clear()
    assert response.status_code == 200, response.text
    assert response.json()["fields"] == dict(VALID["shopify"])
    request_id = response.headers["x-request-id"]
    requests = [
        entry
        for entry in map(json.loads, vault_endpoint.audit_log.read_text().splitlines())
        if entry["type"] == "request" and request_id in json.dumps(entry)
    ]
    assert [e["request"]["path"] for e in requests] == [
        f"transit/decrypt/tenant-{tenant}",
        f"secret/data/tenants/{tenant}/{SHOPIFY}",
    ]
    for entry in requests:
        headers = entry["request"]["headers"]
        assert headers["x-broker-actor"] == ["service:overlapped"]
        assert headers["x-broker-tenant"] == [tenant]
        assert headers["x-broker-action"] == ["credentials.fetch:shopify"]


def test_a_cancelled_fetch_leaves_no_task_behind(
    vault_proxy: SlowProxy, broker_vault: VaultGateway, broker_vault_token: str
) -> None:
    tenant = f"cancel-{uuid.uuid4().hex[:10]}"
    store = SealedStore(broker_vault)
    store.ensure_tenant_key(tenant)
    public = {"identifiers": {"shop_domain": "cancel.myshopify.com"}}
    ciphertext = store.seal(tenant, SHOPIFY, {"access_token": "shpat_cancel"}, public)
    store.write(tenant, SHOPIFY, ciphertext=ciphertext, public=public, cas=0)
    proxied = VaultGateway(addrs=[vault_proxy.addr], token=broker_vault_token)
    opened = LastOpened()
    opened.remember(tenant, SHOPIFY, ciphertext)
    vault_proxy.delay(b"", 30.0)  # neither call will be answered while the test runs

    async def main() -> set[asyncio.Task[Any]]:
        async with proxied.serving_on_loop():
            fetching = asyncio.create_task(
                read_and_open(
                    SealedStore(proxied), opened, tenant, SHOPIFY, threads=anyio.CapacityLimiter(1)
                )
            )
            while len(asyncio.all_tasks()) < 3:  # this one, the fetch, its early decrypt
                await asyncio.sleep(0.01)
            fetching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fetching
            return asyncio.all_tasks() - {asyncio.current_task()}

    try:
        assert anyio.run(main) == set()
    finally:
        vault_proxy.clear()
        proxied.close()
        store.shred(tenant)
