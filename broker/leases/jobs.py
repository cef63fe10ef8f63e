"""Revoking leases on the queue: one job per lease at its end, and a periodic sweep.

The per-lease job is deferred in the same transaction that registers the lease, so a
lease never exists without the job that ends it; its lock (`lease:<id>`) keeps two
workers off one lease. The sweep finds everything due that a job did not finish: a
lease revoked early on demand, a failed revocation whose backoff is over, a lease whose
job a dead worker held, or everything that fell due while the broker was down. Either
way a lease is revoked at most once: the revocation itself locks the lease's row.
"""

from __future__ import annotations

import logging

from procrastinate import JobContext
from sqlmodel import Session

from broker.app import outbound_for
from broker.core.db import unit_of_work
from broker.jobs.app import JobResources, app, start_job
from broker.jobs.defer import defer
from broker.leases import service

log = logging.getLogger(__name__)

# A queue of their own: during a provider outage revocations wait out their timeouts,
# and an operator can give them workers of their own (`broker worker -q leases`) so
# they never hold the slots OAuth refreshes need. A plain `broker worker` reads it too.
LEASES_QUEUE = "leases"
REVOKE = "leases.revoke"
SWEEP = "leases.sweep"


# One per worker (its resources): the provider client is built once, not per job.
_LEASING: dict[int, service.Leasing] = {}


def leasing_for(shared: JobResources) -> service.Leasing:
    """The worker's view of leasing: its settings, database, Vault and clock."""
    found = _LEASING.get(id(shared))
    if found is None or found.engine is not shared.engine:
        outbound = outbound_for(shared.settings)
        outbound.client.close()  # only its policy and endpoints are used
        found = _LEASING[id(shared)] = service.Leasing.from_settings(
            shared.settings,
            engine=shared.engine,
            vault=shared.vault,
            outbound=outbound,
            clock=shared.clock,
        )
    return found


@app.task(name=REVOKE, queue=LEASES_QUEUE, pass_context=True)
def revoke_lease(context: JobContext, lease_id: str) -> str:
    """Revoke one lease once it is due (a lease revoked or retried meanwhile is left)."""
    outcome = service.revoke_one(
        leasing_for(start_job(context)), lease_id, actor=service.WORKER, only_if_due=True
    )
    return str(outcome)


def schedule_revocation(session: Session, lease_id: str, *, in_s: float) -> None:
    """Queue the lease's revocation for its end, in the caller's transaction."""
    lock = f"lease:{lease_id}"
    defer(
        session,
        revoke_lease,
        args={"lease_id": lease_id},
        lock=lock,
        queueing_lock=lock,
        schedule_in_s=in_s,
    )


# One run at a time across all workers, at most one waiting.
@app.task(name=SWEEP, queue=LEASES_QUEUE, pass_context=True, lock=SWEEP, queueing_lock=SWEEP)
def sweep(context: JobContext, timestamp: int = 0) -> int:
    """Revoke every lease that is due now; returns how many were revoked.

    A full batch that made progress queues the next run at once; failures wait for
    their backoff, so a provider outage is not retried in a tight loop.
    """
    leasing = leasing_for(start_job(context))
    result = service.revoke_due(leasing)
    if result.revoked and result.revoked + result.failed >= service.SWEEP_BATCH:
        with unit_of_work(leasing.engine) as session:
            defer(session, sweep, lock=SWEEP, queueing_lock=SWEEP)
    if result.revoked or result.failed:
        log.info(
            "swept due leases",
            extra={"fields": {"revoked": result.revoked, "failed": result.failed}},
        )
    return result.revoked


def schedule_sweep(every_s: int) -> None:
    """Tick the sweep every `every_s` seconds in this process (once; later calls keep it)."""
    if (SWEEP, "") in app.periodic_registry.periodic_tasks:
        return
    app.periodic(cron=f"* * * * * */{every_s}")(sweep)
