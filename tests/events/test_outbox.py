"""The outbox: every confirmed credential or tenant change leaves one event, in its transaction."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.core.db import unit_of_work
from broker.events import outbox
from broker.models import Event
from tests.fakes.providers import FakeProviders
from tests.integrations.test_routes import admin, put, valid_fields
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def events_of(engine: Engine, tenant: str) -> list[Event]:
    with Session(engine) as session:
        return list(
            session.exec(select(Event).where(Event.tenant_id == tenant).order_by(col(Event.id)))
        )


def kinds(engine: Engine, tenant: str) -> list[tuple[str, str | None, int | None]]:
    return [(e.type, e.provider, e.version) for e in events_of(engine, tenant)]


def test_save_delete_restore_each_announce_once_without_a_secret(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    first = valid_fields("twilio", providers)
    assert put(client, tenant, "twilio", first).status_code == 200
    second = {**first, "auth_token": "bb" * 16}
    providers.accept("twilio", **second)
    assert put(client, tenant, "twilio", second).status_code == 200
    deleted = client.delete("/v1/tenants/settings/integrations/twilio", headers=admin(tenant))
    assert deleted.status_code == 204
    restored = client.post(
        "/v1/tenants/settings/integrations/twilio/versions/1/restore", headers=admin(tenant)
    )
    assert restored.status_code == 200, restored.text

    assert kinds(engine, tenant) == [
        (outbox.CREDENTIAL_SAVED, "twilio", 1),
        (outbox.CREDENTIAL_SAVED, "twilio", 2),
        (outbox.CREDENTIAL_DELETED, "twilio", 2),
        (outbox.CREDENTIAL_RESTORED, "twilio", 3),
    ]
    events = events_of(engine, tenant)
    assert {e.actor for e in events} == {"user:alice"}
    assert events[-1].detail["restored_from"] == 1
    dump = json.dumps([e.model_dump(mode="json") for e in events])
    for name in ("auth_token", "webhook_secret"):
        assert first[name] not in dump
        assert second[name] not in dump


def test_a_change_that_fails_announces_nothing(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    # Rejected by the provider's connection test: nothing stored, nothing announced.
    wrong = {**valid_fields("openai", providers), "api_key": "sk-proj-" + "x" * 48}
    assert put(client, tenant, "openai", wrong).status_code == 422
    # A stale If-Match: refused before Vault is written.
    assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    other = {**valid_fields("openai", providers), "api_key": "sk-proj-" + "y" * 48}
    providers.accept("openai", **other)
    stale = put(client, tenant, "openai", other, headers={"If-Match": '"7"'})
    assert stale.status_code == 412
    assert kinds(engine, tenant) == [(outbox.CREDENTIAL_SAVED, "openai", 1)]


def test_an_event_is_rolled_back_with_its_transaction(engine: Engine, tenant: str) -> None:
    class Boom(Exception):
        pass

    def failing_change() -> None:
        with unit_of_work(engine) as session:
            outbox.emit(session, outbox.CREDENTIAL_SAVED, actor="user:x", tenant_id=tenant)
            raise Boom

    with pytest.raises(Boom):
        failing_change()
    assert events_of(engine, tenant) == []
    with unit_of_work(engine) as session:
        outbox.emit(session, outbox.CREDENTIAL_SAVED, actor="user:x", tenant_id=tenant)
    assert len(events_of(engine, tenant)) == 1


def test_emit_refuses_unknown_types_and_documents_in_detail(engine: Engine) -> None:
    with unit_of_work(engine) as session:
        with pytest.raises(ValueError, match="unknown event type"):
            outbox.emit(session, "credential.leaked", actor="user:x")
        with pytest.raises(ValueError, match="plain value"):
            outbox.emit(
                session, outbox.CREDENTIAL_SAVED, actor="user:x", detail={"fields": {"a": "b"}}
            )


def test_deleting_a_tenant_announces_it(client: TestClient, engine: Engine) -> None:
    tenant = make_tenant(client)
    ops = bearer(token("platform:admin", subject="ops"))
    assert client.delete(f"/v1/tenants/{tenant}", headers=ops).status_code == 204
    events = events_of(engine, tenant)
    assert [(e.type, e.actor) for e in events] == [(outbox.TENANT_DELETED, "user:ops")]


def test_old_events_and_finished_deliveries_are_pruned_pending_ones_kept(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    from datetime import timedelta

    from sqlalchemy import text

    from broker.events.housekeeping import prune

    body = {"url": "http://127.0.0.1:9/hook", "event_types": [outbox.HEALTH_CHANGED]}
    created = client.post("/v1/webhooks", json=body, headers=admin(tenant))
    assert created.status_code == 201, created.text
    with unit_of_work(engine) as session:
        kept = outbox.emit(session, outbox.HEALTH_CHANGED, actor="user:x", tenant_id=tenant)
        done = outbox.emit(session, outbox.HEALTH_CHANGED, actor="user:x", tenant_id=tenant)
        gone = outbox.emit(session, outbox.CREDENTIAL_SAVED, actor="user:x", tenant_id=tenant)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE events SET at = at - interval '40 days' WHERE id IN (:a, :b, :c)"),
            {"a": kept, "b": done, "c": gone},
        )
        conn.execute(
            text(
                "UPDATE webhook_deliveries SET created_at = created_at - interval '40 days',"
                " status = CASE WHEN event_id = :b THEN 'delivered' ELSE status END"
                " WHERE event_id IN (:a, :b)"
            ),
            {"a": kept, "b": done},
        )
    prune(engine, older_than=timedelta(days=30))
    assert [e.id for e in events_of(engine, tenant)] == [kept]
