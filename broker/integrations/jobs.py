"""Background work on integration credentials: settle writes Vault never answered, and
refresh OAuth access tokens before they expire."""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

from procrastinate import JobContext
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.app import oauth_access_for, outbound_for
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError
from broker.integrations import oauth
from broker.integrations.providers import PROVIDERS
from broker.integrations.service import reconcile_tenant
from broker.jobs.app import JobResources, maintenance_task, start_job
from broker.jobs.defer import defer
from broker.models import IntegrationCredential, Tenant
from broker.vault.sealed import SealedStore

log = logging.getLogger(__name__)

RECONCILE_PENDING = "integrations.reconcile_pending"
REFRESH_DUE = "integrations.refresh_due_tokens"
# As many as the refresh gate lets through in one process (RefreshGate default):
# more threads would only wait on it and time out as failures.
REFRESH_THREADS = 4


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
@maintenance_task(RECONCILE_PENDING, cron="* * * * *")
def reconcile_pending(context: JobContext, timestamp: int = 0) -> int:
    """Rebuild every pending credential row from Vault, without waiting for a reader.

    Idempotent: a row whose write Vault shows settles, one whose write may still
    land stays pending for the next run. Returns how many rows were pending.
    """
    shared = start_job(context)
    store = SealedStore(shared.vault)
    pending = 0
    for tenant_id in tenants_with_pending_writes(shared.engine):
        pending += reconcile_tenant(shared.engine, store, tenant_id)
    if pending:
        log.info("reconciled pending credential rows", extra={"fields": {"pending": pending}})
    return pending


def _refresh_one(
    access: oauth.OAuthAccess, worker: Principal, provider: str, tenant_id: str, ahead: timedelta
) -> int:
    """Refresh one token if due: 1 refreshed, 0 fresh enough, -1 failed (logged)."""
    try:
        return oauth.refresh_if_due(
            access, principal=worker, tenant_id=tenant_id, provider=provider, within=ahead
        )
    except BrokerError as exc:
        log.warning(
            "could not refresh an OAuth token ahead of its expiry",
            extra={"fields": {"tenant_id": tenant_id, "provider": provider, "error": exc.message}},
        )
        return -1


def _refresh_providers(
    shared: JobResources,
    access: oauth.OAuthAccess,
    worker: Principal,
    ahead: timedelta,
    batch: int,
) -> tuple[int, int, bool]:
    """One batch per refreshable provider: (refreshed, failed, whether a batch was full)."""
    refreshed = failed = 0
    full = False
    # A few at a time: each refresh waits mostly on the provider and Vault. Each
    # thread runs in a copy of this job's context, for the audited headers.
    with ThreadPoolExecutor(REFRESH_THREADS, thread_name_prefix="oauth-refresh") as pool:
        for provider, spec in PROVIDERS.items():
            if spec.oauth is None or not spec.oauth.refreshable:
                # Nothing renews a Meta business token: a fetch past its expiry marks it.
                continue
            due = oauth.due_for_refresh(
                shared.engine, provider=provider, before=access.clock() + ahead, limit=batch
            )
            full = full or len(due) >= batch
            runs = [
                pool.submit(
                    contextvars.copy_context().run,
                    _refresh_one,
                    access,
                    worker,
                    provider,
                    tenant_id,
                    ahead,
                )
                for tenant_id in due
            ]
            for run in runs:
                outcome = run.result()
                refreshed += max(outcome, 0)
                failed += outcome < 0
    return refreshed, failed, full


# One run at a time, at most one waiting; each refresh also takes the credential's own
# locks, so a fetch refreshing the same token at the same moment never doubles it.
@maintenance_task(REFRESH_DUE, cron="* * * * *")
def refresh_due_tokens(context: JobContext, timestamp: int = 0) -> int:
    """Refresh every OAuth access token that expires within `oauth_refresh_ahead_s`.

    Fetches then never wait on a refresh. Idempotent: a token refreshed meanwhile is
    fresh enough and skipped. A credential that fails (provider down, grant revoked)
    is logged and left to the next run, or to `needs_reconnect`. Returns how many
    were refreshed.
    """
    shared = start_job(context)
    outbound = outbound_for(shared.settings)
    access = oauth_access_for(
        shared.settings,
        engine=shared.engine,
        vault=shared.vault,
        outbound=outbound,
        clock=shared.clock,
    )
    # The platform apps are read once for the run, not once per refresh.
    access = replace(access, apps={})
    worker = Principal(subject="broker-worker", kind="service", scopes=frozenset())
    ahead = timedelta(seconds=shared.settings.oauth_refresh_ahead_s)
    # At most this many per provider in one run; a full batch queues the next run at once.
    batch = shared.settings.oauth_refresh_batch
    try:
        refreshed, failed, full = _refresh_providers(shared, access, worker, ahead, batch)
    finally:
        outbound.client.close()
    if full and refreshed:
        # More are due than one run takes, and this run got somewhere: the next run
        # starts now, not in a minute. A batch that only failed waits for the tick,
        # so a provider outage is not retried in a tight loop.
        with unit_of_work(shared.engine) as session:
            defer(session, refresh_due_tokens, lock=REFRESH_DUE, queueing_lock=REFRESH_DUE)
    if refreshed or failed:
        log.info(
            "refreshed OAuth tokens ahead of expiry",
            extra={"fields": {"refreshed": refreshed, "failed": failed}},
        )
    return refreshed
