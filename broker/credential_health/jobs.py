"""Durable health-check jobs: a scheduler that finds due credentials, and one check per job.

The scheduler ticks every `health_schedule_every_s` (on one worker: procrastinate's
periodic defer is unique per tick) and queues a check per due credential,
spread by a random delay. Each check job carries only (tenant, provider); its
lock keeps one check per credential at a time, its queueing lock one waiting.
"""

from __future__ import annotations

import logging

from procrastinate import JobContext
from sqlmodel import Session

from broker.core.db import unit_of_work
from broker.credential_health import age, service
from broker.jobs.app import MAINTENANCE_QUEUE, app, resources, start_job
from broker.jobs.defer import defer

log = logging.getLogger(__name__)

SCHEDULE = "credential_health.schedule_checks"
CHECK = "credential_health.check"
WORKER_ACTOR = "broker-health-check"
# Below the default: a burst of due checks never delays a token refresh or a delivery.
CHECK_PRIORITY = -10


def _lock(tenant_id: str, provider: str) -> str:
    return f"health:{tenant_id}:{provider}"


def queue_check(session: Session, *, tenant_id: str, provider: str, delay_s: float | None) -> bool:
    """Queue a check of one credential in the session's transaction; False if one waits."""
    job = defer(
        session,
        check_credential,
        args={"tenant_id": tenant_id, "provider": provider},
        lock=_lock(tenant_id, provider),
        queueing_lock=_lock(tenant_id, provider),
        schedule_in_s=delay_s,
        priority=CHECK_PRIORITY,
    )
    return job is not None


@app.task(name=CHECK, queue=MAINTENANCE_QUEUE, pass_context=True)
def check_credential(context: JobContext, tenant_id: str, provider: str) -> str:
    """Check one stored credential; a first failure or a 429 queues the next look."""
    # broker.app imports the routes, which queue checks through this module.
    from broker.app import outbound_for

    shared = start_job(context, WORKER_ACTOR)
    outbound = outbound_for(shared.settings)
    try:
        checked = service.check(
            shared.engine,
            shared.vault,
            outbound,
            tenant_id=tenant_id,
            provider=provider,
            actor=WORKER_ACTOR,
        )
    finally:
        outbound.client.close()
    delay = {
        "retry": shared.settings.health_retry_s,
        "rate_limited": shared.settings.health_rate_limit_backoff_s,
    }.get(checked.next)
    if delay is not None:
        # No queueing lock: the scheduler may queue one too; the lock runs them in turn.
        with unit_of_work(shared.engine) as session:
            defer(
                session,
                check_credential,
                args={"tenant_id": tenant_id, "provider": provider},
                lock=_lock(tenant_id, provider),
                schedule_in_s=delay,
                priority=CHECK_PRIORITY,
            )
    if checked.changed:
        log.info(
            "credential health changed",
            extra={
                "fields": {"tenant_id": tenant_id, "provider": provider, "state": checked.state}
            },
        )
    return checked.next


@app.task(
    name=SCHEDULE, queue=MAINTENANCE_QUEUE, pass_context=True, lock=SCHEDULE, queueing_lock=SCHEDULE
)
def schedule_checks(context: JobContext, timestamp: int = 0) -> int:
    """Queue a check for every credential whose last one is older than its interval."""
    shared = resources(context)
    settings = shared.settings
    due = service.due(shared.engine, settings, limit=settings.health_batch)
    queued = 0
    with unit_of_work(shared.engine) as session:
        for tenant_id, provider in due:
            queued += queue_check(
                session,
                tenant_id=tenant_id,
                provider=provider,
                delay_s=service.jitter_s(settings, provider),
            )
    if queued:
        log.info("queued credential health checks", extra={"fields": {"queued": queued}})
    return queued


def schedule_health_checks(every_s: int) -> None:
    """Tick `schedule_checks` every `every_s` seconds in this process (once)."""
    if (SCHEDULE, "") in app.periodic_registry.periodic_tasks:
        return
    app.periodic(cron=f"* * * * * */{every_s}")(schedule_checks)


@app.periodic(cron="11 * * * *")
@app.task(
    name="credential_health.age_sweep",
    queue=MAINTENANCE_QUEUE,
    pass_context=True,
    lock="credential_health.age_sweep",
    queueing_lock="credential_health.age_sweep",
)
def age_sweep(context: JobContext, timestamp: int = 0) -> int:
    """Announce credentials that became due, overdue, expiring or expired (hourly)."""
    shared = resources(context)
    emitted = age.sweep(shared.engine, shared.settings)
    if emitted:
        log.info("announced credential age reminders", extra={"fields": {"emitted": emitted}})
    return emitted
