"""A busy, slow or paused PostgreSQL: bounded 503s with Retry-After, and fetches unharmed.

The faults are real: a pool whose connections the test holds, a row lock held
by another transaction, and a private PostgreSQL paused with SIGSTOP.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.pool import QueuePool

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, make_engine, upgrade
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID
from tests.support.serving import serving
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

# Generous: the machines running the suite are small and shared.
SLACK_S = 20.0


def _app(settings: Settings, engine: Engine, **overrides: Any) -> TestClient:
    values = settings.model_dump() | overrides
    own = Settings(_env_file=None, **values)
    return TestClient(create_app(own, engine=engine, vault=VaultGateway.from_settings(own)))


def _in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:  # surfaced by the assertions below
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_an_exhausted_pool_is_a_503_with_retry_after(
    settings: Settings, database_url: str, tenant: str
) -> None:
    engine = make_engine(
        database_url, DatabaseBounds(pool_size=1, max_overflow=0, pool_timeout_s=0.5)
    )
    client = _app(settings, engine)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    try:
        with engine.connect():  # the only connection, taken
            busy = client.get("/v1/tenants/settings", headers=admin)
        assert busy.status_code == 503, busy.text
        assert int(busy.headers["retry-after"]) > 0
        assert busy.headers["content-type"] == "application/problem+json"
        assert "QueuePool" not in busy.text
        # The pool heals as soon as a connection is free again.
        assert client.get("/v1/tenants/settings", headers=admin).status_code == 200
    finally:
        engine.dispose()


def test_a_statement_timeout_is_a_503_not_a_hang(
    settings: Settings, database_url: str, engine: Engine, tenant: str
) -> None:
    bounded = make_engine(database_url, DatabaseBounds(statement_timeout_s=1.0))
    client = _app(settings, bounded)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    patch = {"compliance_settings": {"data_retention_days": 30}}
    with engine.connect() as holder:
        # Another transaction holds the settings row: the PATCH waits on its lock.
        holder.execute(
            text("SELECT 1 FROM tenant_settings WHERE tenant_id = :t FOR UPDATE"), {"t": tenant}
        )
        thread, result = _in_thread(
            lambda: client.patch("/v1/tenants/settings", json=patch, headers=admin)
        )
        thread.join(SLACK_S)
        answered_while_locked = not thread.is_alive()
        holder.rollback()
    thread.join(SLACK_S)
    bounded.dispose()
    assert answered_while_locked, "the PATCH waited on the lock instead of timing out"
    (response,) = result
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert "canceling statement" not in response.text


def _until_blocked_on_a_lock(engine: Engine) -> None:
    deadline = time.monotonic() + SLACK_S
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    while True:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        assert time.monotonic() < deadline, "the PATCH never reached the row lock"
        time.sleep(0.05)


def test_waiting_for_a_session_is_bounded_too(
    settings: Settings, database_url: str, engine: Engine, tenant: str
) -> None:
    # One connection, taken by a PATCH that waits on a row lock: the next
    # request waits for a session, at most the pool timeout, then hears 503.
    bounds = DatabaseBounds(
        pool_size=1, max_overflow=0, pool_timeout_s=0.5, statement_timeout_s=10.0
    )
    bounded = make_engine(database_url, bounds)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    patch = {"compliance_settings": {"data_retention_days": 30}}
    with _app(settings, bounded) as client, engine.connect() as holder:
        holder.execute(
            text("SELECT 1 FROM tenant_settings WHERE tenant_id = :t FOR UPDATE"), {"t": tenant}
        )
        first, _ = _in_thread(
            lambda: client.patch("/v1/tenants/settings", json=patch, headers=admin)
        )
        _until_blocked_on_a_lock(engine)
        waiting, answered = _in_thread(lambda: client.get("/v1/tenants/settings", headers=admin))
        waiting.join(SLACK_S)
        answered_while_held = not waiting.is_alive()
        holder.rollback()
        first.join(SLACK_S)
    bounded.dispose()
    assert answered_while_held
    (busy,) = answered
    assert busy.status_code == 503, busy.text
    assert int(busy.headers["retry-after"]) > 0


# -- a paused PostgreSQL --------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[tuple[int, str]]:
    """A private PostgreSQL this test may pause: (postmaster pid, migrated database URL)."""
    from broker.devstack.postgres import EmbeddedPostgres, create_database

    data_dir = Path(tempfile.mkdtemp(prefix="broker-test-pg-"))
    try:
        with EmbeddedPostgres(data_dir) as pg:
            url = create_database(pg.url, "broker_stall")
            upgrade(url)
            assert pg.pid is not None
            yield pg.pid, url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _family(pid: int) -> list[int]:
    """The postmaster and every backend it forked: all of them must stop to stall queries."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return [pid, *children]


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP the server for the block; SIGCONT whatever happens."""
    family = _family(pid)
    try:
        for member in family:
            os.kill(member, signal.SIGSTOP)
        yield
    finally:
        for member in family:
            with suppress(ProcessLookupError):
                os.kill(member, signal.SIGCONT)


def _dispose_when_settled(engine: Engine) -> None:
    """Dispose of `engine` once the requests and audit writes of the stall have settled.

    A refusal made while the server was paused is recorded on a thread of its own
    (`audit-trail`), which may write only once the server answers again, and a stalled
    request may still be unwinding. A connection returned after a dispose stays open in
    a pool nobody holds, until the collector finalises it during some later test, whose
    ResourceWarning then fails that test. So: wait for them, dispose, and collect what
    the earlier dispose (the app's, at shutdown) left behind now, while this test owns it.
    """
    deadline = time.monotonic() + SLACK_S
    for thread in threading.enumerate():
        if thread.name.startswith("audit-"):
            thread.join(max(0.0, deadline - time.monotonic()))
    pool = engine.pool
    assert isinstance(pool, QueuePool)  # make_engine's pool: it counts what is checked out
    while pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.dispose()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _finished(thread: threading.Thread) -> bool:
    """True when `thread` ends within the slack (it is left running otherwise)."""
    thread.join(SLACK_S)
    return not thread.is_alive()


def _tenant_with_openai(client: TestClient) -> tuple[str, dict[str, str]]:
    """A new tenant with OpenAI credentials stored; and its admin's Authorization header."""
    tenant = make_tenant(client)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    saved = client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"]), "skip_connection_test": True},
        headers=admin,
    )
    assert saved.status_code == 200, saved.text
    return tenant, admin


