"""Liveness, readiness and metrics. Public: they reveal nothing about tenants."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from broker.core.db import ping
from broker.deps import EngineDep, SettingsDep, VaultDep

router = APIRouter(tags=["health"])

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Vault or the database is not ready"}})
async def readyz(engine: EngineDep, vault: VaultDep, settings: SettingsDep) -> JSONResponse:
    """Vault is reachable and unsealed, and the database answers."""
    health = await run_in_threadpool(vault.health)
    database = await run_in_threadpool(ping, engine)
    ready = health.ready and database
    body = {
        "status": "ready" if ready else "unavailable",
        "vault": "ok" if health.ready else ("sealed" if health.reachable else "unreachable"),
        "database": "ok" if database else "unreachable",
    }
    headers = None if ready else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics for this process."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
