"""The procrastinate App every task is registered on, and what a running job may use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from procrastinate import App, JobContext, PsycopgConnector
from procrastinate.tasks import Task
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from broker.core import context as request_context
from broker.core.config import ConfigurationError, Settings, get_settings
from broker.models import utcnow
from broker.vault.gateway import VaultGateway

# Modules whose import registers tasks. The worker imports them all, so a job
# deferred by one process is known to every worker, whatever it imported itself.
TASK_MODULES = [
    "broker.jobs.housekeeping",
    "broker.integrations.jobs",
    "broker.payments.jobs",
    "broker.leases.jobs",
    "broker.events.delivery",
    "broker.events.housekeeping",
    "broker.credential_health.jobs",
]

# Queues: the queue's own housekeeping, and the maintenance of stored credentials.
JOBS_QUEUE = "jobs"
MAINTENANCE_QUEUE = "maintenance"


def conninfo(settings: Settings) -> str:
    """The libpq connection string of the broker's database (its URL without the driver)."""
    if settings.database_url is None:
        raise ConfigurationError("no database (BROKER_DATABASE_URL)")
    url = make_url(settings.database_url.get_secret_value()).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _pool_from_environment(**kwargs: Any) -> AsyncConnectionPool:
    # Only used when the app is opened without a pool (e.g. procrastinate's own
    # CLI); the broker opens it with a pool built from the settings it runs with.
    return AsyncConnectionPool(conninfo=conninfo(get_settings()), **kwargs)


# Building the App connects nowhere: the pool is created when it is opened.
app = App(
    connector=PsycopgConnector(pool_factory=_pool_from_environment),
    import_paths=TASK_MODULES,
)


@dataclass(frozen=True)
class JobResources:
    """What a worker shares with the jobs it runs: settings, database, Vault and the time.

    `clock` is the time jobs judge expiries by: the real one, or a test's.
    """

    settings: Settings
    engine: Engine
    vault: VaultGateway
    clock: Callable[[], datetime] = field(default=utcnow)
    """What time jobs judge expiry by (tests move it)."""


def resources(context: JobContext) -> JobResources:
    """The worker's resources, from a task's context (declare the task `pass_context=True`)."""
    shared = context.additional_context.get("resources")
    if not isinstance(shared, JobResources):
        raise RuntimeError("this job runs outside a broker worker")
    return shared


def start_job(context: JobContext, actor: str = "broker-worker") -> JobResources:
    """The worker's resources, with this job bound as the request: what it audits or logs
    names the worker (`actor`) and the job as request."""
    request_context.bind_job(context.job.id, actor)
    return resources(context)


def maintenance_task(
    name: str, *, cron: str
) -> Callable[[Callable[[JobContext, int], int]], Task[..., int, ...]]:
    """A periodic maintenance task that runs alone across all workers, at most one waiting.

    For a task whose run covers everything due: a second one waiting would add nothing.
    """

    def register(task: Callable[[JobContext, int], int]) -> Task[..., int, ...]:
        registered = app.task(
            name=name,
            queue=MAINTENANCE_QUEUE,
            pass_context=True,
            lock=name,
            queueing_lock=name,
        )(task)
        return app.periodic(cron=cron)(registered)

    return register
