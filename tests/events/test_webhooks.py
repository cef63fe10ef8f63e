"""Webhook endpoints and signed deliveries: a real receiver, real workers, Vault, PostgreSQL."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from broker.core.db import unit_of_work
from broker.events import outbox, webhooks
from broker.events.delivery import Attempt, attempt_delivery
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.models import Event, WebhookDelivery, WebhookEndpoint
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.integrations.test_routes import put, valid_fields
from tests.support.tokens import bearer, token
from tests.support.workers import BROKER_WORKER, Workers, wait_for

HOOKS = "/v1/webhooks"
PLATFORM_HOOKS = "/v1/platform/webhooks"


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def start_worker(workers: Workers, schedule: str = "1,1,1,1,1,1,1,1") -> Any:
    return workers.start(
        BROKER_WORKER,
        BROKER_EGRESS_ALLOW_HTTP="true",
        BROKER_EGRESS_ALLOW_LOOPBACK="true",
        BROKER_WEBHOOK_RETRY_SCHEDULE_S=schedule,
    )


def register(
    client: TestClient, tenant: str, receiver: WebhookReceiver, **body: Any
) -> dict[str, Any]:
    response = client.post(HOOKS, json={"url": receiver.url, **body}, headers=admin(tenant))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    receiver.secret = created["secret"]
    return created


def deliveries(engine: Engine, endpoint_id: str) -> list[WebhookDelivery]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(WebhookDelivery)
                .where(WebhookDelivery.endpoint_id == endpoint_id)
                .order_by(col(WebhookDelivery.id))
            )
        )


def one_pending_delivery(engine: Engine, tenant: str, endpoint: dict[str, Any]) -> WebhookDelivery:
    """Emit one event of the tenant's: the endpoint's single delivery it queues."""
    with unit_of_work(engine) as session:
        outbox.emit(session, outbox.HEALTH_CHANGED, actor="broker-worker", tenant_id=tenant)
    (delivery,) = deliveries(engine, endpoint["id"])
    return delivery


def attempt_now(
    engine: Engine, vault: VaultGateway, delivery: WebhookDelivery, *, schedule_s: list[float]
) -> Attempt:
    """The delivery's first attempt, made in-process through a loopback-allowing egress."""
    loopback = EgressClient(EgressPolicy(allow_http=True, allow_loopback=True, timeout_s=2))
    return attempt_delivery(
        engine, vault, loopback, delivery_id=delivery.id or 0, expect=0, schedule_s=schedule_s
    )


def save_openai(client: TestClient, tenant: str, providers: FakeProviders) -> None:
    assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200


def test_registration_shows_the_secret_once_and_keeps_it_in_vault_only(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    tenant: str,
    receiver: WebhookReceiver,
) -> None:
    body = {"url": receiver.url, "event_types": ["credential.saved"]}
    created = client.post(HOOKS, json=body, headers=admin(tenant))
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_")
    entry = vault_admin.kv.read(webhooks.secret_path(endpoint["id"]))
    assert entry is not None
    assert entry.data["secret"] == endpoint["secret"]

    listed = client.get(HOOKS, headers=admin(tenant))
    assert listed.status_code == 200
    assert [e["id"] for e in listed.json()] == [endpoint["id"]]
    assert "secret" not in listed.text
    assert endpoint["secret"] not in listed.text
    with engine.connect() as conn:
        dump = conn.execute(text("SELECT string_agg(t::text, '') FROM webhook_endpoints t"))
        assert endpoint["secret"] not in str(dump.scalar_one())
    # Another tenant's admin sees nothing of it.
    other = admin("t-someone-else")
    assert client.get(f"{HOOKS}/{endpoint['id']}", headers=other).status_code in (403, 404)

    deleted = client.delete(f"{HOOKS}/{endpoint['id']}", headers=admin(tenant))
    assert deleted.status_code == 204
    assert vault_admin.kv.read(webhooks.secret_path(endpoint["id"])) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.8/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://metadata.google.internal/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "ftp://hooks.example.com/x",
    ],
)
def test_an_internal_url_is_refused_at_registration(
    client: TestClient, engine: Engine, tenant: str, url: str
) -> None:
    response = client.post(HOOKS, json={"url": url}, headers=admin(tenant))
    assert response.status_code == 422, response.text
    assert url not in response.text
    with Session(engine) as session:
        assert not list(
            session.exec(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant))
        )


def test_unknown_event_types_are_refused(client: TestClient, tenant: str) -> None:
    body = {"url": "https://127.0.0.1/x", "event_types": ["credential.stolen"]}
    response = client.post(HOOKS, json=body, headers=admin(tenant))
    assert response.status_code == 422
    assert "credential.saved" in response.text


