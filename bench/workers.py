"""Settings reads and writes, and how throughput grows with `broker serve --workers N`.

For `bench.run`:

    from bench import workers
    results["workers"] = workers.scaling(settings, work, tokens, tenants, plan)

serves the broker once per worker count (1, then 2) against the same stack and
measures the settings GET at c=8 (and c=1) with wrk, so the figure shows what a
second core buys one replica. Alone, for the settings figures only:

    python -m bench.workers            # GET and PATCH at c=1 and c=8, 1 then 2 workers

It measures; it asserts nothing about time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.process import own_stack, progress_logging
from bench.run import Bench, BrokerProcess, Plan, Tokens, tenant_ids
from broker.core.config import Settings

log = logging.getLogger("bench.workers")

WORKER_COUNTS = (1, 2)
PATCH_BODY = '{"branding": {"footer_text": "bench {n}"}}'


def settings_targets(tokens: Tokens, tenants: list[str], *, write: bool) -> list[dict[str, Any]]:
    """One GET (or PATCH) of the caller's own settings per tenant, as its admin."""
    targets = []
    for tenant in tenants:
        headers = {"Authorization": f"Bearer {tokens.admin(tenant)}"}
        if write:
            headers["Content-Type"] = "application/json"
        targets.append(
            {
                "method": "PATCH" if write else "GET",
                "path": "/v1/tenants/settings",
                "headers": headers,
                "body": PATCH_BODY if write else None,
            }
        )
    return targets


def measure_settings(
    base_url: str,
    tokens: Tokens,
    tenants: list[str],
    plan: Plan,
    *,
    write: bool = False,
    concurrencies: tuple[int, ...] = (1, 8),
) -> dict[str, Any]:
    """Settings GET (or PATCH) figures at each concurrency, keyed `c1`, `c8`."""
    figures = {}
    for concurrency in concurrencies:
        figures[f"c{concurrency}"] = wrk.measure(
            {
                "base_url": base_url,
                "concurrency": concurrency,
                "duration_s": plan.duration_s,
                "warmup_s": plan.warmup_s,
                "targets": settings_targets(tokens, tenants, write=write),
            }
        )
    return figures


def scaling(
    settings: Settings,
    work: Path,
    tokens: Tokens,
    tenants: list[str],
    plan: Plan,
    *,
    counts: tuple[int, ...] = WORKER_COUNTS,
    write: bool = False,
) -> dict[str, Any]:
    """Serve the broker with each worker count in turn and measure settings figures.

    Returns `{"workers_1": {"GET": {"c1": ..., "c8": ...}}, ..., "c8_gain": x}`,
    where `c8_gain` is the GET throughput at c=8 of the most workers over one.
    """
    results: dict[str, Any] = {"nproc": os.cpu_count()}
    for count in counts:
        env = {"BROKER_WORKERS": str(count)}
        with BrokerProcess(settings, work, env) as broker:
            measured = {"GET": measure_settings(broker.url, tokens, tenants, plan)}
            if write:
                measured["PATCH"] = measure_settings(broker.url, tokens, tenants, plan, write=True)
        results[f"workers_{count}"] = measured
        log.info("settings GET with %d worker(s): %s", count, _summary(measured["GET"]))
    first, last = results[f"workers_{counts[0]}"], results[f"workers_{counts[-1]}"]
    base = first["GET"]["c8"]["rps"]
    results["c8_gain"] = round(last["GET"]["c8"]["rps"] / base, 2) if base else 0.0
    return results


def _summary(figures: dict[str, Any]) -> str:
    return ", ".join(
        f"{c}: {f['rps']:.0f} rps p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms"
        for c, f in figures.items()
    )


def create_plain_tenants(base_url: str, tokens: Tokens, tenants: list[str]) -> None:
    """Tenants with their default settings and nothing stored: all a settings figure needs."""
    auth = {"Authorization": f"Bearer {tokens.platform()}"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=60) as client:
        for tenant in tenants:
            created = client.post("/v1/tenants", json={"id": tenant, "name": f"Bench {tenant}"})
            if created.status_code not in (201, 409):
                raise RuntimeError(f"creating {tenant}: {created.status_code}")


def main() -> None:
    """Settings figures alone: a dev stack, a few tenants, GET and PATCH per worker count."""
    progress_logging(log)
    plan = Plan.from_env()
    counts = tuple(int(n) for n in os.environ.get("BENCH_WORKER_COUNTS", "1,2").split(","))
    with own_stack("broker-bench-workers-") as (_, settings, work):
        assert settings.jwt_hs256_secret is not None
        tokens = Tokens(
            settings.jwt_hs256_secret.get_secret_value(),
            settings.jwt_issuer,
            settings.jwt_audience,
        )
        tenants = tenant_ids(0, plan.small_tenants)
        with BrokerProcess(settings, work, {}) as broker:
            create_plain_tenants(broker.url, tokens, tenants)
        results = scaling(settings, work, tokens, tenants, plan, counts=counts, write=True)
    for count in counts:
        for method, figures in results[f"workers_{count}"].items():
            print(f"workers={count} {method:5} {_summary(figures)}")  # noqa: T201
    print(f"c=8 GET gain, {counts[-1]} over {counts[0]} worker(s): {results['c8_gain']}x")  # noqa: T201


if __name__ == "__main__":
    main()


def run(bench: Bench) -> dict[str, Any]:
    """The hook `bench.run` calls: settings GET and PATCH with 1 and 2 workers, over the
    small set of tenants the run already created, on broker processes of their own."""
    return scaling(
        bench.settings,
        bench.broker.work,
        bench.tokens,
        tenant_ids(0, bench.plan.small_tenants),
        bench.plan,
        write=True,
    )
