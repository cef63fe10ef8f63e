"""The change feed: scoped to the caller's tenants, ordered by commit, long-polled."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.core.db import unit_of_work
from broker.events import outbox
from tests.fakes.providers import FakeProviders
from tests.integrations.test_routes import put, valid_fields
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

FEED = "/v1/events"


def service(*tenants: str) -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=tenants, subject="sync"))


def head(client: TestClient, headers: dict[str, str]) -> str:
    response = client.get(FEED, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["events"] == []
    return str(response.json()["cursor"])


def read(client: TestClient, headers: dict[str, str], after: str, **params: Any) -> Any:
    response = client.get(FEED, params={"after": after, **params}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_caller_sees_only_its_tenants(client: TestClient, providers: FakeProviders) -> None:
    first, second = make_tenant(client), make_tenant(client)
    ops = bearer(token("platform:admin", subject="ops"))
    start = head(client, ops)
    for tenant in (first, second):
        assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200

    served = read(client, service(first), start)
    assert [(e["tenant_id"], e["type"]) for e in served["events"]] == [
        (first, outbox.CREDENTIAL_SAVED)
    ]
    own = read(client, bearer(token("tenant:admin", tenant_id=second)), start)
    assert [e["tenant_id"] for e in own["events"]] == [second]
    everything = read(client, ops, start, limit=500)
    assert {first, second} <= {e["tenant_id"] for e in everything["events"]}

    # Nothing new after the cursor handed out.
    assert read(client, service(first), served["cursor"])["events"] == []
    narrowed = client.get(FEED, params={"after": start, "tenant": second}, headers=service(first))
    assert narrowed.status_code == 403


def test_a_malformed_cursor_is_refused_without_echoing_it(client: TestClient, tenant: str) -> None:
    bad = "1-2-3<script>"
    response = client.get(FEED, params={"after": bad}, headers=service(tenant))
    assert response.status_code == 422
    assert bad not in response.text


def test_an_event_committed_late_is_not_skipped(client: TestClient, engine: Engine) -> None:
    tenant = make_tenant(client)
    headers = service(tenant)
    start = head(client, headers)
    slow = engine.connect()
    try:
        slow_tx = slow.begin()
        from sqlmodel import Session

        early = Session(bind=slow)
        # The slow transaction writes first (takes its id first), commits last.
        outbox.emit(early, outbox.CREDENTIAL_SAVED, actor="user:slow", tenant_id=tenant)
        early.flush()
        with unit_of_work(engine) as session:
            outbox.emit(session, outbox.CREDENTIAL_DELETED, actor="user:fast", tenant_id=tenant)
        # The fast one committed, but an older transaction is still open: nothing yet.
        waiting = read(client, headers, start)
        assert waiting["events"] == []
        slow_tx.commit()
        early.close()
    finally:
        slow.close()
    page = read(client, headers, waiting["cursor"])
    assert [e["actor"] for e in page["events"]] == ["user:slow", "user:fast"]


def test_a_long_poll_returns_as_soon_as_a_change_commits(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    headers = service(tenant)
    start = head(client, headers)
    assert read(client, headers, start, wait=0.2)["events"] == []
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer.update(read(client, headers, start, wait=20))

    polling = threading.Thread(target=poll)
    polling.start()
    assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    polling.join(30)
    assert not polling.is_alive()
    assert [e["type"] for e in answer["events"]] == [outbox.CREDENTIAL_SAVED]
    assert answer["events"][0]["provider"] == "openai"


@pytest.mark.parametrize("scopes", [("finance:view",), ("credentials:read",)])
def test_callers_without_a_tenant_to_follow_get_nothing(
    client: TestClient, tenant: str, scopes: tuple[str, ...]
) -> None:
    response = client.get(FEED, headers=bearer(token(*scopes)))
    assert response.status_code == 403
