"""The queue's own upkeep: jobs of dead workers go to live ones; old history goes."""

from __future__ import annotations

import logging

from procrastinate import JobContext, exceptions
from procrastinate.jobs import Job, Status
from procrastinate.manager import QUEUEING_LOCK_CONSTRAINT, JobManager

from broker.jobs.app import JOBS_QUEUE, app, resources

log = logging.getLogger(__name__)

RETRY_STALLED = "jobs.retry_stalled"
# Succeeded jobs are kept this long for inspection; failed ones until someone looks.
KEEP_SUCCEEDED_H = 24


# No lock: a lock held by a job of this very task that stalled would block it forever.
@app.task(name=RETRY_STALLED, queue=JOBS_QUEUE, pass_context=True)
async def retry_stalled(context: JobContext, timestamp: int) -> int:
    """Put back in the queue every job whose worker stopped sending heartbeats."""
    settings = resources(context).settings
    manager = context.app.job_manager
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=settings.jobs_stalled_after_s)
    retried = 0
    for job in stalled:
        try:
            await manager.retry_job(job)
        except exceptions.UniqueViolation as exc:
            if exc.constraint_name != QUEUEING_LOCK_CONSTRAINT:
                continue
            # Another job of its queueing lock is already waiting (the next periodic tick,
            # a re-queue): it does the same work. Left as it is, this one would hold its
            # `lock` for ever and keep that waiting job from ever starting.
            await _give_up(manager, job)
            continue
        except exceptions.ConnectorException:
            # Another check retried it first, or it finished meanwhile.
            continue
        retried += 1
        log.warning(
            "retried a stalled job",
            extra={"fields": {"job_id": job.id, "task": job.task_name}},
        )
    return retried


async def _give_up(manager: JobManager, job: Job) -> None:
    """Mark a stalled job failed, freeing its lock for the job waiting in its place."""
    try:
        await manager.finish_job(job, status=Status.FAILED, delete_job=False)
    except exceptions.ConnectorException:
        return  # another check got to it first
    log.warning(
        "a stalled job was superseded by one waiting with its queueing lock",
        extra={"fields": {"job_id": job.id, "task": job.task_name}},
    )


def schedule_stall_check(every_s: int) -> None:
    """Tick `retry_stalled` every `every_s` seconds in this process (once; later calls keep it)."""
    if (RETRY_STALLED, "") in app.periodic_registry.periodic_tasks:
        return
    app.periodic(cron=f"* * * * * */{every_s}")(retry_stalled)


@app.periodic(cron="7 * * * *")
@app.task(name="jobs.prune_history", queue=JOBS_QUEUE, pass_context=True)
async def prune_history(context: JobContext, timestamp: int) -> None:
    """Delete succeeded jobs finished more than a day ago."""
    await context.app.job_manager.delete_old_jobs(nb_hours=KEEP_SUCCEEDED_H)
