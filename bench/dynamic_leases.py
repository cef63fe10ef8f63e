"""Dynamic credentials figures: fetch latency (a live lease reused, a fresh mint) and
revocation throughput.

`bench.run` calls `run` with the running broker and a local fake Twilio
(tests/fakes/providers.py, in the bench process on 127.0.0.1, reached through the
egress guard):

1. One tenant stores the fake's Twilio credentials and switches to dynamic delivery.
2. Reuse: `GET /v1/credentials/{tenant}/twilio` by one service through the load
   generator, like the other fetch figures: after the first call every answer is the
   same live lease, read back from Vault.
3. Fresh mint: one service after another, each fetching once, from this process
   (closed loop, concurrency 1): every answer registers a lease, mints a key at the
   fake, seals it in Vault and records it. p50/p99 over the calls.
4. Revocation: `leases` keys are minted at the fake directly and registered as due
   (the mint path is figure 3's); a real `broker worker` sweeps them. Leases per second
   from the worker's start until none is left, and the fake's count of deletions.

Nothing here asserts a time.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, insert, text

from bench.oauth_refresh import WorkerProcess
from broker.core.db import make_engine
from broker.models import DynamicLease, utcnow
from tests.fakes.providers import VALID, FakeProviders

if TYPE_CHECKING:
    from bench.run import Bench

log = logging.getLogger("bench")

REUSE = "dynamic fetch, lease reused"
REVOKED_SUBJECT = "bench-dyn-revoke"
_LEFT = text(
    "SELECT count(*) FROM leases WHERE tenant_id = :t AND subject = :s AND state <> 'revoked'"
)
TWILIO = VALID["twilio"]


def egress_env(fake: FakeProviders) -> dict[str, str]:
    """What the broker and its worker need to mint and revoke at the fake."""
    return {
        "BROKER_TWILIO_BASE_URL": fake.base_url,
        "BROKER_OPENAI_BASE_URL": fake.base_url,
        "BROKER_LEASE_SWEEP_S": "1",
    }


def _setup(bench: Bench, client: httpx.Client, tenant: str) -> int:
    """A tenant whose Twilio is in dynamic delivery; returns the root's KV version."""
    platform = {"Authorization": f"Bearer {bench.tokens.platform()}"}
    admin = {"Authorization": f"Bearer {bench.tokens.admin(tenant)}"}
    client.post("/v1/tenants", json={"id": tenant, "name": tenant}, headers=platform)
    saved = client.put(
        "/v1/tenants/settings/integrations/twilio", json={"fields": TWILIO}, headers=admin
    )
    saved.raise_for_status()
    client.put(
        "/v1/tenants/settings/integrations/twilio/delivery",
        json={"mode": "dynamic"},
        headers=admin,
    ).raise_for_status()
    version: int = saved.json()["version"]
    return version


def _service(bench: Bench, tenant: str, subject: str) -> dict[str, str]:
    jwt = bench.tokens.mint(subject, ["credentials:read"], kind="service", tenants=[tenant])
    return {"Authorization": f"Bearer {jwt}"}


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(bench: Bench, fake: FakeProviders, *, mints: int, leases: int) -> dict[str, Any]:
    """The three dynamic-credential figures (see the module docstring)."""
    broker = bench.broker.url
    tenant = f"bench-dyn-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=broker, timeout=30) as client:
        root_version = _setup(bench, client, tenant)
        reuse_auth = _service(bench, tenant, "bench-dyn-reuse")
        for c in (1, 8):
            bench.measure(
                REUSE,
                broker,
                c,
                "one service, its live lease",
                targets=[
                    {
                        "method": "GET",
                        "path": f"/v1/credentials/{tenant}/twilio",
                        "headers": reuse_auth,
                        "body": None,
                    }
                ],
            )
        log.info("minting %d keys, one fresh service each", mints)
        took: list[float] = []
        started = time.perf_counter()
        for n in range(mints):
            headers = _service(bench, tenant, f"bench-dyn-mint-{n}")
            before = time.perf_counter()
            client.get(f"/v1/credentials/{tenant}/twilio", headers=headers).raise_for_status()
            took.append((time.perf_counter() - before) * 1000)
        mint_wall = time.perf_counter() - started
    fresh = {
        "calls": mints,
        "per_s": round(mints / mint_wall, 1),
        "p50_ms": round(statistics.median(took), 2),
        "p99_ms": round(_percentile(took, 0.99), 2),
    }
    log.info("fresh mint: p50 %.1f ms, p99 %.1f ms", fresh["p50_ms"], fresh["p99_ms"])
    return {
        "tenant": tenant,
        "fresh_mint_c1": fresh,
        "revocation": _revocation(bench, fake, tenant, root_version, leases),
    }


def _revocation(
    bench: Bench, fake: FakeProviders, tenant: str, root_version: int, count: int
) -> dict[str, Any]:
    """`count` due leases, each with a live key at the fake, swept by a real worker."""
    assert bench.settings.database_url is not None
    engine = make_engine(bench.settings.database_url.get_secret_value())
    try:
        log.info("registering %d due leases", count)
        _register_due_leases(engine, fake, tenant, root_version, count)
        deleted_before = sum(fake.keys.deleted.values())

        def left() -> int:
            with engine.connect() as conn:
                return int(conn.execute(_LEFT, {"t": tenant, "s": REVOKED_SUBJECT}).scalar_one())

        log.info("revoking them through a broker worker")
        log_path = Path(bench.broker.work) / "lease-worker.log"
        started = time.perf_counter()
        with WorkerProcess(bench.broker.env, engine, log_path):
            _until_none_left(left)
        seconds = time.perf_counter() - started
        revoked = count - left()
    finally:
        engine.dispose()
    return {
        "leases": count,
        "revoked": revoked,
        "seconds_incl_worker_start": round(seconds, 1),
        "leases_per_s": round(revoked / seconds, 1),
        "fake_deletions": sum(fake.keys.deleted.values()) - deleted_before,
    }


def _register_due_leases(
    engine: Engine, fake: FakeProviders, tenant: str, root_version: int, count: int
) -> None:
    """Insert `count` leases already due, each with its own live key at the fake."""
    now = utcnow()
    rows = []
    for _ in range(count):
        lease_id = uuid.uuid4().hex
        key = fake.keys.create_twilio_key(TWILIO["account_sid"], f"broker-lease-{lease_id}")
        rows.append(
            {
                "id": lease_id,
                "tenant_id": tenant,
                "provider": "twilio",
                "subject": REVOKED_SUBJECT,
                "provider_key_id": key.sid,
                "root_version": root_version,
                "state": "active",
                "issued_at": now - timedelta(seconds=301),
                "expires_at": now - timedelta(seconds=1),
                "due_at": now - timedelta(seconds=1),
                "revoke_attempts": 0,
            }
        )
    with engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(insert(DynamicLease), rows[start : start + 1000])


def _until_none_left(left: Callable[[], int]) -> None:
    """Wait while the count goes down; give up after 120 s without progress."""
    last, stalled_since = left(), time.perf_counter()
    while last:
        time.sleep(0.5)
        now_left = left()
        if now_left < last:
            last, stalled_since = now_left, time.perf_counter()
        elif time.perf_counter() - stalled_since > 120:
            log.warning("revocation stopped making progress with %d left", now_left)
            break
