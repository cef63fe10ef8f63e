"""Liveness, readiness and metrics. Public: they reveal nothing about tenants."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine

from broker.core import context
from broker.core.config import Settings
from broker.core.db import ping
from broker.core.errors import BrokerError
from broker.core.metrics import exposition
from broker.deps import (
    EngineDep,
    LimiterDep,
    SettingsDep,
    StripeDep,
    VaultDep,
    VaultThreadsDep,
)
from broker.payments.platform import StripeAccess
from broker.vault.gateway import VaultGateway

router = APIRouter(tags=["health"])

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# A path no tenant can have (tenant ids are slugs, without "_"), within the
# broker's policy: reading it is a no-op that Vault audits.
PROBE_PATH = "tenants/_readiness/payout"
DATABASE_PROBE_S = 1.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {"description": "Ready, or degraded: the database is down, credential fetches work"},
        503: {"description": "Vault cannot serve credential operations"},
    },
)
async def readyz(
    request: Request,
    engine: EngineDep,
    vault: VaultDep,
    vault_threads: VaultThreadsDep,
    settings: SettingsDep,
    stripe: StripeDep,
    limiter: LimiterDep,
) -> JSONResponse:
    """Whether credential operations can succeed now (Vault), and whether settings can (database).

    A database outage alone is `degraded` with a 200: this replica still serves
    credential fetches, which need only Vault, so it must stay in rotation. So
    is a shared rate-limit store (Redis) that cannot be reached: this replica
    then limits on its own counters until it reconnects.
    """
    probes = _Probes()
    async with anyio.create_task_group() as checks:
        checks.start_soon(_probe_vault_then_stripe, probes, stripe, vault, vault_threads, settings)
        checks.start_soon(_probe_database, probes, engine)
    request.app.state.dependency_metrics.saw_vault(probes.vault)
    ready = probes.vault == "ok"
    limits_shared = not limiter.degraded
    database = probes.database
    status = "unavailable" if not ready else ("ready" if database and limits_shared else "degraded")
    body = {
        "status": status,
        "vault": probes.vault,
        "database": "ok" if database else "unreachable",
        "rate_limits": "ok" if limits_shared else "degraded",
        # Detail only: payments need an operator's key, not a restart; without one
        # they answer 501, and every other operation is unaffected.
        "stripe": probes.stripe,
    }
    headers = None if status == "ready" else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@dataclass
class _Probes:
    """What the readiness probes found (each fills in its own part)."""

    vault: str = "unknown"
    stripe: str = "unknown"
    database: bool = False


async def _probe_vault_then_stripe(
    probes: _Probes,
    stripe: StripeAccess,
    vault: VaultGateway,
    vault_threads: anyio.CapacityLimiter,
    settings: Settings,
) -> None:
    # `sys/health` is asked of each node in turn, each with the whole socket timeout: a
    # hung cluster would hold the probe for several of them. Past the request budget
    # Vault cannot serve a fetch either, so it reads unreachable.
    probes.vault = "unreachable"
    with anyio.move_on_after(settings.vault_retry_budget_s):
        probes.vault = await anyio.to_thread.run_sync(
            _vault_state, vault, limiter=vault_threads, abandon_on_cancel=True
        )
    if probes.vault != "ok":
        return
    # A Vault read on a cache miss: bounded like the Vault probe, "unknown" past it.
    with anyio.move_on_after(settings.vault_retry_budget_s):
        probes.stripe = await anyio.to_thread.run_sync(
            _stripe_state, stripe, limiter=vault_threads, abandon_on_cancel=True
        )


async def _probe_database(probes: _Probes, engine: Engine) -> None:
    # A stalled database would hold the probe for its whole deadline, and
    # a probe that times out takes the replica out of rotation: answer
    # "unreachable" sooner and leave the ping to finish on its own.
    with anyio.move_on_after(DATABASE_PROBE_S):
        probes.database = await anyio.to_thread.run_sync(ping, engine, abandon_on_cancel=True)


def _vault_state(vault: VaultGateway) -> str:
    """`ok`, `sealed`, `unreachable`, or `refusing` (answers health, but not requests)."""
    health = vault.health()
    if not health.reachable:
        return "unreachable"
    if not health.ready:
        return "sealed"
    context.update(action="readiness")
    try:
        # sys/health is neither authenticated nor audited: a Vault whose audit
        # device cannot write refuses every credential operation yet reports
        # healthy. A KV read is audited like them, and cheap.
        vault.kv.read(PROBE_PATH)
    except BrokerError:
        return "refusing"
    return "ok"


def _stripe_state(stripe: StripeAccess) -> str:
    """`ok`, or `not_configured` while no platform Stripe key is in Vault."""
    try:
        return "ok" if stripe.configured() else "not_configured"
    except BrokerError:
        return "unknown"


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: this server's counts (every worker's), and this process's state."""
    metrics = request.app.state.metrics
    # Off the event loop: some collectors ask PostgreSQL (job counts), which may stall.
    body = await run_in_threadpool(exposition, metrics.registry, metrics.local)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
