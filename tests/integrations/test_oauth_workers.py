"""The refresh job on two real `broker worker` processes: kills, overlaps and batches.

The job refreshes every due credential in the database, so this module has a database
of its own: nothing another test left due can take a place in a batch, and the
workers call only this module's fake Shopify. Workers keep the real time; tokens are
connected with five minutes to live, inside the ten-minute refresh window at once.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, select

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import make_engine, unit_of_work, upgrade
from broker.devstack.openbao import free_port
from broker.devstack.postgres import create_database
from broker.integrations.jobs import REFRESH_DUE, refresh_due_tokens
from broker.integrations.oauth import due_for_refresh
from broker.integrations.service import read_sealed
from broker.jobs.defer import defer
from broker.models import AuditEvent, IntegrationCredential
from broker.vault.gateway import VaultGateway
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth
from tests.integrations.test_oauth import CALLBACK, REDIRECT_BASE, RETURN, _shop, connected
from tests.support.apps import VaultEndpoint, make_settings
from tests.support.leaks import assert_absent, pg_dump, with_vault_audit_log
from tests.support.workers import BROKER_WORKER, Workers, registered_workers, wait_for

CLIENT_ID = "workers-client-" + secrets.token_hex(4)
CLIENT_SECRET = "shpss_workers" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def own_database(database_url: str) -> Iterator[str]:
    """A fresh, migrated database beside the session's, dropped at the end."""
    url = create_database(database_url, f"broker_oauth_workers_{secrets.token_hex(4)}")
    upgrade(url)
    yield url
    server = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as conn:
            name = sa.engine.make_url(url).database
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        server.dispose()


@pytest.fixture(scope="module")
def own_engine(own_database: str) -> Iterator[Engine]:
    engine = make_engine(own_database)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def shopify(vault_admin: VaultGateway) -> Iterator[FakeShopifyOAuth]:
    """The fake Shopify on the real time (workers cannot share a moved clock)."""
    with FakeShopifyOAuth(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=FakeClock()
    ) as fake:
        fake.allowed_redirect_uris = [CALLBACK]
        vault_admin.kv.write(
            "platform/shopify", {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, cas=None
        )
        yield fake


@pytest.fixture(scope="module")
def own_settings(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    own_database: str,
    shopify: FakeShopifyOAuth,
) -> Settings:
    return make_settings(
        vault_endpoint,
        broker_vault_token,
        own_database,
        shopify_base_url=shopify.base_url,
        egress_allow_http=True,
        egress_allow_loopback=True,
        oauth_redirect_base_url=REDIRECT_BASE,
        oauth_return_urls=[RETURN],
    )


@pytest.fixture(scope="module")
def own_client(own_settings: Settings, own_engine: Engine) -> Iterator[TestClient]:
    """The broker on the module's database, for connecting shops."""
    vault = VaultGateway.from_settings(own_settings)
    try:
        app = create_app(own_settings, engine=own_engine, vault=vault)
        yield TestClient(app, raise_server_exceptions=False)
    finally:
        vault.close()


@pytest.fixture
def workers(own_settings: Settings, own_engine: Engine, tmp_path: Path) -> Iterator[Workers]:
    with Workers(own_settings, own_engine, tmp_path) as started:
        yield started


@pytest.fixture(autouse=True)
def _released(shopify: FakeShopifyOAuth) -> Iterator[None]:
    yield
    shopify.refresh_reply_delay_s = 0
    shopify.refresh_replies.set()


def _connect_due(client: TestClient, shopify: FakeShopifyOAuth, count: int) -> dict[str, str]:
    """`count` connected tenants whose tokens have five minutes left: {tenant: shop}."""
    shopify.access_ttl_s = 300
    try:
        return {connected(client, shop): shop for shop in (_shop() for _ in range(count))}
    finally:
        shopify.access_ttl_s = 3600


def _versions(vault: VaultGateway, tenants: dict[str, str]) -> dict[str, int]:
    return {
        tenant: read_sealed(vault, tenant_id=tenant, provider="shopify")[0].version
        for tenant in tenants
    }


def _queue(engine: Engine, *, lock: str | None = None) -> int:
    """A run of the refresh job, queued before any worker starts (so nothing holds its lock).

    With `lock`, under that lock and queueing lock instead of the task's own.
    """
    with unit_of_work(engine) as session:
        job_id = defer(session, refresh_due_tokens, lock=lock, queueing_lock=lock)
    assert job_id is not None
    return job_id


def _jobs(engine: Engine, after: int) -> list[Any]:
    """Runs of the refresh job from `after` on: (id, status, args, worker_id)."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, status, args, worker_id FROM procrastinate_jobs "
                    "WHERE task_name = :task AND id >= :after ORDER BY id"
                ),
                {"task": REFRESH_DUE, "after": after},
            )
        )


def _settled(engine: Engine, after: int) -> bool:
    return all(job.status not in ("todo", "doing") for job in _jobs(engine, after))


def _window() -> datetime:
    """The end of the refresh job's look-ahead (its default ten minutes) from now."""
    return datetime.now(UTC) + timedelta(seconds=600)


def _silence_ticks(engine: Engine, minutes: int = 5) -> None:
    """Mark the refresh job's minute ticks of the next `minutes` as already deferred.

    A worker then queues no tick of its own (not even the one it catches up on when it
    starts), so every run is the test's own or one a run queued itself.
    """
    now = int(time.time()) // 60 * 60
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO procrastinate_periodic_defers"
                " (task_name, periodic_id, defer_timestamp)"
                " VALUES (:task, '', :at) ON CONFLICT DO NOTHING"
            ),
            [{"task": REFRESH_DUE, "at": now + 60 * n} for n in range(minutes + 1)],
        )