def _assert_bounded_503s(stalled: list[tuple[threading.Thread, list[Any]]]) -> None:
    """Every stalled settings request was answered: a 200, or a 503 with Retry-After."""
    statuses = {result[0].status_code for _, result in stalled}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses
    assert all(
        int(result[0].headers["retry-after"]) > 0
        for _, result in stalled
        if result[0].status_code == 503
    )


def test_a_paused_database_answers_503s_in_bounded_time_and_fetches_go_on(
    settings: Settings, own_postgres: tuple[int, str]
) -> None:
    pid, url = own_postgres
    engine = make_engine(
        url, DatabaseBounds(statement_timeout_s=1.0, pool_timeout_s=1.0, connect_timeout_s=2)
    )
    with _app(settings, engine, database_url=url) as client:
        tenant, admin = _tenant_with_openai(client)
        service = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
        rogue = bearer(token("credentials:read", kind="service", tenants=("other",)))
        assert client.get(f"/v1/credentials/{tenant}/openai", headers=service).status_code == 200
        with paused(pid):
            # More settings requests than the shared worker threads (40), so
            # database work fills every one of them while the server is stopped.
            stalled = [
                _in_thread(lambda: client.get("/v1/tenants/settings", headers=admin))
                for _ in range(48)
            ]
            fetch, fetched = _in_thread(
                lambda: client.get(f"/v1/credentials/{tenant}/openai", headers=service)
            )
            refusal, refused = _in_thread(
                lambda: client.get(f"/v1/credentials/{tenant}/openai", headers=rogue)
            )
            probe, probed = _in_thread(lambda: client.get("/readyz"))
            fetched_while_paused = _finished(fetch)
            probed_while_paused = _finished(probe)
            refused_while_paused = _finished(refusal)
            answered_while_paused = sum(_finished(thread) for thread, _ in stalled)
        assert fetched_while_paused, "a credential fetch waited on the stopped database"
        assert fetched[0].status_code == 200
        assert fetched[0].json()["fields"]["api_key"] == VALID["openai"]["api_key"]
        assert refused_while_paused, "a refused fetch waited on the stopped database"
        assert refused[0].status_code == 404
        # Degraded, not down: this replica still serves fetches.
        assert probed_while_paused, "readiness waited on the stopped database"
        assert probed[0].status_code == 200
        assert probed[0].json() == {
            "status": "degraded",
            "vault": "ok",
            "database": "unreachable",
            "rate_limits": "ok",
            "stripe": "ok",
        }
        assert answered_while_paused == len(stalled), "settings requests hung through the stall"
        _assert_bounded_503s(stalled)
        # The server is back: the next requests (on the same client) succeed.
        assert client.get("/v1/tenants/settings", headers=admin).status_code == 200
    _dispose_when_settled(engine)


def test_a_burst_of_concurrent_patches_on_one_tenant_all_succeed(
    settings: Settings, database_url: str, tenant: str
) -> None:
    # One event loop, as in production: its worker threads are shared by the burst.
    engine = make_engine(database_url)
    with _app(settings, engine) as client:
        admin = bearer(token("tenant:admin", tenant_id=tenant))

        def patch(days: int) -> httpx.Response:
            response: httpx.Response = client.patch(
                "/v1/tenants/settings",
                json={"compliance_settings": {"data_retention_days": 30 + days}},
                headers=admin,
            )
            return response

        burst = [_in_thread(functools.partial(patch, days)) for days in range(50)]
        for thread, _ in burst:
            thread.join(SLACK_S * 3)
    statuses = [result[0].status_code for _, result in burst]
    # A healthy database: every PATCH lands, one after the other (row lock).
    assert statuses == [200] * len(burst), statuses


def test_a_keep_alive_connection_survives_a_database_stall(
    settings: Settings, own_postgres: tuple[int, str]
) -> None:
    pid, url = own_postgres
    engine = make_engine(
        url, DatabaseBounds(statement_timeout_s=1.0, pool_timeout_s=1.0, connect_timeout_s=2)
    )
    app = _app(settings, engine, database_url=url)
    tenant = make_tenant(app)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with (
        serving(app.app) as base,
        httpx.Client(base_url=base, limits=one_connection, timeout=SLACK_S) as http,
    ):
        assert http.get("/v1/tenants/settings", headers=admin).status_code == 200
        with paused(pid):
            stalled = http.get("/v1/tenants/settings", headers=admin)
        assert stalled.status_code == 503
        assert int(stalled.headers["retry-after"]) > 0
        assert stalled.headers.get("connection") != "close"
        # The same connection carries the next request, which the database answers again.
        assert http.get("/v1/tenants/settings", headers=admin).status_code == 200
    _dispose_when_settled(engine)
