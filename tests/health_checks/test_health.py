"""Credential health: scheduled checks on a real worker, checks on request, 429s, history."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from broker.events import outbox
from broker.models import Event
from tests.fakes.providers import FakeProviders
from tests.integrations.test_routes import admin, listing, put, valid_fields
from tests.support.tokens import bearer, token
from tests.support.workers import BROKER_WORKER, Workers, wait_for

INTEGRATIONS = "/v1/tenants/settings/integrations"


def own_twilio(client: TestClient, providers: FakeProviders, tenant: str) -> dict[str, str]:
    """Twilio credentials only this tenant holds, stored after a passing test."""
    fields = {**valid_fields("twilio", providers), "auth_token": uuid.uuid4().hex}
    providers.accept("twilio", **fields)
    assert put(client, tenant, "twilio", fields).status_code == 200
    return fields


def health(client: TestClient, tenant: str, provider: str) -> dict[str, Any]:
    response = client.get(f"{INTEGRATIONS}/{provider}/health", headers=admin(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def check_now(client: TestClient, tenant: str, provider: str) -> dict[str, Any]:
    response = client.post(f"{INTEGRATIONS}/{provider}/health/check", headers=admin(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def health_events(engine: Engine, tenant: str) -> list[Event]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(Event)
                .where(Event.tenant_id == tenant)
                .where(Event.type == outbox.HEALTH_CHANGED)
                .order_by(col(Event.id))
            )
        )


def test_a_revoked_key_flips_to_failing_on_the_next_scheduled_check(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
    workers: Workers,
) -> None:
    fields = own_twilio(client, providers, tenant)
    assert health(client, tenant, "twilio")["state"] == "healthy"  # the save's own test
    providers.revoke("twilio", auth_token=fields["auth_token"])
    workers.start(
        BROKER_WORKER,
        BROKER_EGRESS_ALLOW_HTTP="true",
        BROKER_EGRESS_ALLOW_LOOPBACK="true",
        BROKER_TWILIO_BASE_URL=providers.base_url,
        BROKER_HEALTH_CHECK_INTERVALS=json.dumps({"twilio": 1}),
        BROKER_HEALTH_CHECK_JITTER_S="0",
        BROKER_HEALTH_RETRY_S="1",
        BROKER_HEALTH_SCHEDULE_EVERY_S="1",
    )
    wait_for(
        lambda: health(client, tenant, "twilio")["state"] == "failing",
        timeout_s=90,
        what="the state to flip",
    )
    shown = health(client, tenant, "twilio")
    assert "Twilio" in shown["reason"]
    assert fields["auth_token"] not in json.dumps(shown)
    # The first failure was retried before the state flipped.
    failed = [c for c in shown["history"] if not c["ok"]]
    assert len(failed) >= 2
    assert failed[-1]["state"] == "healthy"  # the oldest failure left it healthy
    (event,) = health_events(engine, tenant)
    assert (event.provider, event.state, event.detail["previous"]) == (
        "twilio",
        "failing",
        "healthy",
    )
    assert listing(client, tenant)["twilio"]["health"] == "failing"
    status = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert status["integrations_status"]["twilio"]["health"] == "failing"
    assert status["integrations_status"]["twilio"]["health_reason"] == shown["reason"]


def test_a_check_on_request_retries_before_flipping_and_recovers(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    fields = own_twilio(client, providers, tenant)
    providers.revoke("twilio", auth_token=fields["auth_token"])
    first = check_now(client, tenant, "twilio")
    assert first["state"] == "healthy"  # one failure: retried before it counts
    with engine.connect() as conn:
        queued = conn.execute(
            text(
                "SELECT count(*) FROM procrastinate_jobs WHERE task_name ="
                " 'credential_health.check' AND args->>'tenant_id' = :t AND status = 'todo'"
            ),
            {"t": tenant},
        ).scalar_one()
    assert queued == 1
    second = check_now(client, tenant, "twilio")
    assert second["state"] == "failing"
    providers.accept("twilio", **fields)
    assert check_now(client, tenant, "twilio")["state"] == "healthy"
    assert [e.state for e in health_events(engine, tenant)] == ["failing", "healthy"]
    assert [c["ok"] for c in health(client, tenant, "twilio")["history"]] == [True, False, False]


def test_a_provider_limiting_requests_is_not_a_failure(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    own_twilio(client, providers, tenant)
    providers.fail_with("twilio", 429)
    shown = check_now(client, tenant, "twilio")
    assert shown["state"] == "healthy"
    assert shown["history"][0]["code"] == "rate_limited"
    assert health_events(engine, tenant) == []


def test_health_needs_the_tenants_own_scopes(client: TestClient, tenant: str) -> None:
    path = f"{INTEGRATIONS}/twilio/health"
    finance = bearer(token("finance:manage", tenant_id=tenant))
    assert client.get(path, headers=finance).status_code == 403
    viewer = bearer(token("integrations:view", tenant_id=tenant))
    assert client.post(path + "/check", headers=viewer).status_code == 403
    assert client.get(path, headers=admin(tenant)).status_code == 404  # nothing stored
