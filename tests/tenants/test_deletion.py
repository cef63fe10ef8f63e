"""Deletion stops credential delivery at once, even when it fails midway."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.devstack.openbao import OpenBaoServer
from broker.tenants.service import retire_key
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID
from tests.support.apps import app_on
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

OPS = bearer(token("platform:admin", subject="ops"))


def _with_credentials(client: TestClient) -> tuple[str, dict[str, str]]:
    tenant = make_tenant(client)
    saved = client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"]), "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert saved.status_code == 200, saved.text
    service = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    assert client.get(f"/v1/credentials/{tenant}/openai", headers=service).status_code == 200
    return tenant, service


def test_a_deletion_that_failed_midway_stops_delivery_everywhere(
    own_bao: OpenBaoServer, database_url: str, engine: Engine
) -> None:
    replica = app_on(own_bao, database_url, engine)
    other = app_on(own_bao, database_url, engine)
    tenant, service = _with_credentials(replica)
    assert other.get(f"/v1/credentials/{tenant}/openai", headers=service).status_code == 200
    own_bao.seal()
    failed = replica.delete(f"/v1/tenants/{tenant}", headers=OPS)
    assert failed.status_code == 503
    own_bao.unseal()
    # The tenant is marked deleting and Vault still holds its data and key.
    assert replica.get(f"/v1/tenants/{tenant}", headers=OPS).status_code == 404
    fetched = replica.get(f"/v1/credentials/{tenant}/openai", headers=service)
    assert fetched.status_code == 404
    assert VALID["openai"]["api_key"] not in fetched.text
    # Another replica, idle meanwhile, reads it from PostgreSQL once its view is
    # older than its TTL (2 s by default): its very next fetch is refused.
    time.sleep(2.5)
    elsewhere = other.get(f"/v1/credentials/{tenant}/openai", headers=service)
    assert elsewhere.status_code == 404
    assert VALID["openai"]["api_key"] not in elsewhere.text
    # Retrying the DELETE finishes the job.
    assert replica.delete(f"/v1/tenants/{tenant}", headers=OPS).status_code == 204


def test_the_first_deletion_step_makes_vault_refuse_every_replica(
    client: TestClient, broker_vault: VaultGateway
) -> None:
    tenant, service = _with_credentials(client)
    # What DELETE does first; the rest (shredding, rows) has not happened yet.
    retire_key(broker_vault, tenant_id=tenant)
    fetched = client.get(f"/v1/credentials/{tenant}/openai", headers=service)
    assert fetched.status_code == 404
    assert VALID["openai"]["api_key"] not in fetched.text
    assert client.delete(f"/v1/tenants/{tenant}", headers=OPS).status_code == 204


def _delete_at_once(client: TestClient, tenant: str, callers: int) -> list[int]:
    barrier = threading.Barrier(callers)
    statuses: list[int] = []

    def delete() -> None:
        barrier.wait()
        statuses.append(client.delete(f"/v1/tenants/{tenant}", headers=OPS).status_code)

    threads = [threading.Thread(target=delete) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_concurrent_deletions_of_one_tenant_never_fail(
    client: TestClient, vault_admin: VaultGateway
) -> None:
    for _ in range(3):  # the steps interleave differently each time
        tenant, _service = _with_credentials(client)
        statuses = _delete_at_once(client, tenant, 4)
        # Each step is idempotent: whoever comes second finds it done, never a 500.
        assert set(statuses) <= {204, 404}, statuses
        assert 204 in statuses
        assert client.get(f"/v1/tenants/{tenant}", headers=OPS).status_code == 404
        assert vault_admin.transit.key_info(f"tenant-{tenant}") is None
