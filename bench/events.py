"""Event figures: webhook delivery throughput and lag, and the cost of health checks.

    python -m bench.events            # 1,000 events/s for 10 s; 1,000 health checks
    BENCH_QUICK=1 python -m bench.events

Delivery: events are emitted at a target rate (in batches, each in its own
transaction, as changes would), a real `broker worker` delivers them to a
local receiver on loopback that verifies every signature with the
`standardwebhooks` library, and each delivery's lag is the time from the
event's commit to its arrival. Throughput is deliveries over the time from
the first emit to the last arrival.

Health checks: stored credentials (OpenAI, against the local fake provider)
are checked with the broker's own `check`, one after another and several at
a time; the figure is the cost of one check, and what 10,000 credentials an
hour (2.8 checks/s) take of one worker thread. It measures; it asserts nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from bench.direct import PRINCIPAL, connected, fake_openai, loopback_egress, store_openai
from bench.oauth_refresh import WorkerProcess
from bench.process import own_stack, progress_logging
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.credential_health import service as health
from broker.events import outbox, webhooks
from broker.models import Event
from broker.tenants.service import create_tenant
from tests.fakes.webhook_receiver import WebhookReceiver

log = logging.getLogger("bench")

EVENT_TYPE = outbox.LEASE_MINTED  # nothing else emits it yet: only the bench's events
TICK_S = 0.01
CHECKS_PER_HOUR = 10_000


def knob(name: str, full: float, quick: float) -> float:
    fast = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    return float(os.environ.get(f"BENCH_{name}") or (quick if fast else full))


class _Timed(WebhookReceiver):
    """The receiver, noting when each delivery arrived (monotonic and wall clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}

    def _record(self, headers: dict[str, str], body: bytes) -> None:
        self.arrived.setdefault(headers.get("webhook-id", ""), time.time())
        super()._record(headers, body)


def delivery(
    settings: Settings, env: dict[str, str], work: Path, *, rate: float, duration_s: float
) -> dict[str, Any]:
    """Emit `rate` events/s for `duration_s` to one platform endpoint; deliver with a worker."""
    concurrency = int(knob("EVENTS_WORKER_CONCURRENCY", 32, 16))
    with connected(settings) as (engine, vault), closing(loopback_egress()) as loopback:
        receiver = _Timed()
        with receiver:
            made = webhooks.register(
                engine,
                vault,
                loopback,
                principal=PRINCIPAL,
                tenant_id=None,
                url=receiver.url,
                event_types=[EVENT_TYPE],
                description="bench",
            )
            receiver.secret = made.secret
            worker_env = env | {
                "BROKER_EGRESS_ALLOW_HTTP": "true",
                "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
                "BROKER_JOBS_CONCURRENCY": str(concurrency),
                "BROKER_JOBS_POLL_INTERVAL_S": "0.2",
            }
            with WorkerProcess(worker_env, engine, work / "events-worker.log"):
                started = time.monotonic()
                emitted = _emit(engine, rate, duration_s)
                emit_rate = round(emitted / (time.monotonic() - started), 1)
                deadline = time.monotonic() + max(60.0, duration_s * 10)
                while len(receiver.arrived) < emitted and time.monotonic() < deadline:
                    time.sleep(0.2)
            lags = _lags(engine, receiver.arrived, made.endpoint.id)
            verified = len(receiver.verified())
            webhooks.delete_endpoint(
                engine, vault, principal=PRINCIPAL, tenant_id=None, endpoint_id=made.endpoint.id
            )
    return {
        "target_rate": rate,
        "emitted": emitted,
        "emit_rate_per_s": emit_rate,
        "delivered": len(lags["lags"]),
        "verified_signatures": verified,
        "throughput_per_s": lags["throughput"],
        "lag_p50_ms": _pct(lags["lags"], 50),
        "lag_p99_ms": _pct(lags["lags"], 99),
        "lag_max_ms": _pct(lags["lags"], 100),
        "worker_concurrency": concurrency,
    }


def _emit(engine: Engine, rate: float, duration_s: float, *, threads: int = 8) -> int:
    """Emit at `rate` per second from `threads` emitters, as concurrent changes would.

    Each emitter commits one small batch per tick; the number emitted is returned.
    """
    per_thread = rate / threads
    per_tick = max(1, round(per_thread * TICK_S))
    tick_s = per_tick / per_thread
    ticks = int(duration_s / tick_s)
    started = time.monotonic()

    def emitter(_: int) -> int:
        for tick in range(ticks):
            with unit_of_work(engine) as session:
                for _ in range(per_tick):
                    outbox.emit(session, EVENT_TYPE, actor="service:bench", tenant_id=None)
            behind = started + (tick + 1) * tick_s - time.monotonic()
            if behind > 0:
                time.sleep(behind)
        return ticks * per_tick

    with ThreadPoolExecutor(threads) as pool:
        emitted = sum(pool.map(emitter, range(threads)))
    achieved = emitted / (time.monotonic() - started)
    log.info("emitted %d events at %.0f/s (%d emitters)", emitted, achieved, threads)
    return emitted


