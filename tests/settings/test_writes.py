"""The settings PATCH's write (`broker.core.db.write`) on the real PostgreSQL.

A change and its audit event commit together or not at all; a refused patch
leaves no transaction open; a patch that lost a race merges again (or, with
If-Match, is a 412); a server that stops mid-PATCH is a bounded 503 with nothing
half-written.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.auth.principal import Principal
from broker.core import context, db
from broker.core.config import Settings
from broker.core.context import RequestContext
from broker.core.db import DatabaseBounds, make_engine, upgrade
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.settings import service
from broker.vault.gateway import VaultGateway
from tests.core.test_db import paused
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

SLACK_S = 20.0


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def _events(engine: Engine, request_id: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT detail FROM audit_events WHERE request_id = :rid"), {"rid": request_id}
            ).scalars()
        )


def _version(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        version: int = conn.execute(
            text("SELECT version FROM tenant_settings WHERE tenant_id = :t"), {"t": tenant}
        ).scalar_one()
    return version


@pytest.fixture
def failing_trail(engine: Engine, tenant: str) -> Iterator[None]:
    """The audit trail refuses every event of `tenant` (a trigger raises), for the test."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION test_refuse_events() RETURNS trigger AS $$ BEGIN"
                f" IF NEW.tenant_id = '{tenant}' THEN RAISE EXCEPTION 'trail refused'; END IF;"
                " RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER test_refuse_events BEFORE INSERT ON audit_events"
                " FOR EACH ROW EXECUTE FUNCTION test_refuse_events()"
            )
        )
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER test_refuse_events ON audit_events"))
            conn.execute(text("DROP FUNCTION test_refuse_events()"))


@pytest.mark.usefixtures("failing_trail")
def test_a_change_whose_audit_event_cannot_be_written_is_not_made(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    # The session's client, without a lifespan: its shutdown would close the shared
    # app's egress client for every later test.
    refused = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": True}}, headers=admin(tenant)
    )
    assert refused.status_code == 500
    assert "trail refused" not in refused.text
    assert _version(engine, tenant) == 1
    with engine.connect() as conn:
        orders = conn.execute(
            text("SELECT orders FROM tenant_settings WHERE tenant_id = :t"), {"t": tenant}
        ).scalar_one()
    assert orders.get("auto_confirm") is not True


def test_each_write_has_exactly_its_own_event_and_a_refused_one_none(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    changed = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": True}}, headers=admin(tenant)
    )
    assert changed.status_code == 200, changed.text
    assert _events(engine, changed.headers["x-request-id"]) == [
        {"groups": ["orders"], "changed": ["orders"], "version": 2}
    ]
    same = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": True}}, headers=admin(tenant)
    )
    assert same.headers["etag"] == changed.headers["etag"] == '"2"'
    assert same.content == changed.content
    assert _events(engine, same.headers["x-request-id"]) == [
        {"groups": ["orders"], "changed": [], "version": 2}
    ]
    stale = client.patch(
        "/v1/tenants/settings",
        json={"orders": {"auto_confirm": False}},
        headers=admin(tenant) | {"If-Match": '"1"'},
    )
    invalid = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": 3}}, headers=admin(tenant)
    )
    assert (stale.status_code, invalid.status_code) == (412, 422)
    for refused in (stale, invalid):
        assert _events(engine, refused.headers["x-request-id"]) == []
    assert _version(engine, tenant) == 2


def test_a_refused_patch_leaves_no_transaction_open(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    for _ in range(3):
        stale = client.patch(
            "/v1/tenants/settings",
            json={"orders": {"auto_confirm": False}},
            headers=admin(tenant) | {"If-Match": '"7"'},
        )
        assert stale.status_code == 412
    with engine.connect() as conn:
        open_transactions = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                " AND datname = current_database() AND state LIKE 'idle in transaction%'"
            ),
            {"name": db.READER_NAME},
        ).scalar_one()
        # The row is not left locked either: another writer takes it at once.
        conn.execute(text("SET lock_timeout = '1s'"))
        conn.execute(
            text("SELECT 1 FROM tenant_settings WHERE tenant_id = :t FOR UPDATE"), {"t": tenant}
        )
    assert open_transactions == 0


