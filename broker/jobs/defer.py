"""Deferring a job inside the caller's own database transaction."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from procrastinate import SyncPsycopgConnector, exceptions
from procrastinate.manager import JobManager
from procrastinate.tasks import Task
from procrastinate.types import JSONValue
from sqlmodel import Session

from broker.models import utcnow

# Only ever given the caller's connection, so it never opens a pool of its own.
# The App's connector is not used here: inside a worker it is async, and would
# not accept the synchronous connection of a SQLModel session.
_IN_TRANSACTION = JobManager(connector=SyncPsycopgConnector())


def defer(
    session: Session,
    task: Task[..., Any, ...],
    *,
    args: Mapping[str, JSONValue] | None = None,
    lock: str | None = None,
    queueing_lock: str | None = None,
    schedule_in_s: float | None = None,
    priority: int | None = None,
) -> int | None:
    """Queue a job in the session's transaction; None if `queueing_lock` already has one waiting.

    The job exists only if the caller's transaction commits, so a change and
    the work it calls for are never separated. `lock` lets one job per value
    run at a time across all workers; `queueing_lock` keeps one waiting.
    """
    deferrer = task.configure(
        lock=lock,
        queueing_lock=queueing_lock,
        schedule_at=utcnow() + timedelta(seconds=schedule_in_s) if schedule_in_s else None,
        priority=priority,
    )
    job = deferrer.make_new_job(**dict(args or {}))
    if job.queueing_lock is None:
        # Nothing to refuse (neither this call nor the task sets a queueing lock): no
        # savepoint, two round trips fewer on every webhook delivery.
        connection = session.connection().connection.driver_connection
        return _IN_TRANSACTION.defer_job(job=job, connection=connection).id
    try:
        # A savepoint: a refused queueing lock must not abort the caller's transaction.
        # SQLAlchemy emits it when the connection is asked for inside the block.
        with session.begin_nested():
            connection = session.connection().connection.driver_connection
            job = _IN_TRANSACTION.defer_job(job=job, connection=connection)
    except exceptions.AlreadyEnqueued:
        return None
    return job.id
