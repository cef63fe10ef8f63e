"""Rate limits: the 429 arrives exactly past the threshold, with Retry-After."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy import Engine

from broker.app import ROUTERS, create_app
from broker.auth.dependencies import declared_limit, declared_scopes
from broker.core.config import Settings
from broker.core.ratelimit import LocalWindows, RateLimiter, client_address
from broker.devstack.openbao import free_port
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def limited_client(
    settings: Settings, engine: Engine, vault: VaultGateway, **limits: str
) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=limits), engine=engine, vault=vault))


def openai_tenant(client: TestClient) -> str:
    """A new tenant with OpenAI credentials stored, for services to fetch."""
    tenant = make_tenant(client)
    client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"]), "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    return tenant


def test_fetches_are_limited_per_principal_and_tenant(
    client: TestClient, settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tenant = openai_tenant(client)
    tight = limited_client(settings, engine, broker_vault, rate_limit_fetch="3/minute")
    worker = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    statuses = [
        tight.get(f"/v1/credentials/{tenant}/openai", headers=worker).status_code for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    limited = tight.get(f"/v1/credentials/{tenant}/openai", headers=worker)
    # Exact for a sliding window: the hits of this minute weigh on the next one too.
    assert 0 < int(limited.headers["retry-after"]) <= 120
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


def test_every_write_counts_against_the_write_limit() -> None:
    unlimited: list[str] = []
    for router in ROUTERS:
        for route in router.routes:
            if not isinstance(route, APIRoute) or (route.methods or set()) <= {"GET", "HEAD"}:
                continue
            stack = list(route.dependant.dependencies)
            limits = set()
            while stack:
                dependency = stack.pop()
                if declared_scopes(dependency.call):
                    limits.add(declared_limit(dependency.call))
                stack.extend(dependency.dependencies)
            if limits != {"write"}:
                unlimited.extend(f"{method} {route.path}" for method in route.methods or ())
    assert not unlimited, f"writes without the write limit: {sorted(unlimited)}"


def test_settings_patches_are_write_limited(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tight = limited_client(settings, engine, broker_vault, rate_limit_write="2/minute")
    tenant = make_tenant(tight)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    body = {"branding": {"business_name": "Flood"}}
    statuses = [
        tight.patch("/v1/tenants/settings", json=body, headers=admin).status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


def test_failed_authentication_is_limited_per_address_without_locking_out_valid_tokens(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tight = limited_client(settings, engine, broker_vault, rate_limit_auth_failures="5/hour")
    tenant = make_tenant(tight)
    bad = bearer(
        token("tenant:admin", tenant_id=tenant, key="wrong-key-but-long-enough-for-hs256-x")
    )
    statuses = [tight.get("/v1/tenants/settings", headers=bad).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    limited = tight.get("/v1/tenants/settings", headers=bad)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    # Another caller behind the same address (a proxy, a NAT) with a valid token
    # is served: the failures were not its own.
    good = bearer(token("tenant:admin", tenant_id=tenant, subject="bob"))
    assert tight.get("/v1/tenants/settings", headers=good).status_code == 200
    # ...while the address stays limited for tokens that do not verify.
    assert tight.get("/v1/tenants/settings").status_code == 429


def test_fetch_limits_are_per_principal_not_per_address(
    client: TestClient, settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tenant = openai_tenant(client)
    tight = limited_client(settings, engine, broker_vault, rate_limit_fetch="3/minute")
    url = f"/v1/credentials/{tenant}/openai"
    busy = bearer(token("credentials:read", kind="service", subject="busy", tenants=(tenant,)))
    quiet = bearer(token("credentials:read", kind="service", subject="quiet", tenants=(tenant,)))
    assert [tight.get(url, headers=busy).status_code for _ in range(4)] == [200, 200, 200, 429]
    # Same address (the test client's), another service: its own budget.
    assert [tight.get(url, headers=quiet).status_code for _ in range(3)] == [200, 200, 200]


def test_made_up_tenants_share_one_fetch_budget(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    tight = limited_client(settings, engine, broker_vault, rate_limit_fetch="3/minute")
    tenant = make_tenant(tight)
    worker = bearer(token("credentials:read", kind="service", subject="prober", tenants=(tenant,)))
    # Each refusal is recorded in the trail: a fresh budget per made-up tenant would let
    # one service token write rows without limit.
    statuses = [
        tight.get(f"/v1/credentials/made-up-{i}/openai", headers=worker).status_code
        for i in range(5)
    ]
    assert statuses == [404, 404, 404, 429, 429]


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
    # Degraded, and saying so to whoever watches the metrics.
    assert tight.app.state.limiter.degraded  # type: ignore[attr-defined]
    assert "broker_rate_limit_degraded 1.0" in tight.get("/metrics").text


def test_the_degraded_metric_is_zero_with_local_counters(client: TestClient) -> None:
    assert "broker_rate_limit_degraded 0.0" in client.get("/metrics").text


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


# --- the in-process counters -------------------------------------------------------


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_local_windows_allow_exactly_the_limit_per_window() -> None:
    clock = Clock()
    windows = LocalWindows(clock=clock)
    item = parse("3/minute")
    assert [windows.hit(item, "fetch", "k") for _ in range(4)] == [True, True, True, False]
    assert not windows.test(item, "fetch", "k")
    assert windows.test(item, "fetch", "other key")  # keys are independent
    assert windows.get_window_stats(item, "fetch", "k").remaining == 0


def test_local_windows_slide_the_previous_window_out() -> None:
    clock = Clock(start=1_800_000_000.0 - 1_800_000_000.0 % 60)  # a window's first second
    windows = LocalWindows(clock=clock)
    item = parse("10/minute")
    assert all(windows.hit(item, "fetch", "k") for _ in range(10))
    clock.now += 60  # the next window: the last 60 s still hold 10 hits
    assert not windows.hit(item, "fetch", "k")
    clock.now += 30  # half of the previous window has slid out: 5 remain counted
    assert [windows.hit(item, "fetch", "k") for _ in range(6)] == [True] * 5 + [False]


def test_local_windows_say_when_the_next_hit_is_allowed() -> None:
    clock = Clock(start=1_800_000_000.0 - 1_800_000_000.0 % 60 + 20)
    windows = LocalWindows(clock=clock)
    item = parse("4/minute")
    for _ in range(4):
        windows.hit(item, "fetch", "k")
    reset = windows.get_window_stats(item, "fetch", "k").reset_time
    assert clock.now < reset <= clock.now + 120
    clock.now = reset - 0.01
    assert not windows.hit(item, "fetch", "k")
    clock.now = reset + 0.01
    assert windows.hit(item, "fetch", "k")


def test_local_windows_agree_with_the_limits_sliding_window_counter() -> None:
    # Same algorithm as the shared (Redis) backend, so a fallback changes nothing.
    ours = LocalWindows()
    theirs = SlidingWindowCounterRateLimiter(MemoryStorage())
    item = parse("25/minute")
    for _ in range(30):
        assert ours.hit(item, "fetch", "k") == theirs.hit(item, "fetch", "k")
        assert ours.test(item, "fetch", "k") == theirs.test(item, "fetch", "k")


def test_local_windows_start_no_threads_however_many_keys() -> None:
    before = set(threading.enumerate())
    windows = LocalWindows()
    item = parse("100/second")
    for i in range(20_000):
        windows.hit(item, "fetch", f"who:service:worker:tenant-{i}")
    assert set(threading.enumerate()) <= before
    assert len(windows) == 20_000


def test_local_windows_are_safe_under_concurrent_hits() -> None:
    windows = LocalWindows()
    item = parse("1000/hour")
    allowed: list[bool] = []

    def worker() -> None:
        allowed.extend(windows.hit(item, "fetch", "shared") for _ in range(300))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 1000
