"""The SDK follows the broker's change feed: a changed credential leaves its cache at once."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.client.test_sdk import (  # noqa: F401 - fixtures
    BrokerProxy,
    FakeClock,
    broker_url,
    fields_for,
    proxy,
    save,
    sdk,
)
from tests.fakes.providers import FakeProviders
from tests.support.tenants import make_tenant
from tests.support.workers import wait_for

LEASE_S = 300


def test_a_cached_lease_is_dropped_within_one_long_poll_round_of_a_change(
    client: TestClient,
    providers: FakeProviders,
    broker_url: str,  # noqa: F811
) -> None:
    tenant = make_tenant(client)
    old = save(client, tenant, "twilio", fields_for("twilio", providers))
    with sdk(broker_url, tenant) as broker:
        assert broker.poll_changes() == 0  # finds the feed's position
        assert broker.twilio(tenant).version == old
        outcome: dict[str, Any] = {}
        polling = threading.Thread(
            target=lambda: outcome.update(read=broker.poll_changes(wait_s=20))
        )
        polling.start()
        new_token = uuid.uuid4().hex
        new = save(client, tenant, "twilio", fields_for("twilio", providers, auth_token=new_token))
        polling.join(30)
        assert outcome["read"] == 1  # this one round saw the change...
        fresh = broker.twilio(tenant)  # ...and the cache no longer holds the old version
    assert (fresh.version, fresh.auth_token) == (new, new_token)


def test_the_follower_thread_drops_the_cache_by_itself(
    client: TestClient,
    providers: FakeProviders,
    broker_url: str,  # noqa: F811
) -> None:
    tenant = make_tenant(client)
    old = save(client, tenant, "openai", fields_for("openai", providers))
    with sdk(broker_url, tenant) as broker:
        follower = broker.follow_changes(wait_s=5)
        try:
            wait_for(lambda: follower.rounds >= 1, timeout_s=10, what="the feed's position")
            assert broker.openai(tenant).version == old
            changed = fields_for("openai", providers, api_key="sk-" + "n" * 48)
            new = save(client, tenant, "openai", changed)
            wait_for(lambda: broker.openai(tenant).version == new, timeout_s=20, what="the drop")
            assert follower.healthy
        finally:
            follower.stop(10)


def test_without_the_feed_the_cache_falls_back_to_lease_expiry(
    client: TestClient,
    providers: FakeProviders,
    proxy: BrokerProxy,  # noqa: F811
) -> None:
    tenant = make_tenant(client)
    old = save(client, tenant, "twilio", fields_for("twilio", providers))
    clock = FakeClock()
    with sdk(proxy.url, tenant, clock=clock, retry_attempts=1) as broker:
        broker.poll_changes()
        assert broker.twilio(tenant).version == old
        proxy.outage = "503"
        follower = broker.follow_changes(wait_s=1, retry_s=0.2)
        try:
            wait_for(lambda: follower.rounds >= 2, timeout_s=10, what="failed feed rounds")
            assert not follower.healthy
            new = save(
                client, tenant, "twilio", fields_for("twilio", providers, auth_token="c" * 32)
            )
            # The feed is unreachable: the cached lease is served until it expires...
            assert broker.twilio(tenant).version == old
            proxy.outage = None
            clock.now += LEASE_S
            # ...and then the new version is fetched.
            assert broker.twilio(tenant).version == new
        finally:
            follower.stop(10)
