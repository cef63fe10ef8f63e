"""Background work on payout details: settle writes Vault never answered."""

from __future__ import annotations

import logging

from procrastinate import JobContext

from broker.core import context as request_context
from broker.jobs.app import MAINTENANCE_QUEUE, app, resources
from broker.payments.service import reconcile_pending_payouts

log = logging.getLogger(__name__)

RECONCILE_PENDING_PAYOUTS = "payments.reconcile_pending_payouts"


# One run at a time across all workers, at most one waiting: a run settles them all.
@app.periodic(cron="* * * * *")
@app.task(
    name=RECONCILE_PENDING_PAYOUTS,
    queue=MAINTENANCE_QUEUE,
    pass_context=True,
    lock=RECONCILE_PENDING_PAYOUTS,
    queueing_lock=RECONCILE_PENDING_PAYOUTS,
)
def reconcile_pending(context: JobContext, timestamp: int = 0) -> int:
    """Rebuild every pending payout record from Vault, without waiting for a reader."""
    shared = resources(context)
    request_context.bind(
        request_context.RequestContext(request_id=f"job-{context.job.id}", actor="broker-worker")
    )
    pending = reconcile_pending_payouts(shared.engine, shared.vault)
    if pending:
        log.info("reconciled pending payout records", extra={"fields": {"pending": pending}})
    return pending
