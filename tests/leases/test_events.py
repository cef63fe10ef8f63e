"""Leases announce themselves: minted and revoked, once each, in the change feed, to the
SDK and to webhooks, with identifiers only (never the minted key or the root credential)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.events import outbox
from broker.events.delivery import attempt_delivery
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.leases import service as leases
from broker.models import Event, WebhookDelivery
from broker.vault.gateway import VaultGateway
from tests.client.test_sdk import BrokerProxy
from tests.fakes.provider_keys import OPENAI_ADMIN
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.leases.conftest import admin, dynamic_tenant, fetch, leasing, refused_mint, service
from tests.leases.test_sdk import broker_url  # noqa: F401 - fixture
from tests.support.tokens import bearer, token

LEASE_EVENTS = (outbox.LEASE_MINTED, outbox.LEASE_REVOKED)
REVOKE = "/v1/tenants/settings/leases/revoke"


def lease_events(engine: Engine, tenant: str) -> list[Event]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(Event)
                .where(Event.tenant_id == tenant)
                .where(col(Event.type).in_(LEASE_EVENTS))
                .order_by(col(Event.id))
            )
        )


def feed_head(client: TestClient, tenant: str) -> str:
    response = client.get("/v1/events", headers=service(tenant, subject="feed-reader"))
    assert response.status_code == 200, response.text
    return str(response.json()["cursor"])


def feed_after(client: TestClient, tenant: str, cursor: str) -> list[dict[str, Any]]:
    response = client.get(
        "/v1/events", params={"after": cursor}, headers=service(tenant, subject="feed-reader")
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def assert_no_secret(text: str, minted: dict[str, str]) -> None:
    for value in (*VALID["twilio"].values(), OPENAI_ADMIN["api_key"], *minted.values()):
        if value.startswith(("AC", "SK")) or len(value) < 16:
            continue  # identifiers (account and key sids) may be named
        assert value not in text


def test_a_mint_is_announced_once_not_on_reuse_and_a_revocation_once(
    dyn: TestClient, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    cursor = feed_head(dyn, tenant)
    first = fetch(dyn, tenant)
    again = fetch(dyn, tenant)
    assert again["lease_id"] == first["lease_id"]  # reused: no second announcement

    (minted,) = lease_events(engine, tenant)
    assert (minted.type, minted.provider, minted.state, minted.actor) == (
        outbox.LEASE_MINTED,
        "twilio",
        "active",
        "service:messaging",
    )
    assert minted.detail["lease_id"] == first["lease_id"]
    assert minted.detail["subject"] == "messaging"
    # The SK sid names the key; its secret and the root's auth token appear nowhere.
    assert minted.detail["key_id"] == first["fields"]["api_key_sid"]
    assert_no_secret(json.dumps(minted.model_dump(mode="json")), first["fields"])

    revoked = dyn.post(REVOKE, json={"lease_id": first["lease_id"]}, headers=admin(tenant))
    assert revoked.json()["revoked"] == 1
    again_revoked = dyn.post(REVOKE, json={"lease_id": first["lease_id"]}, headers=admin(tenant))
    assert again_revoked.json()["revoked"] == 0

    events = lease_events(engine, tenant)
    assert [e.type for e in events] == [outbox.LEASE_MINTED, outbox.LEASE_REVOKED]
    gone = events[1]
    assert (gone.actor, gone.state, gone.detail["reason"]) == ("user:owner", "revoked", "requested")
    assert gone.detail["lease_id"] == first["lease_id"]
    assert gone.detail["key_id"] == first["fields"]["api_key_sid"]

    # A service following the tenant's feed sees both, in order, with no secret.
    seen = [e for e in feed_after(dyn, tenant, cursor) if e["type"] in LEASE_EVENTS]
    assert [(e["type"], e["detail"]["lease_id"]) for e in seen] == [
        (outbox.LEASE_MINTED, first["lease_id"]),
        (outbox.LEASE_REVOKED, first["lease_id"]),
    ]
    assert_no_secret(json.dumps(seen), first["fields"])


def test_the_sweep_announces_an_expired_openai_lease_revoked_by_the_worker(
    dyn: TestClient, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn, "openai")
    lease = fetch(dyn, tenant, "openai")
    clock.advance(301)
    leases.revoke_due(leasing(dyn))
    leases.revoke_due(leasing(dyn))  # a second sweep finds nothing more to say
    minted, revoked = lease_events(engine, tenant)
    assert (minted.type, revoked.type) == (outbox.LEASE_MINTED, outbox.LEASE_REVOKED)
    assert (revoked.actor, revoked.detail["reason"]) == ("service:broker-worker", "expired")
    # The service account's id, never its key.
    assert str(revoked.detail["key_id"]).startswith("svc_acct_")
    assert revoked.detail["key_id"] == minted.detail["key_id"]
    assert_no_secret(json.dumps(revoked.model_dump(mode="json")), lease["fields"])
    assert lease["fields"]["api_key"] not in json.dumps(minted.model_dump(mode="json"))


def test_a_refused_mint_announces_nothing(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant, refused = refused_mint(dyn, providers)
    assert lease_events(engine, tenant) == []
    providers.come_back("twilio")
    leases.revoke_matching(
        leasing(dyn), leases.Selector(tenant_id=tenant), principal=leases.WORKER, reason="t"
    )
    assert lease_events(engine, tenant) == []  # nothing minted, nothing to revoke


def test_an_unconfirmed_mint_is_never_announced_minted_but_its_found_key_revoked(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    providers.delay("twilio", 3)  # longer than the broker waits (2 s in tests)
    assert dyn.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant)).status_code == 503
    assert lease_events(engine, tenant) == []
    (pending,) = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant)).json()
    name = f"broker-lease-{pending['id']}"
    account = VALID["twilio"]["account_sid"]
    deadline = time.monotonic() + 10
    while not any(k.friendly_name == name for k in providers.keys.twilio_keys(account)):
        assert time.monotonic() < deadline, "the fake never minted the delayed key"
        time.sleep(0.05)
    providers.come_back("twilio")
    leases.revoke_due(leasing(dyn))
    # A key existed at Twilio and was deleted: that is announced, with why.
    (revoked,) = lease_events(engine, tenant)
    assert revoked.type == outbox.LEASE_REVOKED
    assert revoked.detail["lease_id"] == pending["id"]
    assert revoked.detail["reason"] == "mint_unconfirmed"


@pytest.fixture
def proxy(broker_url: str) -> Iterator[BrokerProxy]:  # noqa: F811
    with BrokerProxy(broker_url) as running:
        yield running


def test_the_sdk_drops_its_cached_lease_when_that_lease_is_revoked_and_only_then(
    dyn: TestClient, proxy: BrokerProxy
) -> None:
    from broker.client import BrokerClient

    tenant = dynamic_tenant(dyn)
    jwt = token("credentials:read", kind="service", tenants=(tenant,), subject="sdk-worker")
    with BrokerClient(proxy.url, token=jwt) as broker:
        assert broker.poll_changes() == 0
        cached = broker.lease(tenant, "twilio").lease_id
        other = fetch(dyn, tenant, subject="catalog-sync")["lease_id"]

        # Another service's lease ends: this service's key is still good, and still cached.
        dyn.post(REVOKE, json={"lease_id": other}, headers=admin(tenant))
        assert broker.poll_changes(wait_s=5) >= 1
        before = len(proxy.arrivals)
        assert broker.lease(tenant, "twilio").lease_id == cached
        assert len(proxy.arrivals) == before  # served from the cache

        # Its own lease is revoked: the next call fetches, and gets a freshly minted key.
        dyn.post(REVOKE, json={"lease_id": cached}, headers=admin(tenant))
        assert broker.poll_changes(wait_s=5) >= 1
        before = len(proxy.arrivals)
        fresh = broker.lease(tenant, "twilio").lease_id
        assert len(proxy.arrivals) == before + 1
    assert fresh not in (cached, other)


def test_lease_events_reach_a_webhook_signed_and_without_a_secret(
    dyn: TestClient, engine: Engine, broker_vault: VaultGateway
) -> None:
    tenant = dynamic_tenant(dyn, "openai")
    with WebhookReceiver() as receiver:
        created = dyn.post(
            "/v1/webhooks",
            json={"url": receiver.url, "event_types": list(LEASE_EVENTS)},
            headers=bearer(token("tenant:admin", tenant_id=tenant)),
        )
        assert created.status_code == 201, created.text
        endpoint = created.json()
        receiver.secret = endpoint["secret"]
        lease = fetch(dyn, tenant, "openai")
        dyn.post(REVOKE, json={}, headers=admin(tenant))

        with Session(engine) as session:
            queued = list(
                session.exec(
                    select(WebhookDelivery)
                    .where(WebhookDelivery.endpoint_id == endpoint["id"])
                    .order_by(col(WebhookDelivery.id))
                )
            )
        assert len(queued) == 2  # the save and the delivery switch were filtered out
        loopback = EgressClient(EgressPolicy(allow_http=True, allow_loopback=True, timeout_s=2))
        try:
            for delivery in queued:
                attempt = attempt_delivery(
                    engine,
                    broker_vault,
                    loopback,
                    delivery_id=delivery.id or 0,
                    expect=0,
                    schedule_s=[60],
                )
                assert attempt.outcome == "delivered", attempt
        finally:
            loopback.close()
        received = list(receiver.received)
        dyn.delete(f"/v1/webhooks/{endpoint['id']}", headers=admin(tenant))

    assert all(r.verified for r in received)
    assert [r.payload["type"] for r in received] == list(LEASE_EVENTS)
    assert {r.payload["data"]["detail"]["lease_id"] for r in received} == {lease["lease_id"]}
    for r in received:
        assert lease["fields"]["api_key"] not in r.body.decode()
        assert OPENAI_ADMIN["api_key"] not in r.body.decode()
