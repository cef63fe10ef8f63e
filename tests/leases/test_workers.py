"""Revocation on real `broker worker` processes: nothing lost when a worker is killed, and
two workers never revoke one lease twice."""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.leases import service as leases
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.leases.conftest import dynamic_tenant, fetch, leasing
from tests.support.workers import Workers, wait_for

LEASES = 100
LEASE_WORKER = [sys.executable, "-m", "tests.leases.worker_main"]


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FakeClock:
    """Shared with the worker processes through a file."""
    return FakeClock(tmp_path_factory.mktemp("lease-clock") / "offset")


@pytest.fixture(scope="module")
def dyn_settings() -> dict[str, Any]:
    """10-second leases: their per-lease jobs fall due during the test."""
    return {"credential_lease_s": 10, "lease_live_cap": LEASES}


def _worker_env(providers: FakeProviders, clock: FakeClock) -> dict[str, str]:
    return {
        "BROKER_TWILIO_BASE_URL": providers.base_url,
        "BROKER_OPENAI_BASE_URL": providers.base_url,
        "BROKER_EGRESS_ALLOW_HTTP": "true",
        "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
        "BROKER_EGRESS_TIMEOUT_S": "2",
        "BROKER_LEASE_SWEEP_S": "1",
        "BROKER_TEST_CLOCK_FILE": str(clock.path),
    }


def _leases_due(dyn: TestClient, clock: FakeClock, count: int) -> tuple[str, list[dict[str, Any]]]:
    tenant = dynamic_tenant(dyn)
    issued = [fetch(dyn, tenant, subject=f"svc-{n}") for n in range(count)]
    clock.advance(11)
    return tenant, issued


def _revoked(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM leases WHERE tenant_id = :t AND state = 'revoked'"),
                {"t": tenant},
            ).scalar_one()
        )


def _assert_each_revoked_once(
    engine: Engine, providers: FakeProviders, tenant: str, issued: list[dict[str, Any]]
) -> None:
    sids = [lease["fields"]["api_key_sid"] for lease in issued]
    assert all(providers.keys.deleted[sid] == 1 for sid in sids)
    left = {k.sid for k in providers.keys.twilio_keys(VALID["twilio"]["account_sid"])}
    assert not left & set(sids)
    with engine.connect() as conn:
        events = conn.execute(
            text(
                "SELECT resource, count(*) FROM audit_events WHERE tenant_id = :t"
                " AND action = 'lease.revoke' AND outcome = 'success' GROUP BY resource"
            ),
            {"t": tenant},
        ).all()
    assert len(events) == len(issued)
    assert {n for _, n in events} == {1}


def test_a_killed_worker_loses_no_revocation_and_repeats_none(
    dyn: TestClient,
    providers: FakeProviders,
    clock: FakeClock,
    engine: Engine,
    workers: Workers,
) -> None:
    tenant, issued = _leases_due(dyn, clock, LEASES)
    providers.delay("twilio", 0.2)  # slow deletions: the kill lands mid-sweep
    env = _worker_env(providers, clock)
    first = workers.start(LEASE_WORKER, **env)
    wait_for(lambda: _revoked(engine, tenant) >= 10, timeout_s=60, what="some revocations")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert _revoked(engine, tenant) < LEASES, "the worker finished before it was killed"

    workers.start(LEASE_WORKER, **env)
    wait_for(lambda: _revoked(engine, tenant) == LEASES, timeout_s=120, what="every revocation")
    _assert_each_revoked_once(engine, providers, tenant, issued)


def test_two_workers_and_a_replica_revoke_each_lease_once_and_miss_none(
    dyn: TestClient,
    providers: FakeProviders,
    clock: FakeClock,
    engine: Engine,
    workers: Workers,
) -> None:
    tenant, issued = _leases_due(dyn, clock, LEASES)
    providers.delay("twilio", 0.05)
    env = _worker_env(providers, clock)
    workers.start(LEASE_WORKER, **env)
    workers.start(LEASE_WORKER, **env)
    # Meanwhile an API replica revokes the same tenant's leases on demand.
    on_demand = leases.revoke_matching(
        leasing(dyn), leases.Selector(tenant_id=tenant), principal=leases.WORKER, reason="incident"
    )
    assert on_demand.failed == 0
    wait_for(lambda: _revoked(engine, tenant) == LEASES, timeout_s=120, what="every revocation")
    _assert_each_revoked_once(engine, providers, tenant, issued)
