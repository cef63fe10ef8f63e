"""Pending payout records settle from Vault without a reader (the maintenance job's work)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.payments.service import reconcile_pending_payouts
from broker.vault.gateway import VaultGateway
from tests.conftest import VaultEndpoint, app_through, bearer, make_tenant, token
from tests.support.slowproxy import SlowProxy
from tests.support.workers import wait_for

KV_WRITE = b"POST /v1/secret/data/"


@pytest.fixture
def slow(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str, engine: Engine
) -> Iterator[tuple[TestClient, SlowProxy]]:
    with SlowProxy(vault_endpoint.addr) as proxy:
        yield (
            app_through(
                proxy.addr,
                broker_vault_token,
                database_url,
                engine,
                vault_timeout_s=1.0,
                vault_retry_budget_s=1.5,
            ),
            proxy,
        )


def _payout(client: TestClient, tenant: str, iban: str) -> Any:
    return client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "Acme Ltd"}},
        headers=bearer(token("finance:manage", tenant_id=tenant)),
    )


def _row(engine: Engine, tenant: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT payout_version, payout_sync_pending, payout_hint FROM payment_profiles"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant},
        ).one()


def test_a_payout_write_that_landed_after_its_503_settles_without_a_reader(
    client: TestClient,
    slow: tuple[TestClient, SlowProxy],
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
) -> None:
    broker, proxy = slow
    tenant = make_tenant(client)
    assert _payout(broker, tenant, "DE89370400440532013000").status_code == 200
    proxy.delay(KV_WRITE, 2.5)
    assert _payout(broker, tenant, "GB82WEST12345698765432").status_code == 503
    proxy.clear()
    path = f"tenants/{tenant}/payout"
    wait_for(
        lambda: int(vault_admin.kv.metadata(path)["current_version"]) == 2,
        timeout_s=15,
        what="the held write to land",
    )
    assert _row(engine, tenant)[:2] == (1, True)
    assert reconcile_pending_payouts(engine, broker_vault) >= 1
    version, pending, hint = _row(engine, tenant)
    assert (version, pending) == (2, False)
    assert hint.endswith("5432")
    # Idempotent: nothing left to do for this tenant.
    reconcile_pending_payouts(engine, broker_vault)
    assert _row(engine, tenant) == (version, pending, hint)
