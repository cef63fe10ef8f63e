"""Running a worker: `broker worker` in production, one in-process task under `broker dev`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from procrastinate.app import WorkerOptions
from psycopg_pool import AsyncConnectionPool

from broker.core.config import ConfigurationError, Settings
from broker.core.db import make_engine
from broker.jobs.app import JobResources, app, conninfo
from broker.jobs.housekeeping import schedule_stall_check
from broker.leases.jobs import schedule_sweep
from broker.models import utcnow
from broker.vault.gateway import VaultGateway

log = logging.getLogger(__name__)


def _schedule_periodic(settings: Settings) -> None:
    """Check the periodic jobs' settings and schedule them: stall check, lease sweep, health."""
    if settings.jobs_stalled_after_s <= 2 * settings.jobs_heartbeat_s:
        # A live worker that misses one beat would see its jobs run twice.
        raise ConfigurationError("BROKER_JOBS_STALLED_AFTER_S must exceed two heartbeats")
    # Each period becomes a cron seconds field, which only ticks evenly on divisors of 60.
    if 60 % settings.jobs_stalled_check_s:
        raise ConfigurationError("BROKER_JOBS_STALLED_CHECK_S must divide 60")
    if 60 % settings.lease_sweep_s:
        raise ConfigurationError("BROKER_LEASE_SWEEP_S must divide 60")
    if 60 % settings.health_schedule_every_s:
        raise ConfigurationError("BROKER_HEALTH_SCHEDULE_EVERY_S must divide 60")
    from broker.credential_health.jobs import schedule_health_checks

    schedule_stall_check(settings.jobs_stalled_check_s)
    schedule_sweep(settings.lease_sweep_s)
    schedule_health_checks(settings.health_schedule_every_s)


async def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    name: str | None = None,
    install_signal_handlers: bool = True,
    clock: Callable[[], datetime] = utcnow,
) -> None:
    """Run jobs from `queues` (all when None) until stopped by SIGTERM/SIGINT or cancellation.

    `clock` is the time jobs judge expiries by (tests hand in their own).

    Stopping is graceful: no new job starts and running ones finish. A worker
    killed before that (a supervisor's timeout) leaves them to the stall check,
    which retries them on another worker; so no job is lost either way.
    """
    _schedule_periodic(settings)
    dsn = conninfo(settings)
    if settings.database_url is None:  # conninfo() refused it already; for the type checker
        raise ConfigurationError("BROKER_DATABASE_URL is required")
    concurrency = concurrency or settings.jobs_concurrency
    pool = AsyncConnectionPool(
        dsn,
        open=False,
        min_size=1,
        # One per running job, plus the listener, heartbeat and periodic deferrer.
        max_size=concurrency + 3,
        check=AsyncConnectionPool.check_connection,
    )
    engine = make_engine(settings.database_url.get_secret_value())
    vault = VaultGateway.from_settings(settings)
    options: WorkerOptions = {
        "concurrency": concurrency,
        "name": name or "broker-worker",
        "install_signal_handlers": install_signal_handlers,
        "update_heartbeat_interval": settings.jobs_heartbeat_s,
        "stalled_worker_timeout": settings.jobs_stalled_after_s,
        "fetch_job_polling_interval": settings.jobs_poll_interval_s,
        "additional_context": {"resources": JobResources(settings, engine, vault, clock)},
    }
    if queues:  # none given: every queue
        options["queues"] = list(queues)
    if install_signal_handlers:
        # Sync tasks run on the loop's default executor, which holds only cpu+4 threads:
        # a worker of its own makes room for `concurrency` of them (webhook deliveries,
        # health checks). Under `broker dev` the loop is the API's and is left alone.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=concurrency + 4, thread_name_prefix="broker-job")
        )
    try:
        async with pool, app.open_async(pool):
            await app.run_worker_async(**options)
    finally:
        vault.close()
        engine.dispose()


def alongside(api: FastAPI, settings: Settings) -> FastAPI:
    """Run one worker on `api`'s event loop for as long as it serves (`broker dev`)."""
    serving = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(app):
            # The server owns the signals; cancelling the worker stops it gracefully.
            worker = asyncio.create_task(run_worker(settings, install_signal_handlers=False))
            worker.add_done_callback(_report_early_exit)
            try:
                yield
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)

    api.router.lifespan_context = lifespan
    return api


def _report_early_exit(worker: asyncio.Task[None]) -> None:
    # The API keeps serving without its worker; say so rather than fail silently.
    if not worker.cancelled() and worker.exception() is not None:
        log.error("the in-process job worker stopped", exc_info=worker.exception())