def test_a_server_that_dropped_the_idle_connections_is_healed_for_a_write_too(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    patch = {"orders": {"auto_confirm": True}}
    assert client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant)).is_success
    with engine.connect() as conn:
        ended = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name AND datname = current_database()"
            ),
            {"name": db.READER_NAME},
        ).scalar_one()
    assert ended >= 1
    again = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": False}}, headers=admin(tenant)
    )
    assert again.status_code == 200, again.text
    assert again.json()["version"] == 3


# -- a lost race ------------------------------------------------------------------------


def _racing_resolver(engine: Engine, tenant: str, lookups: list[str]) -> Any:
    """A resolver that, on its first lookup, lets another writer change the row first.

    The lookup runs between the PATCH's read and its write, as a slow DNS answer
    would: the write then finds the row at a newer version than the one it read.
    """

    def resolve(host: str, port: int) -> list[str]:
        if not lookups:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE tenant_settings SET version = version + 1,"
                        " feature_flags = feature_flags || '{\"auto_handoff_enabled\": true}',"
                        ' branding = branding || \'{"business_name": "Raced"}\''
                        " WHERE tenant_id = :t"
                    ),
                    {"t": tenant},
                )
        lookups.append(host)
        return ["93.184.216.34"]

    return resolve


def _with_resolver(monkeypatch: pytest.MonkeyPatch, client: TestClient, resolver: Any) -> None:
    """The app answers with `resolver` until the test ends (the app is the session's)."""
    state = client.app.state  # type: ignore[attr-defined]
    egress = EgressClient(EgressPolicy(), resolver=resolver)
    # Starlette's State keeps its attributes in `_state`: restored as an item.
    monkeypatch.setitem(
        state._state, "outbound", dataclasses.replace(state.outbound, client=egress)
    )


