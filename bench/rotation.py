"""Key rotation: secrets rewrapped per second, on a stack of its own or the bench's.

    python -m bench.rotation                         # 10,000 tenants, one secret each
    BENCH_ROTATION_SECRETS=1000 python -m bench.rotation
    BENCH_ROTATION_PER_TENANT=20 python -m bench.rotation   # 500 tenants, 20 secrets each

Every tenant gets its own Transit key and one sealed credential (OpenAI, stored
through the broker's own `save_credentials`), plus, with `BENCH_ROTATION_PER_TENANT`
above 1, more sealed items beside it (`integrations/bench-extra-N`, sealed with the
tenant's key like any other). Then `rotate_all` rotates every key and rewraps every
secret with `BENCH_ROTATE_WORKERS` tenants at a time, exactly what
`broker keys rotate --all` runs. `bench.run` calls `measure` on its own
tenants (one secret each). It measures; it asserts nothing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine

from bench.direct import PRINCIPAL, connected, fake_openai, store_openai
from bench.process import own_stack, progress_logging
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, unit_of_work
from broker.integrations import service as integrations
from broker.tenants.keys import rotate_all
from broker.tenants.service import create_tenant
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore

log = logging.getLogger("bench")

SEED_THREADS = 8


def seed(
    settings: Settings, count: int, prefix: str = "bench-rot", *, per_tenant: int = 1
) -> list[str]:
    """`count` fresh tenants with one stored OpenAI key and `per_tenant - 1` more
    sealed items each."""
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    with connected(settings) as (engine, vault), fake_openai() as outbound:
        with ThreadPoolExecutor(SEED_THREADS) as pool:
            list(pool.map(lambda t: _tenant(engine, vault, outbound, t, per_tenant), ids))
    return ids


def _tenant(
    engine: Engine,
    vault: VaultGateway,
    outbound: integrations.Outbound,
    tenant_id: str,
    per_tenant: int,
) -> None:
    with unit_of_work(engine) as session:
        create_tenant(session, vault, principal=PRINCIPAL, tenant_id=tenant_id, name=tenant_id)
    store_openai(engine, vault, outbound, tenant_id)
    store = SealedStore(vault)
    for n in range(1, per_tenant):
        item = f"integrations/bench-extra-{n}"
        secret = {"token": secrets.token_urlsafe(24)}
        ciphertext = store.seal(tenant_id, item, secret, {})
        store.write(tenant_id, item, ciphertext=ciphertext, public={}, cas=0)


def measure(settings: Settings, tenants: list[str], *, workers: int) -> dict[str, Any]:
    """Rotate every tenant's key and rewrap its secrets, `workers` tenants at a time."""
    # A connection per worker: each tenant's steps hold one at a time.
    bounds = DatabaseBounds(pool_size=workers, max_overflow=4)
    log.info("rotating %d tenant keys", len(tenants))
    with connected(settings, bounds) as (engine, vault):
        cpu, started = time.process_time(), time.perf_counter()
        reports = rotate_all(
            engine, vault, principal=PRINCIPAL, tenant_ids=tenants, workers=workers
        )
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
    rewrapped = sum(r.rewrapped for r in reports)
    return {
        "tenants": len(tenants),
        "secrets_rewrapped": rewrapped,
        "failed": sum(len(r.failed) for r in reports),
        "seconds": round(seconds, 2),
        "secrets_per_s": round(rewrapped / seconds, 1),
        "seconds_per_10000": round(seconds / rewrapped * 10_000, 1) if rewrapped else None,
        "workers": workers,
        "rotating_process_cpu_s": round(cpu_s, 2),
    }


def describe(rot: dict[str, Any]) -> str:
    """One line for the bench table."""
    return (
        f"key rotation: {rot['secrets_rewrapped']} secrets rewrapped in {rot['seconds']} s = "
        f"{rot['secrets_per_s']} secrets/s ({rot['workers']} workers; "
        f"{rot['seconds_per_10000']} s per 10,000; {rot['failed']} failed)"
    )


def main() -> None:
    from bench.run import Plan

    progress_logging(log)
    plan = Plan.from_env()
    with own_stack("broker-bench-rotation-") as (_, settings, _work):
        per_tenant = int(os.environ.get("BENCH_ROTATION_PER_TENANT") or 1)
        count = -(-plan.rotation_secrets // per_tenant)
        log.info("seeding %d tenants, %d secrets each", count, per_tenant)
        tenants = seed(settings, count, per_tenant=per_tenant)
        results = measure(settings, tenants, workers=plan.rotate_workers)
    print(json.dumps(results, indent=2))  # noqa: T201
    print(describe(results))  # noqa: T201


if __name__ == "__main__":
    main()
