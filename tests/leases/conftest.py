"""Dynamic credentials on real parts: the broker on the session's Vault and PostgreSQL,
the fake providers' key APIs, and one clock both judge expiry by."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.leases import service as leases
from broker.leases.service import Leasing
from broker.models import DynamicLease
from tests.fakes.provider_keys import OPENAI_ADMIN
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.support.apps import (
    OAUTH_SETTINGS,
    VaultEndpoint,
    clocked_client,
    make_settings,
    provider_overrides,
)
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

DELIVERY = "/v1/tenants/settings/integrations/{provider}/delivery"


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The time the broker and the fake providers judge lease expiry by."""
    return FakeClock()


@pytest.fixture(autouse=True)
def _provider_clock(providers: FakeProviders, clock: FakeClock) -> None:
    providers.keys.clock = clock.now


@pytest.fixture(scope="module")
def dyn_settings() -> dict[str, Any]:
    """The settings `dyn` runs with beyond the session's (a module may ask for others)."""
    return {"lease_live_cap": 3, "lease_revoke_backoff_s": 10}


@pytest.fixture(scope="module")
def dyn_one_loop() -> bool:
    """Whether `dyn` serves every request on one event loop (`clocked_client`)."""
    return False


@pytest.fixture(scope="module")
def dyn(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders,
    clock: FakeClock,
    dyn_settings: dict[str, Any],
    dyn_one_loop: bool,
) -> Iterator[TestClient]:
    """The broker on the fake clock, its provider calls pointed at the fakes; afterwards,
    every lease still live is revoked."""
    settings = make_settings(
        vault_endpoint,
        broker_vault_token,
        database_url,
        # A module's own settings win over the defaults.
        **(provider_overrides(providers) | OAUTH_SETTINGS | dyn_settings),
    )
    with clocked_client(settings, engine, clock.now, one_loop=dyn_one_loop) as client:
        yield client
        revoke_what_is_left(leasing(client))


def refused_mint(dyn: TestClient, providers: FakeProviders) -> tuple[str, Any]:
    """A dynamic tenant whose fetch Twilio refused to mint for (429, retry in 7 s): the
    tenant and the broker's 503."""
    tenant = dynamic_tenant(dyn)
    providers.fail_with("twilio", 429, retry_after="7")
    refused = dyn.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant))
    assert refused.status_code == 503
    return tenant, refused


def revoke_what_is_left(machinery: Leasing) -> None:
    """Revoke every lease still live at the fakes, so no later test's worker (pointed at
    other providers) inherits them when their revocation jobs fall due."""
    with Session(machinery.engine) as session:
        tenants = set(
            session.exec(select(DynamicLease.tenant_id).where(DynamicLease.state != "revoked"))
        )
    for tenant in sorted(tenants):
        leases.revoke_matching(
            machinery,
            leases.Selector(tenant_id=tenant),
            principal=leases.WORKER,
            reason="test_teardown",
            inline=100_000,
        )


def leasing(client: TestClient) -> Leasing:
    """The app's lease machinery (same clock, same stores)."""
    found: Leasing = client.app.state.leasing  # type: ignore[attr-defined]
    return found


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant, subject="owner"))


def service(*tenants: str, subject: str = "messaging") -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=tenants, subject=subject))


def configure(client: TestClient, tenant: str, provider: str, **fields: str) -> None:
    """Store root credentials (live-tested against the fake) and switch to dynamic delivery."""
    values: dict[str, Any] = dict(VALID["twilio"]) if provider == "twilio" else dict(OPENAI_ADMIN)
    values.update(fields)
    response = client.put(
        f"/v1/tenants/settings/integrations/{provider}",
        json={"fields": values},
        headers=admin(tenant),
    )
    assert response.status_code == 200, response.text
    switched = client.put(
        DELIVERY.format(provider=provider), json={"mode": "dynamic"}, headers=admin(tenant)
    )
    assert switched.status_code == 200, switched.text
    assert switched.json()["delivery"] == "dynamic"


def dynamic_tenant(client: TestClient, provider: str = "twilio") -> str:
    """A fresh tenant whose `provider` is in dynamic delivery."""
    tenant = make_tenant(client)
    configure(client, tenant, provider)
    return tenant


def fetch(
    client: TestClient, tenant: str, provider: str = "twilio", *, subject: str = "messaging"
) -> dict[str, Any]:
    """A service's fetch; asserts it succeeded."""
    response = client.get(
        f"/v1/credentials/{tenant}/{provider}", headers=service(tenant, subject=subject)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