def test_a_name_that_moves_inside_after_registration_is_refused_at_delivery(
    engine: Engine, broker_vault: VaultGateway, tenant: str
) -> None:
    answers = {"hooks.receiver-shop.com": "93.184.216.34"}
    policy = EgressPolicy(timeout_s=2.0)
    client = EgressClient(policy, resolver=lambda host, port: [answers[host]])
    worker = _principal()
    made = webhooks.register(
        engine,
        broker_vault,
        client,
        principal=worker,
        tenant_id=tenant,
        url="https://hooks.receiver-shop.com/broker",
        event_types=[],
        description=None,
    )
    with unit_of_work(engine) as session:
        outbox.emit(session, outbox.CREDENTIAL_SAVED, actor="user:x", tenant_id=tenant)
    (delivery,) = deliveries(engine, made.endpoint.id)
    # The name now answers with a private address (DNS rebinding): nothing is sent there.
    answers["hooks.receiver-shop.com"] = "10.1.2.3"
    attempt = attempt_delivery(
        engine, broker_vault, client, delivery_id=delivery.id or 0, expect=0, schedule_s=[60]
    )
    assert attempt.outcome == "retry"
    assert attempt.status_code is None
    assert attempt.error is not None
    assert attempt.error.startswith("refused")
    (after,) = deliveries(engine, made.endpoint.id)
    assert after.attempts == 1
    assert after.status == "pending"
    assert after.last_error is not None
    assert "10.1.2.3" not in after.webhook_id


def _principal() -> Any:
    from broker.auth.principal import Principal

    return Principal(subject="ops", kind="user", scopes=frozenset({"tenant:admin"}))


