"""The asyncio read path (`broker.core.db.read`) on the real PostgreSQL.

Settings reads take it. Its connections count against the engine's one budget,
a server that restarted under them is healed without an error, and the body a
worker remembers is never older than the row another worker (or replica) wrote.
The paused-server and statement-timeout cases are in test_db.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.core import db
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, make_engine
from broker.vault.gateway import VaultGateway
from tests.support.metrics import metric_value
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def _app(settings: Settings, engine: Engine) -> TestClient:
    return TestClient(
        create_app(settings, engine=engine, vault=VaultGateway.from_settings(settings))
    )


@pytest.fixture
def small_engine(database_url: str) -> Iterator[Engine]:
    """An engine with a budget of one connection."""
    engine = make_engine(
        database_url, DatabaseBounds(pool_size=1, max_overflow=0, pool_timeout_s=0.5)
    )
    yield engine
    engine.dispose()


def test_reads_in_progress_count_against_the_budget(
    settings: Settings, small_engine: Engine, tenant: str
) -> None:
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    started, release = threading.Event(), threading.Event()

    async def held(connection: Any) -> None:
        started.set()
        await anyio.to_thread.run_sync(release.wait)

    # A read on another event loop (another request) holds the only connection.
    holder = threading.Thread(target=anyio.run, args=(db.read, small_engine, held), daemon=True)
    holder.start()
    try:
        assert started.wait(10)
        with _app(settings, small_engine) as client:
            busy = client.get("/v1/tenants/settings", headers=admin)
            assert busy.status_code == 503, busy.text
            assert int(busy.headers["retry-after"]) > 0
            assert busy.headers["content-type"] == "application/problem+json"
            release.set()
            holder.join(10)
            assert client.get("/v1/tenants/settings", headers=admin).status_code == 200
            metrics = client.get("/metrics").text
    finally:
        release.set()
        holder.join(10)
    assert metric_value(metrics, "broker_db_pool_timeouts_total") == 1


def test_a_server_that_dropped_the_idle_read_connections_is_healed_without_an_error(
    settings: Settings, small_engine: Engine, engine: Engine, tenant: str
) -> None:
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    with _app(settings, small_engine) as client:
        assert client.get("/v1/tenants/settings", headers=admin).status_code == 200
        # What a restart does to them: the server ends every idle read connection.
        with engine.connect() as admin_conn:
            ended = admin_conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": db.READER_NAME},
            ).scalar_one()
        assert ended >= 1
        again = client.get("/v1/tenants/settings", headers=admin)
        assert again.status_code == 200, again.text


def test_a_write_by_another_worker_is_read_at_once(
    settings: Settings, database_url: str, engine: Engine
) -> None:
    # Two apps with engines of their own: two workers, or two replicas.
    first_engine, second_engine = make_engine(database_url), make_engine(database_url)
    try:
        with _app(settings, first_engine) as first, _app(settings, second_engine) as second:
            tenant = make_tenant(first)
            admin = bearer(token("tenant:admin", tenant_id=tenant))
            before = first.get("/v1/tenants/settings", headers=admin)
            assert first.get("/v1/tenants/settings", headers=admin).json() == before.json()
            patched = second.patch(
                "/v1/tenants/settings",
                json={"branding": {"footer_text": "from the other worker"}},
                headers={**admin, "If-Match": before.headers["etag"]},
            )
            assert patched.status_code == 200, patched.text
            after = first.get("/v1/tenants/settings", headers=admin)
            assert after.headers["etag"] == patched.headers["etag"] != before.headers["etag"]
            assert after.json() == patched.json()
            assert after.json()["branding"]["footer_text"] == "from the other worker"
            # Even a change that leaves the version alone is seen: what a worker
            # remembers is keyed by the whole row, not by its version.
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE tenant_settings SET branding = jsonb_set(branding,"
                        " '{footer_text}', '\"set in SQL\"') WHERE tenant_id = :t"
                    ),
                    {"t": tenant},
                )
            latest = first.get("/v1/tenants/settings", headers=admin)
            assert latest.json()["branding"]["footer_text"] == "set in SQL"
            assert latest.headers["etag"] == after.headers["etag"]
    finally:
        first_engine.dispose()
        second_engine.dispose()


def test_disposing_of_the_engine_closes_its_read_connections(
    settings: Settings, database_url: str, engine: Engine, tenant: str
) -> None:
    own = make_engine(database_url)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    # Other engines of the session (other apps') may hold read connections of their own.
    others = _open_read_connections(engine)
    with _app(settings, own) as client:
        assert client.get("/v1/tenants/settings", headers=admin).status_code == 200
        assert _open_read_connections(engine) == others + 1
    # The app's shutdown disposed of the engine.
    assert _settles_at(engine, others) == others


def _open_read_connections(engine: Engine) -> int:
    with engine.connect() as conn:
        count: int = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = :name AND datname = current_database()"
            ),
            {"name": db.READER_NAME},
        ).scalar_one()
    return count


def _settles_at(engine: Engine, expected: int) -> int:
    """The count of open read connections, once it reaches `expected` (or after a while).

    A closed connection's server process leaves pg_stat_activity a moment later.
    """
    deadline = time.monotonic() + 20
    while (count := _open_read_connections(engine)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def test_after_a_burst_only_as_many_read_connections_stay_open_as_the_pool_keeps(
    database_url: str, engine: Engine
) -> None:
    bursty = make_engine(database_url, DatabaseBounds(pool_size=1, max_overflow=2))
    others = _open_read_connections(engine)  # other engines' in this session

    during: list[int] = []

    async def burst() -> None:
        arrived = 0
        everyone_in = anyio.Event()

        async def held(connection: Any) -> None:
            nonlocal arrived
            arrived += 1
            if arrived == 3:  # three reads at once, each on a connection of its own
                during.append(_open_read_connections(engine) - others)
                everyone_in.set()
            await everyone_in.wait()

        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(db.read, bursty, held)

    try:
        anyio.run(burst)
        assert during == [3]
        assert _settles_at(engine, others + 1) == others + 1
    finally:
        bursty.dispose()
    assert _settles_at(engine, others) == others
