"""Rotation that meets a bad item, a pre-rotation restore, or the tenant's deletion."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.core.errors import NotFound
from broker.tenants import keys
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import key_name
from tests.fakes.providers import VALID, FakeProviders
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token
from tests.tenants.test_keys import OPERATOR, OPS, save


def test_one_undecryptable_item_does_not_stop_the_rotation(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "openai", providers)
    save(client, tenant, "twilio", providers)
    other = make_tenant(client)
    save(client, other, "openai", providers)
    # Another tenant's ciphertext planted under this tenant: it never decrypts here.
    foreign = vault_admin.kv.read(f"tenants/{other}/integrations/openai")
    assert foreign is not None
    vault_admin.kv.write(f"tenants/{tenant}/integrations/shopify", foreign.data, cas=None)

    response = client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=OPS)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["failed"] == ["integrations/shopify"]
    assert (report["key_version"], report["rewrapped"]) == (2, 2)
    info = vault_admin.transit.key_info(key_name(tenant))
    assert info is not None
    assert info["min_decryption_version"] == 2  # the old key versions are retired anyway
    service = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    fetched = client.get(f"/v1/credentials/{tenant}/openai", headers=service)
    assert fetched.status_code == 200
    assert fetched.json()["fields"]["api_key"] == VALID["openai"]["api_key"]
    # The bad item is named again by the next run, which rotates on from there.
    again = client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=OPS).json()
    assert (again["key_version"], again["failed"]) == (3, ["integrations/shopify"])


def test_restoring_a_version_from_before_a_rotation_is_410(
    client: TestClient, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    save(client, tenant, "openai", providers)
    assert client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=OPS).status_code == 200
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    restored = client.post(
        "/v1/tenants/settings/integrations/openai/versions/1/restore", headers=admin
    )
    assert restored.status_code == 410, restored.text
    assert "rotation" in restored.json()["detail"]
    assert VALID["openai"]["api_key"] not in restored.text
    # The rewrapped version (2) restores fine.
    again = client.post(
        "/v1/tenants/settings/integrations/openai/versions/2/restore", headers=admin
    )
    assert again.status_code == 200, again.text


def _race(client: TestClient, tenant: str) -> dict[str, httpx.Response]:
    """Rotate the tenant's key and delete the tenant at the same moment."""
    answers: dict[str, httpx.Response] = {}
    start = threading.Barrier(2)

    def run(name: str, method: str, path: str) -> None:
        start.wait()
        answers[name] = client.request(method, path, headers=OPS)

    threads = [
        threading.Thread(target=run, args=("rotate", "POST", f"/v1/tenants/{tenant}/keys/rotate")),
        threading.Thread(target=run, args=("delete", "DELETE", f"/v1/tenants/{tenant}")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_a_rotation_racing_the_tenants_deletion_never_fails_with_500(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders
) -> None:
    for _ in range(3):
        tenant = make_tenant(client)
        for provider in ("openai", "twilio", "shopify"):
            save(client, tenant, provider, providers)
        answers = _race(client, tenant)
        assert answers["rotate"].status_code in (200, 404, 503), answers["rotate"].text
        assert answers["delete"].status_code in (204, 503), answers["delete"].text
        if answers["delete"].status_code == 503:
            assert client.delete(f"/v1/tenants/{tenant}", headers=OPS).status_code == 204
        # Nothing written back after the shredding: the tenant left nothing in Vault.
        assert vault_admin.kv.keys(f"tenants/{tenant}/integrations") == []
        assert vault_admin.transit.key_info(key_name(tenant)) is None


def test_rewrap_batches_split_and_one_bad_item_is_named(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Batches of two: three good items and a bad one span two rewrap calls.
    monkeypatch.setattr(keys, "REWRAP_BATCH", 2)
    tenant = make_tenant(client)
    for provider in ("openai", "twilio", "shopify"):
        save(client, tenant, provider, providers)
    other = make_tenant(client)
    save(client, other, "openai", providers)
    foreign = vault_admin.kv.read(f"tenants/{other}/integrations/openai")
    assert foreign is not None
    vault_admin.kv.write(f"tenants/{tenant}/integrations/zz-planted", foreign.data, cas=None)

    report = keys.rotate_tenant_key(engine, broker_vault, principal=OPERATOR, tenant_id=tenant)
    assert (report.key_version, report.rewrapped, report.failed) == (
        2,
        3,
        ("integrations/zz-planted",),
    )
    for provider in ("openai", "twilio", "shopify"):
        entry = vault_admin.kv.read(f"tenants/{tenant}/integrations/{provider}")
        assert entry is not None
        assert entry.data["ciphertext"].startswith("vault:v2:")


def test_rotating_all_stops_at_a_tenant_that_is_gone(
    client: TestClient, engine: Engine, broker_vault: VaultGateway, providers: FakeProviders
) -> None:
    first, last = make_tenant(client), make_tenant(client)
    save(client, first, "openai", providers)
    done: list[str] = []
    with pytest.raises(NotFound):
        keys.rotate_all(
            engine,
            broker_vault,
            principal=OPERATOR,
            tenant_ids=[first, "no-such-tenant-here", last],
            on_done=lambda r: done.append(r.tenant_id),
        )
    # The tenant before the missing one finished and was reported; none started after.
    assert done == [first]
    info = broker_vault.transit.key_info(key_name(last))
    assert info is not None
    assert info["latest_version"] == 1