def test_a_patch_that_lost_the_race_merges_again_and_both_changes_survive(
    client: TestClient, engine: Engine, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    _with_resolver(monkeypatch, client, _racing_resolver(engine, tenant, lookups))
    logo = {"branding": {"logo_url": "https://cdn.example.com/l.png"}}
    patched = client.patch("/v1/tenants/settings", json=logo, headers=admin(tenant))
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["version"] == 3
    assert patched.headers["etag"] == '"3"'
    assert body["branding"]["logo_url"] == "https://cdn.example.com/l.png"
    assert body["feature_flags"]["auto_handoff_enabled"] is True
    assert body["branding"]["business_name"] == "Raced"  # the same group, merged again
    assert lookups == ["cdn.example.com"]  # judged once, not again after the race
    assert _events(engine, patched.headers["x-request-id"]) == [
        {"groups": ["branding"], "changed": ["branding"], "version": 3}
    ]


def test_a_patch_with_if_match_that_lost_the_race_is_412_and_writes_nothing(
    client: TestClient, engine: Engine, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_resolver(monkeypatch, client, _racing_resolver(engine, tenant, []))
    logo = {"branding": {"logo_url": "https://cdn.example.com/l.png"}}
    refused = client.patch(
        "/v1/tenants/settings", json=logo, headers=admin(tenant) | {"If-Match": '"1"'}
    )
    assert refused.status_code == 412, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert _events(engine, refused.headers["x-request-id"]) == []
    body = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert body["version"] == 2
    assert body["branding"].get("logo_url") is None
    assert body["feature_flags"]["auto_handoff_enabled"] is True


# -- a server that stops mid-PATCH ------------------------------------------------------


@pytest.fixture
def stoppable_postgres() -> Iterator[tuple[int, str]]:
    """A private PostgreSQL this test may pause: (postmaster pid, migrated database URL)."""
    from broker.devstack.postgres import EmbeddedPostgres, create_database

    data_dir = Path(tempfile.mkdtemp(prefix="broker-test-pg-"))
    try:
        with EmbeddedPostgres(data_dir) as pg:
            url = create_database(pg.url, "broker_writes")
            upgrade(url)
            assert pg.pid is not None
            yield pg.pid, url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _until_waiting_on_the_row(engine: Engine) -> None:
    deadline = time.monotonic() + SLACK_S
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND application_name = :name AND datname = current_database()"
    )
    while True:
        with engine.connect() as conn:
            if conn.execute(query, {"name": db.READER_NAME}).scalar_one():
                return
        assert time.monotonic() < deadline, "the PATCH never reached the row lock"
        time.sleep(0.05)


def test_a_server_that_stops_mid_patch_is_a_bounded_503_and_nothing_is_half_written(
    settings: Settings, stoppable_postgres: tuple[int, str]
) -> None:
    pid, url = stoppable_postgres
    bounded = make_engine(url, DatabaseBounds(statement_timeout_s=2.0, connect_timeout_s=2))
    observer = make_engine(url)
    own = Settings(_env_file=None, **(settings.model_dump() | {"database_url": url}))
    client = TestClient(create_app(own, engine=bounded, vault=VaultGateway.from_settings(own)))
    tenant = make_tenant(client)
    result: list[httpx.Response] = []
    patch = {"orders": {"auto_confirm": True}}
    send = threading.Thread(
        target=lambda: result.append(
            client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant))
        ),
        daemon=True,
    )
    with observer.connect() as holder:
        # Another transaction holds the row: the PATCH's write waits on it, in flight
        # when the server stops.
        holder.execute(
            text("SELECT 1 FROM tenant_settings WHERE tenant_id = :t FOR UPDATE"), {"t": tenant}
        )
        send.start()
        _until_waiting_on_the_row(observer)
        with paused(pid):
            send.join(SLACK_S)
            answered_while_stopped = not send.is_alive()
        holder.rollback()
    send.join(SLACK_S)
    assert answered_while_stopped, "the PATCH waited on the stopped server"
    (stopped,) = result
    assert stopped.status_code == 503, stopped.text
    assert int(stopped.headers["retry-after"]) > 0
    assert _version(observer, tenant) == 1
    assert _events(observer, stopped.headers["x-request-id"]) == []
    # The server is back: the next PATCH lands, with its event.
    landed = client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant))
    assert landed.status_code == 200, landed.text
    assert _events(observer, landed.headers["x-request-id"])[0]["version"] == 2
    bounded.dispose()
    observer.dispose()


# -- a write sent again after its connection died -----------------------------------------


def test_a_resent_write_whose_first_attempt_landed_is_reported_as_written(
    engine: Engine, tenant: str
) -> None:
    """`db.write` sends a statement again when its reused connection turns out dead, and
    the first attempt may have committed before it died. The resend finds the row moved
    on, and its own audit event: the write landed, it is no lost race (nor a 412)."""
    principal = Principal(
        subject="alice", kind="user", scopes=frozenset({"tenant:admin"}), tenant_id=tenant
    )
    patch = {"branding": {"business_name": "Landed"}}

    async def scenario() -> list[tuple[Any, ...] | None]:
        context.bind(RequestContext(request_id=f"resent-{tenant}"))  # this task's context only
        row = await db.read(engine, partial(service._fetch_document, tenant_id=tenant))
        assert row is not None
        changed = service._changed_groups(row, patch)
        write = service._DocumentWrite(row, principal, patch, changed)
        first = await db.write(engine, write)
        resent = await db.write(engine, write)  # the same attempt, sent again
        # Another request's write from the same stale row: a lost race, whether sent
        # once or again (no event of its own for that version).
        context.bind(RequestContext(request_id=f"other-{tenant}"))
        other = service._DocumentWrite(row, principal, patch, changed)
        lost = await db.write(engine, other)
        lost_again = await db.write(engine, other)
        return [first, resent, lost, lost_again]

    first, resent, lost, lost_again = anyio.run(scenario)
    assert first is not None
    assert first[1] == 2
    assert resent == first
    assert lost is None
    assert lost_again is None
    assert _version(engine, tenant) == 2
    assert _events(engine, f"resent-{tenant}") == [
        {"groups": ["branding"], "changed": ["branding"], "version": 2}
    ]
    assert _events(engine, f"other-{tenant}") == []
