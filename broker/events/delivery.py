"""Delivering one event to one endpoint: a durable job per attempt, signed, retried, recorded.

Each attempt is a procrastinate job carrying only ids. It signs the event with
the endpoint's secret (Standard Webhooks, HMAC-SHA256 through the
`standardwebhooks` library) and POSTs it through the guarded egress: public
https only, the address checked when connecting, no redirects, a deadline,
a capped response. The `webhook-id` is the event's message id, the same on
every attempt, so a worker killed mid-delivery (its job retried by the stall
check) delivers at least once under one id.

Outcomes: 2xx delivered; 410 disables the endpoint; anything else (3xx, 4xx,
5xx, a refused or failed connection) is retried after the next delay of
`webhook_retry_schedule_s` (by default 5 s up to 24 h, more than three days in
all), honouring a longer `Retry-After`; when the schedule is spent the
delivery fails and the endpoint, which kept failing all that time, is disabled
with a `webhook.endpoint_disabled` event.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from procrastinate import JobContext
from sqlalchemy import Engine
from sqlmodel import Session, select
from standardwebhooks.webhooks import Webhook

from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.events import outbox
from broker.events.webhooks import signing_secret
from broker.integrations.egress import (
    EgressClient,
    EgressFailed,
    EgressPolicy,
    EgressRefused,
    EgressResponse,
)
from broker.jobs.app import app, start_job
from broker.jobs.defer import defer
from broker.models import Event, WebhookDelivery, WebhookEndpoint, utcnow
from broker.vault.gateway import VaultGateway

log = logging.getLogger(__name__)

EVENTS_QUEUE = "events"
DELIVER = "events.deliver_webhook"
WORKER_ACTOR = "broker-worker"
# A receiver's Retry-After is honoured up to this long.
MAX_RETRY_AFTER_S = 24 * 3600


def webhook_egress(settings: Settings) -> EgressClient:
    """The guarded client deliveries use: the connection tests' policy, the webhook limits."""
    return EgressClient(
        EgressPolicy(
            allow_http=settings.egress_allow_http,
            allow_loopback=settings.egress_allow_loopback,
            timeout_s=settings.webhook_timeout_s,
            max_body_bytes=settings.webhook_max_response_bytes,
        )
    )


def queue_attempt(
    session: Session, delivery_id: int, *, expect: int, delay_s: float | None
) -> None:
    """Queue the next attempt of a delivery (`expect`: attempts recorded so far)."""
    defer(
        session,
        deliver_webhook,
        args={"delivery_id": delivery_id, "expect": expect},
        schedule_in_s=delay_s,
    )


