"""Background work on payments: settle payout writes Vault never answered, and keep
Stripe's default card the broker's."""

from __future__ import annotations

import logging

from procrastinate import JobContext

from broker.jobs.app import maintenance_task, start_job
from broker.payments import service
from broker.payments.platform import StripeAccess
from broker.payments.service import reconcile_pending_payouts

log = logging.getLogger(__name__)

RECONCILE_PENDING_PAYOUTS = "payments.reconcile_pending_payouts"


# One run at a time across all workers, at most one waiting: a run settles them all.
@maintenance_task(RECONCILE_PENDING_PAYOUTS, cron="* * * * *")
def reconcile_pending(context: JobContext, timestamp: int = 0) -> int:
    """Rebuild every pending payout record from Vault, without waiting for a reader."""
    shared = start_job(context)
    pending = reconcile_pending_payouts(shared.engine, shared.vault)
    if pending:
        log.info("reconciled pending payout records", extra={"fields": {"pending": pending}})
    return pending


RECONCILE_DEFAULT_CARDS = "payments.reconcile_default_cards"


@maintenance_task(RECONCILE_DEFAULT_CARDS, cron="17 * * * *")
def reconcile_default_cards(context: JobContext, timestamp: int = 0) -> int:
    """Put each Stripe customer's invoice default back on the broker's default card."""
    shared = start_job(context)
    stripe = StripeAccess(
        shared.vault,
        api_base=shared.settings.stripe_api_base,
        key_path=shared.settings.stripe_key_path,
    )
    try:
        if not stripe.configured():  # nothing to reconcile with; /readyz says why
            return 0
        return service.reconcile_default_cards(shared.engine, stripe)
    finally:
        stripe.close()
