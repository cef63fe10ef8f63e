"""Vault or PostgreSQL failing in the middle of a credential write.

The promise: a 503 with Retry-After, and afterwards PostgreSQL and Vault agree:
no hint for a secret that was never stored, no secret without its metadata row.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.devstack.openbao import OpenBaoServer
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import app_on
from tests.support.rows import credential_row
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


@pytest.fixture
def bao(own_bao: OpenBaoServer) -> OpenBaoServer:
    """An OpenBao only this test may seal, throttle or kill."""
    return own_bao


@pytest.fixture
def client(
    bao: OpenBaoServer, database_url: str, engine: Engine, providers: FakeProviders
) -> TestClient:
    return app_on(bao, database_url, engine, providers)


def _admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def _put(client: TestClient, tenant: str, fields: dict[str, str]) -> Any:
    return client.put(
        "/v1/tenants/settings/integrations/twilio", json={"fields": fields}, headers=_admin(tenant)
    )


def _vault_version(bao: OpenBaoServer, tenant: str) -> int:
    admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
    try:
        meta = admin.kv.metadata(f"tenants/{tenant}/integrations/twilio")
        return int(meta["current_version"]) if meta else 0
    finally:
        admin.close()


FIRST = dict(VALID["twilio"])
SECOND = FIRST | {"auth_token": "e" * 32}


def test_vault_sealed_mid_flow_is_503_and_nothing_changes(
    client: TestClient, bao: OpenBaoServer, engine: Engine, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    providers.accept("twilio", **SECOND)
    # Vault is sealed while the provider answers the connection test.
    providers.on_request = lambda provider: bao.seal()
    response = _put(client, tenant, SECOND)
    providers.on_request = None
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert "e" * 32 not in response.text
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.configured, row.vault_sync_pending) == (1, True, False)
    assert row.hints["auth_token"].endswith(FIRST["auth_token"][-4:])
    bao.unseal()
    assert _vault_version(bao, tenant) == 1


def test_vault_dead_before_the_write_is_503_with_nothing_stored(
    client: TestClient, bao: OpenBaoServer, engine: Engine, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    providers.on_request = lambda provider: bao.kill()
    response = _put(client, tenant, FIRST)
    providers.on_request = None
    assert response.status_code == 503
    assert "retry-after" in response.headers
    row = credential_row(engine, tenant)
    assert row is None or (row.configured, row.hints) == (False, {})


def test_kv_refused_after_the_row_is_marked_clears_the_mark_at_once(
    client: TestClient, bao: OpenBaoServer, engine: Engine, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    providers.accept("twilio", **SECOND)
    # Transit still works, but every KV request is throttled: the write is refused
    # after the metadata row was marked pending. A refusal (429) means Vault holds
    # nothing new, so the mark is cleared without asking Vault again.
    root = {"X-Vault-Token": bao.root_token}

    def throttle_kv(provider: str) -> None:
        httpx.post(
            f"{bao.addr}/v1/sys/quotas/rate-limit/kv",
            json={"path": "secret/", "rate": 1, "interval": "1h"},
            headers=root,
        ).raise_for_status()
        # Use up the one request the quota allows (all clients here share 127.0.0.1).
        httpx.get(f"{bao.addr}/v1/secret/metadata/unused", headers=root)

    providers.on_request = throttle_kv
    response = _put(client, tenant, SECOND)
    providers.on_request = None
    assert response.status_code == 503
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.vault_sync_pending) == (1, False)
    assert row.hints["auth_token"].endswith(FIRST["auth_token"][-4:])

    httpx.delete(f"{bao.addr}/v1/sys/quotas/rate-limit/kv", headers=root).raise_for_status()
    listed = client.get("/v1/tenants/settings/integrations", headers=_admin(tenant)).json()
    twilio = next(i for i in listed if i["provider"] == "twilio")
    assert (twilio["sync_pending"], twilio["version"]) == (False, 1)
    assert _vault_version(bao, tenant) == 1


def test_database_lost_after_vault_accepted_is_rebuilt_from_vault(
    client: TestClient, bao: OpenBaoServer, engine: Engine, providers: FakeProviders
) -> None:
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    providers.accept("twilio", **SECOND)
    # Make the final commit fail the way a dropped connection does (SQLSTATE 08006),
    # for this tenant only, after Vault has accepted the new version.
    trigger = f"fail_finalize_{tenant.replace('-', '_')}"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"""
                CREATE FUNCTION {trigger}() RETURNS trigger AS $$
                BEGIN
                    IF NEW.tenant_id = '{tenant}' AND NEW.kv_version > OLD.kv_version THEN
                        RAISE EXCEPTION 'connection lost' USING ERRCODE = '08006';
                    END IF;
                    RETURN NEW;
                END; $$ LANGUAGE plpgsql;
                CREATE TRIGGER {trigger} BEFORE UPDATE ON integration_credentials
                FOR EACH ROW EXECUTE FUNCTION {trigger}();
                """
            )
        )
    try:
        response = _put(client, tenant, SECOND)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER {trigger} ON integration_credentials"))
            conn.execute(text(f"DROP FUNCTION {trigger}()"))
    assert response.status_code == 503
    assert _vault_version(bao, tenant) == 2  # Vault has it...
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.vault_sync_pending) == (1, True)  # ...the row knows it may
    listed = client.get("/v1/tenants/settings/integrations", headers=_admin(tenant)).json()
    twilio = next(i for i in listed if i["provider"] == "twilio")
    assert (twilio["version"], twilio["sync_pending"]) == (2, False)
    assert twilio["hints"]["auth_token"].endswith(SECOND["auth_token"][-4:])