def payload(event: Event) -> bytes:
    """The body sent for an event (Standard Webhooks' `type`, `timestamp`, `data`)."""
    document = {
        "type": event.type,
        "timestamp": event.at.astimezone(UTC).isoformat(),
        "data": {
            "event_id": event.id,
            "tenant_id": event.tenant_id,
            "provider": event.provider,
            "version": event.version,
            "state": event.state,
            "actor": event.actor,
            **({"detail": event.detail} if event.detail else {}),
        },
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def signed_headers(secret: str, webhook_id: str, body: bytes, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt."""
    now = now.astimezone(UTC)
    return {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, now, body.decode()),
    }


@dataclass(frozen=True)
class Attempt:
    """What one attempt found: sent (with a status code), or why it was not."""

    outcome: str  # delivered | retry | failed | gone | stale
    status_code: int | None = None
    error: str | None = None


def attempt_delivery(
    engine: Engine,
    vault: VaultGateway,
    client: EgressClient,
    *,
    delivery_id: int,
    expect: int,
    schedule_s: list[float],
) -> Attempt:
    """Make one attempt of a delivery and record it (idempotent for a repeated job).

    `expect` is the number of attempts recorded when this one was queued: a
    job whose attempt someone else recorded meanwhile does nothing.
    """
    with unit_of_work(engine) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return Attempt("gone")
        if delivery.status != "pending" or delivery.attempts != expect:
            return Attempt("stale")
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        event = session.get(Event, delivery.event_id)
        if endpoint is None or event is None:
            return Attempt("gone")
        if not endpoint.enabled:
            delivery.status = "failed"
            delivery.last_error = "the endpoint is disabled"
            session.add(delivery)
            return Attempt("failed", error=delivery.last_error)
        url, webhook_id, body = endpoint.url, delivery.webhook_id, payload(event)
    secret = signing_secret(vault, delivery.endpoint_id)
    response: EgressResponse | None = None
    error: str | None = None
    if secret is None:
        error = "the endpoint's signing secret is gone"
    else:
        try:
            response = client.post(
                url, content=body, headers=signed_headers(secret, webhook_id, body, utcnow())
            )
        except EgressRefused as exc:
            error = f"refused: {exc}"
        except EgressFailed as exc:
            error = str(exc)
    return _record(engine, delivery_id, expect, response, error, schedule_s)


def _record(
    engine: Engine,
    delivery_id: int,
    expect: int,
    response: EgressResponse | None,
    error: str | None,
    schedule_s: list[float],
) -> Attempt:
    with unit_of_work(engine) as session:
        delivery = session.exec(
            select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
        ).first()
        if delivery is None or delivery.attempts != expect or delivery.status != "pending":
            return Attempt("stale")
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id, with_for_update=True)
        if endpoint is None:
            return Attempt("gone")
        now = utcnow()
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.next_attempt_at = None
        code = response.status_code if response is not None else None
        delivery.last_status_code = code
        if code is not None and 200 <= code < 300:
            delivery.status = "delivered"
            delivery.delivered_at = now
            delivery.last_error = None
            session.add(delivery)
            return Attempt("delivered", code)
        delivery.last_error = (error or f"the receiver answered {code}")[:300]
        if code == 410:
            delivery.status = "failed"
            session.add(delivery)
            _disable(session, endpoint, "the receiver answered 410 Gone")
            return Attempt("failed", code, delivery.last_error)
        if delivery.attempts > len(schedule_s):
            delivery.status = "failed"
            session.add(delivery)
            _disable(
                session,
                endpoint,
                f"deliveries kept failing ({delivery.attempts} attempts over the retry schedule)",
            )
            return Attempt("failed", code, delivery.last_error)
        delay = _next_delay(schedule_s[delivery.attempts - 1], response)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
        session.add(delivery)
        queue_attempt(session, delivery_id, expect=delivery.attempts, delay_s=delay)
        return Attempt("retry", code, delivery.last_error)


def _next_delay(base_s: float, response: EgressResponse | None) -> float:
    """The schedule's delay with ±10 % jitter, or the receiver's longer Retry-After."""
    delay = base_s * random.uniform(0.9, 1.1)  # noqa: S311 - retry jitter, not a secret
    if response is not None and response.status_code in (429, 502, 503, 504):
        value = response.headers.get("retry-after", "")
        if value.isdigit():
            delay = max(delay, min(float(value), MAX_RETRY_AFTER_S))
    return delay


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str) -> None:
    """Disable an endpoint and announce it (to the platform's and the tenant's other endpoints)."""
    if not endpoint.enabled:
        return
    endpoint.enabled = False
    endpoint.disabled_reason = reason
    endpoint.disabled_at = utcnow()
    session.add(endpoint)
    session.flush()
    log.warning("disabled a webhook endpoint", extra={"fields": {"endpoint_id": endpoint.id}})
    outbox.emit(
        session,
        outbox.ENDPOINT_DISABLED,
        actor=WORKER_ACTOR,
        tenant_id=endpoint.tenant_id,
        state="disabled",
        detail={"endpoint_id": endpoint.id, "reason": reason},
    )


# Sync: it waits on Vault and the receiver, so it runs in one of the worker's threads.
@app.task(name=DELIVER, queue=EVENTS_QUEUE, pass_context=True)
def deliver_webhook(context: JobContext, delivery_id: int, expect: int) -> str:
    """One attempt of one webhook delivery."""
    shared = start_job(context, WORKER_ACTOR)
    client = webhook_egress(shared.settings)
    try:
        attempt = attempt_delivery(
            shared.engine,
            shared.vault,
            client,
            delivery_id=delivery_id,
            expect=expect,
            schedule_s=list(shared.settings.webhook_retry_schedule_s),
        )
    finally:
        client.close()
    if attempt.outcome in ("retry", "failed"):
        log.info(
            "a webhook delivery attempt did not succeed",
            extra={
                "fields": {
                    "delivery_id": delivery_id,
                    "outcome": attempt.outcome,
                    "status_code": attempt.status_code,
                }
            },
        )
    return attempt.outcome
