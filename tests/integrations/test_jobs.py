"""`reconcile_pending` on a real `broker worker`: an unanswered write settles with no reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.core.db import unit_of_work
from broker.integrations.jobs import reconcile_pending
from broker.jobs.defer import defer
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint, app_behind_slow_vault
from tests.support.rows import credential_row
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token
from tests.support.workers import BROKER_WORKER, Workers, wait_for

KV_WRITE = b"POST /v1/secret/data/"
FIRST = dict(VALID["twilio"])
SECOND = FIRST | {"auth_token": "e" * 32}


@pytest.fixture
def slow(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders,
) -> Iterator[tuple[TestClient, SlowProxy]]:
    """The broker through a proxy that can hold Vault writes back, with a 1 s Vault timeout."""
    with app_behind_slow_vault(
        vault_endpoint, broker_vault_token, database_url, engine, providers
    ) as slowed:
        yield slowed


def _put(client: TestClient, tenant: str, fields: dict[str, str]) -> Any:
    return client.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": fields},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )


def _status(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT status FROM procrastinate_jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        )


def _reconcile(engine: Engine) -> int:
    """Queue a run and wait for it; a periodic tick may be waiting already (queueing lock)."""
    job_id: int | None = None

    def queued() -> bool:
        nonlocal job_id
        with unit_of_work(engine) as session:
            job_id = defer(session, reconcile_pending)
        return job_id is not None

    wait_for(queued, timeout_s=30, what="a reconcile job to be queued")
    assert job_id is not None
    wait_for(lambda: _status(engine, job_id) == "succeeded", timeout_s=30, what="the job")
    return job_id


def test_the_worker_settles_a_write_that_landed_after_its_503(
    client: TestClient,
    slow: tuple[TestClient, SlowProxy],
    providers: FakeProviders,
    engine: Engine,
    vault_admin: VaultGateway,
    workers: Workers,
) -> None:
    broker, proxy = slow
    tenant = make_tenant(client)
    providers.accept("twilio", **SECOND)
    assert _put(broker, tenant, FIRST).status_code == 200
    proxy.delay(KV_WRITE, 2.5)
    assert _put(broker, tenant, SECOND).status_code == 503
    proxy.clear()
    path = f"tenants/{tenant}/integrations/twilio"
    wait_for(
        lambda: (
            int((vault_admin.kv.metadata(path) or {"current_version": 0})["current_version"]) == 2
        ),
        timeout_s=15,
        what="the held write to land",
    )
    # Vault holds version 2; the row still says 1, pending, and nobody reads it.
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.vault_sync_pending) == (1, True)

    worker = workers.start(BROKER_WORKER, BROKER_LOG_LEVEL="DEBUG")
    _reconcile(engine)
    settled = credential_row(engine, tenant)
    assert (settled.kv_version, settled.vault_sync_pending) == (2, False)
    assert settled.hints["auth_token"].endswith("eeee")

    # Idempotent: a second run finds nothing to do and changes nothing.
    _reconcile(engine)
    assert credential_row(engine, tenant) == settled

    # The secret it handled is in neither the worker's log nor the queue's tables.
    logged = workers.output(worker)
    assert "integrations.reconcile_pending" in logged
    assert SECOND["auth_token"] not in logged
    with engine.connect() as conn:
        for table in ("procrastinate_jobs", "procrastinate_events"):
            # The table names come from the fixed tuple above.
            dump = f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t"  # noqa: S608
            assert SECOND["auth_token"] not in conn.execute(text(dump)).scalar_one()