def test_events_are_delivered_signed_and_can_be_replayed(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
    receiver: WebhookReceiver,
    workers: Workers,
) -> None:
    endpoint = register(client, tenant, receiver, event_types=["credential.saved"])
    worker = start_worker(workers)
    save_openai(client, tenant, providers)
    # Filtered out: deletions are not what this endpoint asked for.
    client.delete("/v1/tenants/settings/integrations/openai", headers=admin(tenant))
    wait_for(lambda: receiver.verified(), timeout_s=30, what="a signed delivery")
    (first,) = receiver.verified()
    assert first.payload["type"] == "credential.saved"
    assert first.payload["data"]["tenant_id"] == tenant
    assert first.payload["data"]["provider"] == "openai"
    assert first.payload["data"]["version"] == 1
    assert first.headers["webhook-signature"].startswith("v1,")
    for value in valid_fields("openai", providers).values():
        assert value.encode() not in first.body

    def listed() -> list[dict[str, Any]]:
        response = client.get(f"{HOOKS}/{endpoint['id']}/deliveries", headers=admin(tenant))
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()
        return rows

    # The receiver has it; the worker records the answer right after.
    wait_for(lambda: listed()[0]["status"] == "delivered", timeout_s=10, what="the record")
    (row,) = listed()
    assert row["status"] == "delivered"
    assert row["webhook_id"] == first.webhook_id

    replayed = client.post(
        f"{HOOKS}/{endpoint['id']}/deliveries/{row['id']}/replay", headers=admin(tenant)
    )
    assert replayed.status_code == 202, replayed.text
    wait_for(lambda: len(receiver.verified()) == 2, timeout_s=30, what="the replay")
    assert receiver.ids() == [first.webhook_id, first.webhook_id]
    other = admin("t-not-the-owner")
    assert (
        client.post(f"{HOOKS}/{endpoint['id']}/deliveries/{row['id']}/replay", headers=other)
    ).status_code in (403, 404)
    # The signing secret is nowhere but Vault: not in job arguments, tables or logs.
    assert endpoint["secret"] not in workers.output(worker)
    with engine.connect() as conn:
        for table in ("procrastinate_jobs", "webhook_deliveries", "events", "audit_events"):
            dump = conn.execute(
                # The table names are the literals above, never input.
                text(f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t")  # noqa: S608
            ).scalar_one()
            assert endpoint["secret"] not in dump
            assert endpoint["secret"].removeprefix("whsec_") not in dump


def test_a_worker_killed_mid_delivery_still_delivers_once_under_the_same_id(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
    receiver: WebhookReceiver,
    workers: Workers,
) -> None:
    register(client, tenant, receiver, event_types=["credential.saved"])
    receiver.hold = True
    first = start_worker(workers)
    save_openai(client, tenant, providers)
    assert receiver.held.wait(30), "the delivery never arrived"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    receiver.release()
    start_worker(workers)
    wait_for(lambda: receiver.verified(), timeout_s=60, what="the retried delivery")
    assert receiver.ids() == receiver.held_ids[:1]


def test_a_receiver_down_for_a_while_gets_the_delivery_later(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
    receiver: WebhookReceiver,
    workers: Workers,
) -> None:
    endpoint = register(client, tenant, receiver, event_types=["credential.saved"])
    receiver.down()
    start_worker(workers)
    save_openai(client, tenant, providers)
    wait_for(
        lambda: any(d.attempts >= 2 for d in deliveries(engine, endpoint["id"])),
        timeout_s=30,
        what="two failed attempts",
    )
    receiver.up()
    wait_for(lambda: receiver.verified(), timeout_s=30, what="the delivery after the outage")
    (delivery,) = deliveries(engine, endpoint["id"])
    wait_for(
        lambda: deliveries(engine, endpoint["id"])[0].status == "delivered",
        timeout_s=10,
        what="the delivery recorded",
    )
    (delivery,) = deliveries(engine, endpoint["id"])
    assert delivery.attempts >= 3
    assert receiver.ids() == [delivery.webhook_id]


def test_a_receiver_down_for_good_is_disabled_with_an_event(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
    receiver: WebhookReceiver,
    workers: Workers,
) -> None:
    endpoint = register(client, tenant, receiver, event_types=["credential.saved"])
    receiver.status = 503
    start_worker(workers, schedule="0.5,0.5")
    save_openai(client, tenant, providers)
    wait_for(
        lambda: (
            not client.get(f"{HOOKS}/{endpoint['id']}", headers=admin(tenant)).json()["enabled"]
        ),
        timeout_s=30,
        what="the endpoint disabled",
    )
    (delivery,) = deliveries(engine, endpoint["id"])
    assert delivery.status == "failed"
    assert delivery.attempts == 3
    assert delivery.last_status_code == 503
    assert len(receiver.verified()) == 3
    with Session(engine) as session:
        disabled = session.exec(
            select(Event)
            .where(Event.tenant_id == tenant)
            .where(Event.type == outbox.ENDPOINT_DISABLED)
        ).one()
    assert disabled.detail["endpoint_id"] == endpoint["id"]


def test_a_410_disables_the_endpoint_at_once(
    client: TestClient, engine: Engine, broker_vault: VaultGateway, tenant: str
) -> None:
    with WebhookReceiver() as receiver:
        endpoint = register(client, tenant, receiver)
        receiver.status = 410
        delivery = one_pending_delivery(engine, tenant, endpoint)
        attempt = attempt_now(engine, broker_vault, delivery, schedule_s=[1])
    assert attempt.outcome == "failed"
    assert attempt.status_code == 410
    shown = client.get(f"{HOOKS}/{endpoint['id']}", headers=admin(tenant)).json()
    assert shown["enabled"] is False
    assert "410" in shown["disabled_reason"]
    # The disabled endpoint is not sent its own disabling.
    assert len(deliveries(engine, endpoint["id"])) == 1


def test_platform_endpoints_receive_every_tenants_events(
    client: TestClient, engine: Engine, tenant: str, receiver: WebhookReceiver
) -> None:
    ops = bearer(token("platform:admin", subject="ops"))
    body = {"url": receiver.url, "event_types": ["tenant.deleted"]}
    created = client.post(PLATFORM_HOOKS, json=body, headers=ops)
    assert created.status_code == 201, created.text
    endpoint = created.json()
    try:
        assert endpoint["tenant_id"] is None
        assert client.post(PLATFORM_HOOKS, json=body, headers=admin(tenant)).status_code == 403
        assert client.delete(f"/v1/tenants/{tenant}", headers=ops).status_code == 204
        (delivery,) = deliveries(engine, endpoint["id"])
        with Session(engine) as session:
            event = session.get(Event, delivery.event_id)
        assert event is not None
        assert event.tenant_id == tenant
        assert json.loads(json.dumps(event.detail)) == {}
    finally:
        assert client.delete(f"{PLATFORM_HOOKS}/{endpoint['id']}", headers=ops).status_code == 204


def test_a_redirect_is_a_failed_attempt_not_followed(
    client: TestClient, engine: Engine, broker_vault: VaultGateway, tenant: str
) -> None:
    with WebhookReceiver() as receiver:
        endpoint = register(client, tenant, receiver)
        receiver.status = 307
        delivery = one_pending_delivery(engine, tenant, endpoint)
        attempt = attempt_now(engine, broker_vault, delivery, schedule_s=[60])
        assert len(receiver.received) == 1
    assert attempt.outcome == "retry"
    assert attempt.status_code == 307
    (after,) = deliveries(engine, endpoint["id"])
    assert after.status == "pending"
    assert after.next_attempt_at is not None
    # The same attempt run again (a duplicate job) changes nothing.
    again = attempt_now(engine, broker_vault, delivery, schedule_s=[60])
    assert again.outcome == "stale"
