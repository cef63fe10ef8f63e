"""The event outbox: `emit` records an event in the caller's own transaction.

An event exists exactly when the change it describes committed: a failed
change rolls its event back with it. Emitting also queues, in that same
transaction, one delivery job per webhook endpoint that wants the event, so
nothing announced is ever lost either. Events carry identifiers, provider,
version, state, actor and time, never a secret; `detail` takes plain values
only (names, numbers, flags), and anything longer than a short reason is cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, literal, literal_column, text, tuple_
from sqlmodel import Session, col, select

from broker.core.errors import ValidationFailed
from broker.models import Event, utcnow

# Every event type the broker emits; webhook filters are checked against it.
CREDENTIAL_SAVED = "credential.saved"
CREDENTIAL_DELETED = "credential.deleted"
CREDENTIAL_RESTORED = "credential.restored"
CREDENTIAL_ROTATED = "credential.rotated"
REFRESH_FAILED = "credential.refresh_failed"
RECONNECT_NEEDED = "credential.reconnect_needed"
HEALTH_CHANGED = "credential.health_changed"
ROTATION_DUE = "credential.rotation_due"
EXPIRING = "credential.expiring"
LEASE_MINTED = "lease.minted"
LEASE_REVOKED = "lease.revoked"
TENANT_DELETED = "tenant.deleted"
ENDPOINT_DISABLED = "webhook.endpoint_disabled"

EVENT_TYPES = frozenset(
    {
        CREDENTIAL_SAVED,
        CREDENTIAL_DELETED,
        CREDENTIAL_RESTORED,
        CREDENTIAL_ROTATED,
        REFRESH_FAILED,
        RECONNECT_NEEDED,
        HEALTH_CHANGED,
        ROTATION_DUE,
        EXPIRING,
        LEASE_MINTED,
        LEASE_REVOKED,
        TENANT_DELETED,
        ENDPOINT_DISABLED,
    }
)

# Events whose credential changed: what a service's cached lease must not outlive.
CREDENTIAL_CHANGES = frozenset(
    {
        CREDENTIAL_SAVED,
        CREDENTIAL_DELETED,
        CREDENTIAL_RESTORED,
        CREDENTIAL_ROTATED,
        RECONNECT_NEEDED,
        LEASE_REVOKED,
        TENANT_DELETED,
    }
)

_MAX_DETAIL_TEXT = 200
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _plain_detail(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    """`detail` limited to short plain values: a programming error cannot smuggle a document."""
    plain: dict[str, Any] = {}
    for key, value in (detail or {}).items():
        if not _DETAIL_KEY.fullmatch(key):
            raise ValueError(f"event detail key {key!r} is not a plain name")
        if isinstance(value, str):
            value = value[:_MAX_DETAIL_TEXT]
        elif not (value is None or isinstance(value, bool | int | float)):
            raise ValueError(f"event detail {key!r} must be a plain value")
        plain[key] = value
    return plain


def emit(
    session: Session,
    type: str,
    *,
    actor: str,
    tenant_id: str | None = None,
    provider: str | None = None,
    version: int | None = None,
    state: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Record an event in the session's transaction and queue its webhook deliveries.

    Returns the event id. The caller's commit publishes it; its rollback unsays it.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    row = session.execute(
        _EMIT,
        {
            "at": utcnow(),
            "type": type,
            "tenant_id": tenant_id,
            "provider": provider,
            "version": version,
            "state": state,
            "actor": actor[:200],
            "detail": json.dumps(_plain_detail(detail)),
        },
    ).one()
    event_id, deliveries = int(row[0]), list(row[1] or ())
    if deliveries:
        # Imported here: delivery needs the job app, which imports most of the broker.
        from broker.events.delivery import queue_attempt

        for delivery_id in deliveries:
            queue_attempt(session, int(delivery_id), expect=0, delay_s=None)
    return event_id


# One round trip per event: the event, and one delivery per enabled endpoint that wants
# it (a tenant's event goes to that tenant's endpoints and to the platform's; a platform
# event to the platform's only; an empty filter wants every type). Emitting is on the
# path of every change, so it is one statement rather than ORM objects.
_EMIT = text(
    """
    WITH event AS (
        INSERT INTO events (at, type, tenant_id, provider, version, state, actor, detail)
        VALUES (:at, :type, :tenant_id, :provider, :version, :state, :actor,
                CAST(:detail AS jsonb))
        RETURNING id
    ), delivery AS (
        INSERT INTO webhook_deliveries
            (event_id, endpoint_id, webhook_id, status, attempts, created_at)
        SELECT event.id, endpoint.id, 'msg_' || event.id, 'pending', 0, :at
        FROM event, webhook_endpoints AS endpoint
        WHERE endpoint.enabled
          AND (endpoint.tenant_id IS NULL OR endpoint.tenant_id = :tenant_id)
          AND (endpoint.event_types = '[]'::jsonb
               OR endpoint.event_types @> jsonb_build_array(CAST(:type AS text)))
        RETURNING id
    )
    SELECT (SELECT id FROM event), ARRAY(SELECT id FROM delivery ORDER BY id)
    """
)


# -- the change feed's reads ---------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the feed: (transaction id, event id), both only growing in commit order."""

    txid: int
    event_id: int

    def __str__(self) -> str:
        return f"{self.txid}-{self.event_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """A cursor from its text form; ValidationFailed (not echoing it) when malformed."""
        parts = text.split("-")
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 19 for p in parts):
            raise ValidationFailed("after: not a cursor this feed handed out")
        return cls(int(parts[0]), int(parts[1]))


START = Cursor(0, 0)

# Events of a transaction still running carry a txid at or above the oldest running
# one: serving only those below it means no later commit lands behind a cursor.
_SETTLED: ColumnElement[int] = literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
)


@dataclass(frozen=True)
class Scope:
    """Which events a reader may see: some tenants, or everything (the platform)."""

    tenants: frozenset[str] | None  # None: every tenant and the platform's own events

    def allows(self, tenant_id: str | None) -> bool:
        """True when an event of `tenant_id` is visible in this scope."""
        return self.tenants is None or (tenant_id is not None and tenant_id in self.tenants)


def head(session: Session) -> Cursor:
    """The newest settled position: where a reader that wants only new events starts."""
    row = session.exec(
        select(col(Event.txid), col(Event.id))
        .where(col(Event.txid) < _SETTLED)
        .order_by(col(Event.txid).desc(), col(Event.id).desc())
        .limit(1)
    ).first()
    return Cursor(int(row[0] or 0), int(row[1] or 0)) if row else START


def read_after(
    session: Session, *, after: Cursor, scope: Scope, limit: int = 100
) -> tuple[list[Event], Cursor]:
    """Settled events after `after` within `scope`, oldest first, and the next cursor."""
    query = (
        select(Event)
        .where(
            tuple_(col(Event.txid), col(Event.id))
            > tuple_(literal(after.txid, BigInteger), literal(after.event_id, BigInteger))
        )
        .where(col(Event.txid) < _SETTLED)
        .order_by(col(Event.txid), col(Event.id))
        .limit(limit)
    )
    if scope.tenants is not None:
        query = query.where(col(Event.tenant_id).in_(sorted(scope.tenants)))
    events = list(session.exec(query))
    if not events:
        return [], after
    last = events[-1]
    return events, Cursor(int(last.txid or 0), int(last.id or 0))