def _start(workers: Workers, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """A `broker worker` and its id in the queue."""
    before = registered_workers(workers.engine)
    proc = workers.start([*BROKER_WORKER, *args], **env)
    (worker_id,) = registered_workers(workers.engine) - before
    return proc, worker_id


def _reaching(shopify: FakeShopifyOAuth, **extra: str) -> dict[str, str]:
    return {
        "BROKER_SHOPIFY_BASE_URL": shopify.base_url,
        "BROKER_EGRESS_ALLOW_HTTP": "true",
        "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
        **extra,
    }


def test_a_worker_killed_mid_refresh_burns_no_token_and_the_next_completes_it(
    own_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    own_engine: Engine,
    workers: Workers,
) -> None:
    (tenant, shop) = next(iter(_connect_due(own_client, shopify, 1).items()))
    before, old = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
    assert shopify.refresh_calls_by_shop[shop] == 0
    # Shopify rotates, then holds its answer: the worker dies waiting for it.
    shopify.refresh_replies.clear()
    job_id = _queue(own_engine)
    started: dict[int, subprocess.Popen[bytes]] = {}
    for _ in range(2):
        proc, worker_id = _start(workers, **_reaching(shopify))
        started[worker_id] = proc
    wait_for(lambda: shopify.refresh_calls_by_shop[shop] == 1, timeout_s=60, what="a rotation")
    (running,) = (job.worker_id for job in _jobs(own_engine, job_id) if job.id == job_id)
    victim = started.pop(running)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    shopify.refresh_replies.set()  # too late for the dead worker

    # The survivor retries the stalled run (or its own tick runs in its place).
    wait_for(lambda: _settled(own_engine, job_id), timeout_s=90, what="the refresh to complete")
    after, new = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
    assert after.version == before.version + 1  # one new version: the dead worker stored none
    assert new["access_token"] != old["access_token"]
    assert shopify.token_valid(new["access_token"])
    assert shopify.refresh_token_valid(shop, new["refresh_token"])
    # The dead worker's refresh rotated; the survivor's, with the same previous refresh
    # token (still valid, its replacement never used), recovered.
    assert shopify.refresh_calls_by_shop[shop] == 2
    with Session(own_engine) as session:
        row = session.get(IntegrationCredential, (tenant, "shopify"))
        assert row is not None
        assert not row.needs_reconnect
        assert row.kv_version == after.version
        refreshes = session.exec(
            select(AuditEvent)
            .where(AuditEvent.tenant_id == tenant)
            .where(AuditEvent.action == "integration.oauth.refresh")
        ).all()
    assert [(event.actor, event.outcome) for event in refreshes] == [
        ("service:broker-worker", "success")
    ]
    (survivor,) = started.values()
    for value in (*old.values(), *new.values(), CLIENT_SECRET):
        assert value not in workers.output(survivor)


def test_two_runs_at_once_on_two_workers_never_refresh_a_credential_twice(
    own_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    own_engine: Engine,
    workers: Workers,
) -> None:
    tenants = _connect_due(own_client, shopify, 6)
    before = _versions(broker_vault, tenants)
    # Two runs the job's own lock would keep apart (as after a deploy that renamed it):
    # only the per-credential locks stand between them. Each worker takes one.
    shopify.refresh_replies.clear()
    key = secrets.token_hex(4)
    first = _queue(own_engine, lock=f"{key}-a")
    second = _queue(own_engine, lock=f"{key}-b")
    _start(workers, "--concurrency", "1", **_reaching(shopify))
    _start(workers, "--concurrency", "1", **_reaching(shopify))

    def both_running() -> bool:
        running = [job for job in _jobs(own_engine, first) if job.id in (first, second)]
        return all(job.status == "doing" for job in running)

    # Replies held: neither run can finish before the other has started.
    wait_for(both_running, timeout_s=60, what="both runs to start")
    shopify.refresh_replies.set()
    wait_for(lambda: _settled(own_engine, first), timeout_s=90, what="both runs")

    ran = {job.id: job for job in _jobs(own_engine, first)}
    assert ran[first].status == ran[second].status == "succeeded"
    assert ran[first].worker_id != ran[second].worker_id
    assert {shopify.refresh_calls_by_shop[shop] for shop in tenants.values()} == {1}
    after = _versions(broker_vault, tenants)
    assert after == {tenant: version + 1 for tenant, version in before.items()}
    for tenant in tenants:
        _, sealed = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
        assert shopify.token_valid(sealed["access_token"])


def test_more_due_than_one_batch_are_refreshed_by_runs_back_to_back(
    own_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    own_engine: Engine,
    workers: Workers,
) -> None:
    tenants = _connect_due(own_client, shopify, 7)
    before = _versions(broker_vault, tenants)
    # Another test may have left some due (run alone, only these seven are).
    due = len(due_for_refresh(own_engine, provider="shopify", before=_window(), limit=10_000))
    assert due >= len(tenants)
    _silence_ticks(own_engine)
    job_id = _queue(own_engine)
    _start(workers, **_reaching(shopify, BROKER_OAUTH_REFRESH_BATCH="2"))

    def drained() -> bool:
        now = _versions(broker_vault, tenants)
        return all(now[t] > v for t, v in before.items()) and _settled(own_engine, job_id)

    # With the minute ticks silenced, only runs queued back to back can get there.
    wait_for(drained, timeout_s=90, what="every due token to be refreshed")
    assert _versions(broker_vault, tenants) == {t: v + 1 for t, v in before.items()}
    assert {shopify.refresh_calls_by_shop[shop] for shop in tenants.values()} == {1}
    # Two a run: every full run queued the next itself (7 due: 4 runs, 3 of them full).
    runs = _jobs(own_engine, job_id)
    assert [(job.status, job.args) for job in runs] == [("succeeded", {})] * (due // 2 + 1)


def test_a_batch_that_only_failed_does_not_queue_another_run(
    own_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    own_engine: Engine,
    workers: Workers,
) -> None:
    tenants = _connect_due(own_client, shopify, 3)
    before = _versions(broker_vault, tenants)
    _silence_ticks(own_engine)
    job_id = _queue(own_engine)
    # Shopify is down: nothing listens where the worker looks for it.
    down = {"BROKER_SHOPIFY_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    _start(workers, **_reaching(shopify, BROKER_OAUTH_REFRESH_BATCH="2", **down))

    def finished() -> bool:
        (job,) = (job for job in _jobs(own_engine, job_id) if job.id == job_id)
        return bool(job.status in ("succeeded", "failed"))

    wait_for(finished, timeout_s=60, what="the run")
    # A full batch, none refreshed: the next run waits for the minute tick. (A run
    # queues its successor before it ends, so there is nothing more to wait for.)
    assert [(job.id, job.status) for job in _jobs(own_engine, job_id)] == [(job_id, "succeeded")]
    assert _versions(broker_vault, tenants) == before
    assert sum(shopify.refresh_calls_by_shop[shop] for shop in tenants.values()) == 0
    with Session(own_engine) as session:
        rows = [session.get(IntegrationCredential, (t, "shopify")) for t in tenants]
    # Still due, not given up on: the next tick tries again.
    assert all(row is not None and not row.needs_reconnect for row in rows)


def test_no_token_or_client_secret_reaches_the_queue_the_worker_logs_or_a_dump(
    own_client: TestClient,
    shopify: FakeShopifyOAuth,
    broker_vault: VaultGateway,
    own_engine: Engine,
    own_database: str,
    vault_endpoint: VaultEndpoint,
    workers: Workers,
) -> None:
    tenants = _connect_due(own_client, shopify, 2)
    before = _versions(broker_vault, tenants)
    job_id = _queue(own_engine)
    worker, _ = _start(workers, **_reaching(shopify, BROKER_LOG_LEVEL="DEBUG"))
    wait_for(lambda: _settled(own_engine, job_id), timeout_s=60, what="the run")
    assert _versions(broker_vault, tenants) == {t: v + 1 for t, v in before.items()}

    # Every token Shopify issued in this module (connects, refreshes, the one a killed
    # worker never stored), and the app's secret.
    planted = [*shopify.issued_tokens(), CLIENT_SECRET]
    dump = pg_dump(own_database)
    assert "integrations.refresh_due_tokens" in dump  # the queue's tables were scanned
    haystacks = {"database dump": dump, "worker log": workers.output(worker)}
    assert_absent(
        with_vault_audit_log(haystacks, vault_endpoint),
        planted,
        "a token or the client secret appears in the {where}",
    )
