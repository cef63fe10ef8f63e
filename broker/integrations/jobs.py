"""Background work on integration credentials: settle writes Vault never answered."""

from __future__ import annotations

import logging

from procrastinate import JobContext
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.core import context as request_context
from broker.integrations.service import reconcile_tenant
from broker.jobs.app import MAINTENANCE_QUEUE, app, resources
from broker.models import IntegrationCredential, Tenant
from broker.vault.sealed import SealedStore

log = logging.getLogger(__name__)

RECONCILE_PENDING = "integrations.reconcile_pending"


def tenants_with_pending_writes(engine: Engine) -> list[str]:
    """Live tenants that have a credential row still marked `vault_sync_pending`."""
    with Session(engine) as session:
        return list(
            session.exec(
                select(IntegrationCredential.tenant_id)
                .join(Tenant, col(Tenant.id) == col(IntegrationCredential.tenant_id))
                .where(col(IntegrationCredential.vault_sync_pending).is_(True))
                .where(col(Tenant.deleting_at).is_(None))
                .distinct()
                .order_by(col(IntegrationCredential.tenant_id))
            )
        )


# One run at a time across all workers (lock), and at most one waiting (queueing
# lock): a run reconciles every pending row, so a second waiting one adds nothing.
@app.periodic(cron="* * * * *")
@app.task(
    name=RECONCILE_PENDING,
    queue=MAINTENANCE_QUEUE,
    pass_context=True,
    lock=RECONCILE_PENDING,
    queueing_lock=RECONCILE_PENDING,
)
def reconcile_pending(context: JobContext, timestamp: int = 0) -> int:
    """Rebuild every pending credential row from Vault, without waiting for a reader.

    Idempotent: a row whose write Vault shows settles, one whose write may still
    land stays pending for the next run. Returns how many rows were pending.
    """
    shared = resources(context)
    request_context.bind(
        request_context.RequestContext(request_id=f"job-{context.job.id}", actor="broker-worker")
    )
    store = SealedStore(shared.vault)
    pending = 0
    for tenant_id in tenants_with_pending_writes(shared.engine):
        pending += reconcile_tenant(shared.engine, store, tenant_id)
    if pending:
        log.info("reconciled pending credential rows", extra={"fields": {"pending": pending}})
    return pending
