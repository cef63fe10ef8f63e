"""`refresh_due_tokens` on a real `broker worker`: tokens are refreshed before they expire."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.core.db import unit_of_work
from broker.integrations.jobs import refresh_due_tokens
from broker.integrations.service import read_sealed
from broker.jobs.defer import defer
from broker.vault.gateway import VaultGateway
from tests.fakes.shopify_oauth import FakeShopifyOAuth
from tests.integrations.test_oauth import (  # noqa: F401 - fixtures
    CLIENT_SECRET,
    _shop,
    app_client,
    connected,
    shopify,
)
from tests.support.workers import BROKER_WORKER, Workers, wait_for


def _run(engine: Engine) -> None:
    """One run of the job, deferred now and waited for."""
    queued: list[int] = []

    def deferred() -> bool:
        # The worker's own minute tick may hold the queueing lock: then defer again.
        with unit_of_work(engine) as session:
            job_id = defer(session, refresh_due_tokens)
        queued.extend([job_id] if job_id is not None else [])
        return bool(queued)

    wait_for(deferred, timeout_s=60, what="a place in the queue")
    job_id = queued[0]

    def status() -> str:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    text("SELECT status FROM procrastinate_jobs WHERE id = :id"), {"id": job_id}
                ).scalar_one()
            )

    wait_for(lambda: status() == "succeeded", timeout_s=60, what="the refresh job")


def test_the_worker_refreshes_a_token_before_it_expires_once(
    app_client: TestClient,  # noqa: F811
    shopify: FakeShopifyOAuth,  # noqa: F811
    broker_vault: VaultGateway,
    engine: Engine,
    workers: Workers,
) -> None:
    shop = _shop()
    shopify.access_ttl_s = 300  # five minutes left: inside the ten-minute window
    try:
        tenant = connected(app_client, shop)
    finally:
        shopify.access_ttl_s = 3600
    before, old = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
    assert shopify.token_valid(old["access_token"])

    worker = workers.start(
        BROKER_WORKER,
        BROKER_SHOPIFY_BASE_URL=shopify.base_url,
        BROKER_EGRESS_ALLOW_HTTP="true",
        BROKER_EGRESS_ALLOW_LOOPBACK="true",
        BROKER_LOG_LEVEL="DEBUG",
    )
    _run(engine)
    after, new = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
    assert after.version == before.version + 1
    assert new["access_token"] != old["access_token"]
    assert shopify.token_valid(new["access_token"])
    assert shopify.refresh_calls_by_shop[shop] == 1

    # The new token has its hour: the next run leaves it alone.
    _run(engine)
    assert read_sealed(broker_vault, tenant_id=tenant, provider="shopify")[0].version == (
        after.version
    )
    assert shopify.refresh_calls_by_shop[shop] == 1

    logged = workers.output(worker)
    assert "integrations.refresh_due_tokens" in logged
    for value in (*old.values(), *new.values(), CLIENT_SECRET):
        assert value not in logged
    with engine.connect() as conn:
        for table in ("procrastinate_jobs", "procrastinate_events"):
            dump = conn.execute(
                # The table names come from the fixed tuple above.
                text(f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t")  # noqa: S608
            ).scalar_one()
            for value in (*old.values(), *new.values()):
                assert value not in dump
