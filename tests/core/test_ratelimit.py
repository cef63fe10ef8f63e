"""Rate limits: the 429 arrives exactly past the threshold, with Retry-After."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.core.ratelimit import RateLimiter, client_address
from broker.devstack.openbao import free_port
from broker.vault.gateway import VaultGateway
from tests.conftest import bearer, make_tenant, token
from tests.fakes.providers import VALID


def limited_client(
    settings: Settings, engine: Engine, vault: VaultGateway, **limits: str
) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=limits), engine=engine, vault=vault))


def test_fetches_are_limited_per_principal_and_tenant(
    client: TestClient, settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tenant = make_tenant(client)
    client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"]), "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    tight = limited_client(settings, engine, broker_vault, rate_limit_fetch="3/minute")
    worker = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    statuses = [
        tight.get(f"/v1/credentials/{tenant}/openai", headers=worker).status_code for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    limited = tight.get(f"/v1/credentials/{tenant}/openai", headers=worker)
    assert 0 < int(limited.headers["retry-after"]) <= 60
    assert limited.headers["content-type"] == "application/problem+json"


def test_credential_writes_and_tests_are_limited(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tight = limited_client(settings, engine, broker_vault, rate_limit_write="2/minute")
    tenant = make_tenant(tight)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    body: dict[str, Any] = {"fields": dict(VALID["openai"]), "skip_connection_test": True}
    first = tight.put("/v1/tenants/settings/integrations/openai", json=body, headers=admin)
    second = tight.post(
        "/v1/tenants/settings/integrations/openai/test",
        json={"fields": body["fields"]},
        headers=admin,
    )
    third = tight.put("/v1/tenants/settings/integrations/openai", json=body, headers=admin)
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    # Reads are not part of the write budget.
    assert tight.get("/v1/tenants/settings/integrations", headers=admin).status_code == 200


def test_failed_authentication_is_limited_strictly_then_blocks_the_address(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tight = limited_client(settings, engine, broker_vault, rate_limit_auth_failures="5/hour")
    bad = bearer(token("tenant:admin", tenant_id="t", key="wrong-key-but-long-enough-for-hs256-x"))
    statuses = [tight.get("/v1/tenants/settings", headers=bad).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    good = bearer(token("tenant:admin", tenant_id="t"))
    blocked = tight.get("/v1/tenants/settings", headers=good)
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0


def test_expired_tokens_count_against_their_principal(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    limiter_settings = {"rate_limit_auth_failures": "2/hour"}
    tight = limited_client(settings, engine, broker_vault, **limiter_settings)
    expired = bearer(token("tenant:admin", tenant_id="t", subject="mallory", ttl_s=-600))
    for _ in range(2):
        tight.get("/v1/tenants/settings", headers=expired)
    limiter: RateLimiter = tight.app.state.limiter  # type: ignore[attr-defined]
    assert limiter.exceeded("auth_failures", "sub:mallory")


def test_unreachable_redis_falls_back_to_memory_and_keeps_limiting(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    tight = limited_client(
        settings,
        engine,
        broker_vault,
        rate_limit_storage=dead_redis,
        rate_limit_auth_failures="2/hour",
    )
    statuses = [tight.get("/v1/tenants/settings").status_code for _ in range(3)]
    assert statuses == [401, 401, 429]


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("10.0.0.2", "203.0.113.9", [], "10.0.0.2"),  # no trusted proxies: ignore the header
        ("198.51.100.7", "203.0.113.9", ["10.0.0.0/8"], "198.51.100.7"),  # peer not a proxy
        ("10.0.0.2", "203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),
        (
            "10.0.0.2",
            "1.2.3.4, 203.0.113.9, 10.0.0.3",
            ["10.0.0.0/8"],
            "203.0.113.9",
        ),  # spoofed left
        ("10.0.0.2", "not-an-ip", ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", None, ["10.0.0.0/8"], "10.0.0.2"),
    ],
)
def test_forwarded_for_is_trusted_only_from_configured_proxies(
    peer: str, forwarded: str | None, trusted: list[str], expected: str
) -> None:
    assert client_address(peer, forwarded, trusted) == expected
