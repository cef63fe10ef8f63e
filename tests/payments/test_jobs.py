"""The payments jobs: pending payout records settle from Vault without a reader, and
Stripe's default card is put back to the broker's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.jobs.defer import defer
from broker.payments.jobs import reconcile_default_cards
from broker.payments.service import reconcile_pending_payouts
from broker.vault.gateway import VaultGateway
from tests.fakes.stripe import FakeStripe
from tests.support.apps import VaultEndpoint, app_behind_slow_vault
from tests.support.rows import payout_row
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token
from tests.support.workers import BROKER_WORKER, Workers, wait_for

KV_WRITE = b"POST /v1/secret/data/"


@pytest.fixture
def slow(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str, engine: Engine
) -> Iterator[tuple[TestClient, SlowProxy]]:
    with app_behind_slow_vault(vault_endpoint, broker_vault_token, database_url, engine) as slowed:
        yield slowed


def _payout(client: TestClient, tenant: str, iban: str) -> Any:
    return client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "Acme Ltd"}},
        headers=bearer(token("finance:manage", tenant_id=tenant)),
    )


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
        lambda: int((vault_admin.kv.metadata(path) or {}).get("current_version", 0)) == 2,
        timeout_s=15,
        what="the held write to land",
    )
    assert payout_row(engine, tenant)[:2] == (1, True)
    assert reconcile_pending_payouts(engine, broker_vault) >= 1
    version, pending, hint = payout_row(engine, tenant)
    assert (version, pending) == (2, False)
    assert hint.endswith("5432")
    # Idempotent: nothing left to do for this tenant.
    reconcile_pending_payouts(engine, broker_vault)
    assert payout_row(engine, tenant) == (version, pending, hint)


# -- Stripe's default card, kept the broker's by the hourly job --------------------------


@pytest.fixture
def workers(settings: Settings, engine: Engine, tmp_path: Path) -> Iterator[Workers]:
    with Workers(settings, engine, tmp_path) as started:
        yield started


def _run_now(engine: Engine, task: Any) -> None:
    """One run of a periodic job, queued now (not at its hour) and waited for."""
    queued: list[int] = []

    def deferred() -> bool:
        # A worker's own tick may hold the queueing lock: then queue again.
        with unit_of_work(engine) as session:
            job_id = defer(session, task)
        queued.extend([job_id] if job_id is not None else [])
        return bool(queued)

    wait_for(deferred, timeout_s=60, what="a place in the queue")

    def status() -> str:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    text("SELECT status FROM procrastinate_jobs WHERE id = :id"), {"id": queued[0]}
                ).scalar_one()
            )

    wait_for(lambda: status() == "succeeded", timeout_s=60, what=f"the {task.name} job")


def test_a_worker_puts_back_a_stripe_default_card_changed_behind_the_brokers_back(
    client: TestClient, stripe_server: FakeStripe, engine: Engine, workers: Workers
) -> None:
    tenant = make_tenant(client)
    finance = bearer(token("finance:manage", tenant_id=tenant))
    visa, master = stripe_server.add_card(), stripe_server.add_card(last4="4444")
    for card in (visa, master):
        added = client.post(
            "/v1/tenants/settings/payment-methods",
            json={"payment_method_id": card},
            headers=finance,
        )
        assert added.status_code == 201, added.text
    with engine.connect() as conn:
        customer = str(
            conn.execute(
                text("SELECT stripe_customer_id FROM payment_profiles WHERE tenant_id = :t"),
                {"t": tenant},
            ).scalar_one()
        )
    stripe_server.set_default_payment_method(customer, master)  # a dashboard edit

    workers.start(BROKER_WORKER, BROKER_STRIPE_API_BASE=stripe_server.base_url)
    _run_now(engine, reconcile_default_cards)
    assert stripe_server.default_payment_method(customer) == visa  # the broker's default