def _lags(engine: Engine, arrived: dict[str, float], endpoint_id: str) -> dict[str, Any]:
    with Session(engine) as session:
        events = session.exec(
            select(Event.id, Event.at)
            .where(Event.type == EVENT_TYPE)
            .where(col(Event.tenant_id).is_(None))
        ).all()
    lags, first, last = [], float("inf"), 0.0
    for event_id, at in events:
        got = arrived.get(webhooks.message_id(int(event_id or 0)))
        if got is None:
            continue
        lags.append((got - at.timestamp()) * 1000)
        first, last = min(first, at.timestamp()), max(last, got)
    throughput = round(len(lags) / (last - first), 1) if lags and last > first else 0.0
    return {"lags": sorted(lags), "throughput": throughput}


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return round(values[index], 1)


def health_checks(settings: Settings, tenants: list[str], *, threads: int) -> dict[str, Any]:
    """The cost of one health check, from `len(tenants)` stored OpenAI keys."""
    with connected(settings) as (engine, vault), fake_openai() as outbound:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda t: store_openai(engine, vault, outbound, t), tenants))

        def one(tenant: str) -> None:
            health.check(
                engine, vault, outbound, tenant_id=tenant, provider="openai", actor="bench"
            )

        figures: dict[str, Any] = {"credentials": len(tenants)}
        for label, width in (("sequential", 1), (f"{threads}_threads", threads)):
            cpu, started = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(width) as pool:
                list(pool.map(one, tenants))
            seconds = time.perf_counter() - started
            cpu_s = time.process_time() - cpu
            figures[label] = {
                "seconds": round(seconds, 2),
                "checks_per_s": round(len(tenants) / seconds, 1),
                "ms_per_check": round(seconds / len(tenants) * 1000, 2),
                "bench_cpu_ms_per_check": round(cpu_s / len(tenants) * 1000, 2),
            }
        per_check_s = figures["sequential"]["ms_per_check"] / 1000
        figures["for_10000_per_hour"] = {
            "checks_per_s": round(CHECKS_PER_HOUR / 3600, 2),
            "worker_thread_share": round(CHECKS_PER_HOUR / 3600 * per_check_s, 3),
        }
    return figures


def make_tenants(settings: Settings, count: int, prefix: str = "bench-hc") -> list[str]:
    """`count` fresh tenants, created directly through the service."""
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    with connected(settings) as (engine, vault):

        def one(tenant_id: str) -> None:
            with unit_of_work(engine) as session:
                create_tenant(
                    session, vault, principal=PRINCIPAL, tenant_id=tenant_id, name=tenant_id
                )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, ids))
    return ids


def run(settings: Settings, env: dict[str, str], work: Path) -> dict[str, Any]:
    """Both figures on a running stack (what `bench.run` calls)."""
    rate = knob("EVENTS_RATE", 1000, 200)
    duration = knob("EVENTS_DURATION_S", 10, 2)
    log.info("delivering %.0f events/s for %.0f s", rate, duration)
    results = {"delivery": delivery(settings, env, work, rate=rate, duration_s=duration)}
    credentials = int(knob("HEALTH_CREDENTIALS", 1000, 50))
    log.info("checking %d stored credentials", credentials)
    tenants = make_tenants(settings, credentials)
    results["health_checks"] = health_checks(settings, tenants, threads=4)
    return results


def describe(results: dict[str, Any]) -> list[str]:
    """Lines for the bench table."""
    d, h = results["delivery"], results["health_checks"]
    share = h["for_10000_per_hour"]["worker_thread_share"]
    return [
        f"webhooks: {d['delivered']}/{d['emitted']} events (emitted at {d['emit_rate_per_s']}/s "
        f"for a target of {d['target_rate']:.0f}/s) delivered at {d['throughput_per_s']}/s; "
        f"lag p50 {d['lag_p50_ms']} ms, "
        f"p99 {d['lag_p99_ms']} ms, max {d['lag_max_ms']} ms "
        f"(worker concurrency {d['worker_concurrency']})",
        f"health checks: {h['sequential']['ms_per_check']} ms per check "
        f"({h['4_threads']['checks_per_s']}/s with 4 threads); 10,000 credentials/hour "
        f"take {share:.1%} of one worker thread",
    ]


def main() -> None:
    from bench.run import BrokerProcess

    progress_logging(log)
    with own_stack("broker-bench-events-") as (_, settings, work):
        broker = BrokerProcess(settings, work, {})
        results = run(settings, broker.env, work)
    print(json.dumps(results, indent=2))  # noqa: T201
    print("\n".join(describe(results)))  # noqa: T201


if __name__ == "__main__":
    main()
