"""Old events and finished deliveries go after `events_retention_days` (a daily job)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from procrastinate import JobContext
from sqlalchemy import CursorResult, Engine, delete
from sqlmodel import col, select

from broker.core.db import unit_of_work
from broker.jobs.app import MAINTENANCE_QUEUE, app, resources
from broker.models import Event, WebhookDelivery, utcnow

log = logging.getLogger(__name__)

PRUNE = "events.prune"


def prune(engine: Engine, *, older_than: timedelta) -> tuple[int, int]:
    """Delete events and finished deliveries older than `older_than`: (events, deliveries).

    A pending delivery is kept, and so is its event, however old: it may still be sent.
    """
    cutoff = utcnow() - older_than
    pending = select(WebhookDelivery.event_id).where(col(WebhookDelivery.status) == "pending")
    with unit_of_work(engine) as session:
        deliveries: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            delete(WebhookDelivery)
            .where(col(WebhookDelivery.created_at) < cutoff)
            .where(col(WebhookDelivery.status) != "pending")
        )
        events: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            delete(Event).where(col(Event.at) < cutoff).where(col(Event.id).not_in(pending))
        )
    return int(events.rowcount or 0), int(deliveries.rowcount or 0)


@app.periodic(cron="23 3 * * *")
@app.task(name=PRUNE, queue=MAINTENANCE_QUEUE, pass_context=True, lock=PRUNE, queueing_lock=PRUNE)
def prune_events(context: JobContext, timestamp: int = 0) -> int:
    """Delete what is older than the retention (events and finished deliveries)."""
    shared = resources(context)
    events, deliveries = prune(
        shared.engine, older_than=timedelta(days=shared.settings.events_retention_days)
    )
    if events or deliveries:
        log.info(
            "pruned old events", extra={"fields": {"events": events, "deliveries": deliveries}}
        )
    return events
