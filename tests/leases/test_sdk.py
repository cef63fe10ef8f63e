"""The SDK and its factories in dynamic delivery: minted keys, renewal, and a revoked key."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from broker.client import (
    BrokerClient,
    TwilioCredentials,
    create_openai_client_for_tenant,
    create_twilio_service_for_tenant,
)
from broker.integrations.egress import EgressPolicy
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.leases.conftest import admin, dynamic_tenant
from tests.support.serving import serving
from tests.support.tokens import token

LOCAL = EgressPolicy(allow_http=True, allow_loopback=True)
SID = VALID["twilio"]["account_sid"]


@pytest.fixture(scope="module")
def broker_url(dyn: TestClient) -> Iterator[str]:
    """The dynamic-delivery app under uvicorn on 127.0.0.1, for this module."""
    with serving(dyn.app) as url:
        yield url


class SdkClock:
    """The SDK's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sdk(url: str, tenant: str, clock: SdkClock | None = None) -> BrokerClient:
    jwt = token("credentials:read", kind="service", tenants=(tenant,), subject="sdk-worker")
    return BrokerClient(url, token=jwt, clock=clock or time.monotonic)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_twilio_factory_works_unchanged_with_a_minted_key(
    dyn: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = dynamic_tenant(dyn)
    start = len(providers.requests)  # after the save's connection test
    with _sdk(broker_url, tenant) as broker:
        creds = broker.credentials(tenant, TwilioCredentials)
        assert creds.auth_token is None
        assert creds.api_key_sid is not None
        assert creds.basic_auth() == (creds.api_key_sid, creds.api_key_secret)
        assert "****" in repr(creds)
        assert creds.api_key_secret is not None
        assert creds.api_key_secret not in repr(creds)
        with create_twilio_service_for_tenant(
            broker, tenant, base_url=providers.base_url, egress=LOCAL
        ) as twilio:
            assert (
                twilio.get(f"{providers.base_url}/2010-04-01/Accounts/{SID}.json").json()["sid"]
                == SID
            )
    sent = [
        r.headers["authorization"]
        for r in providers.requests[start:]
        if r.path.endswith(f"{SID}.json")
    ]
    assert sent == [_basic(creds.api_key_sid, creds.api_key_secret or "")]
    assert _basic(SID, VALID["twilio"]["auth_token"]) not in sent


def test_a_key_revoked_early_is_fetched_again_once_on_401(
    dyn: TestClient, providers: FakeProviders, broker_url: str
) -> None:
    tenant = dynamic_tenant(dyn)
    start = len(providers.requests)
    url = f"{providers.base_url}/2010-04-01/Accounts/{SID}.json"
    with (
        _sdk(broker_url, tenant) as broker,
        create_twilio_service_for_tenant(
            broker, tenant, base_url=providers.base_url, egress=LOCAL
        ) as twilio,
    ):
        assert twilio.get(url).status_code == 200
        first = broker.lease(tenant, "twilio").lease_id
        revoked = dyn.post("/v1/tenants/settings/leases/revoke", json={}, headers=admin(tenant))
        assert revoked.json()["revoked"] == 1
        # The cached key is dead at Twilio: one 401, one fetch, a fresh key, success.
        assert twilio.get(url).status_code == 200
        assert broker.lease(tenant, "twilio").lease_id != first
    statuses = [r.path for r in providers.requests[start:] if r.path.endswith(f"{SID}.json")]
    assert len(statuses) == 3


def test_the_openai_factory_renews_before_expiry(
    dyn: TestClient, providers: FakeProviders, broker_url: str, clock: FakeClock
) -> None:
    tenant = dynamic_tenant(dyn, "openai")
    sdk_clock = SdkClock()
    with (
        _sdk(broker_url, tenant, sdk_clock) as broker,
        create_openai_client_for_tenant(
            broker, tenant, base_url=f"{providers.base_url}/v1", egress=LOCAL
        ) as openai,
    ):
        assert openai.get("models").status_code == 200
        first = broker.lease(tenant, "openai")
        assert first.lease_id is not None
        assert broker.lease(tenant, "openai") is first  # cached
        # Past the SDK's refresh point (30 s before the end) on both clocks.
        clock.advance(280)
        sdk_clock.now += 280
        renewed = broker.lease(tenant, "openai")
        assert renewed.lease_id != first.lease_id
        assert openai.get("models").status_code == 200
        clock.advance(21)  # the first lease is over: its key no longer works
        assert openai.get("models").status_code == 200
