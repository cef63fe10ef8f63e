"""The one query over the broker's audit trail, for the API and for `broker audit` alike.

One semantics, wherever a filter comes from:

- time is the half-open window `[since, until)`: consecutive windows never count an
  event twice, and a time without a zone is UTC, like every time the broker writes;
- `tenant` matches the event's tenant or the tenant its resource names
  (`tenants/<id>/...`, `credentials/<id>/...`): an operator's change to a tenant's
  settings is about that tenant even though the operator belongs to none;
- `actor` matches exactly when it names a kind (`user:alice`); a bare `alice`
  matches whatever kind precedes it (`user:alice`, `service:alice`);
- `provider` matches the provider the resource names, or else the event's
  `detail.provider`.

Every filter is applied in SQL, so `limit` and `after_id` page over exactly the
matching events. The resource patterns mirror `vault_log.resource_tenant_and_provider`,
which names the same tenant and provider for display; a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, literal, or_
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.models import AuditEvent

Outcome = Literal["success", "denied", "failed"]

# PostgreSQL regular expressions; `substring(x from p)` returns p's first group.
_CREDENTIALS = r"(?:^|/)credentials/[^/?]+"
_CREDENTIALS_TENANT = r"(?:^|/)credentials/([^/?]+)"
_CREDENTIALS_PROVIDER = r"(?:^|/)credentials/[^/?]+/([^/?]+)"
_TENANTS_TENANT = r"(?:^|/)tenants/([^/]+)"
_INTEGRATIONS_PROVIDER = r"(?:^|/)integrations/([^/?]+)"
# `/v1/tenants/settings/...` is the caller's own tenant, not a tenant named "settings".
_OWN_TENANT_SEGMENT = "settings"


@dataclass(frozen=True)
class TrailQuery:
    """Filters over the trail; every one that is set must match."""

    tenant: str | None = None
    actor: str | None = None
    provider: str | None = None
    action: str | None = None
    outcome: Outcome | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_id: int | None = None
    limit: int | None = None


def as_utc(when: datetime | None) -> datetime | None:
    """`when` with a zone: a time without one is read as UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC)


def in_window(when: datetime, since: datetime | None, until: datetime | None) -> bool:
    """True inside `[since, until)`, the trail's window (Vault's log is filtered the same way)."""
    if since is not None and when < since:
        return False
    return until is None or when < until


def resource_tenant() -> ColumnElement[Any]:
    """The tenant an event's resource names, in SQL (None when it names none)."""
    resource = col(AuditEvent.resource)
    return func.coalesce(
        func.substring(resource, _CREDENTIALS_TENANT),
        func.nullif(func.substring(resource, _TENANTS_TENANT), _OWN_TENANT_SEGMENT),
    )


def event_provider() -> ColumnElement[Any]:
    """The provider an event is about, in SQL: from its resource, else from its detail."""
    resource = col(AuditEvent.resource)
    from_resource = case(
        (resource.regexp_match(_CREDENTIALS), func.substring(resource, _CREDENTIALS_PROVIDER)),
        else_=func.substring(resource, _INTEGRATIONS_PROVIDER),
    )
    return func.coalesce(from_resource, col(AuditEvent.detail)["provider"].astext)


def actor_condition(wanted: str) -> ColumnElement[bool]:
    """`user:alice` matches itself; a bare `alice` matches any `<kind>:alice`, and `alice`."""
    actor = col(AuditEvent.actor)
    if ":" in wanted:
        return actor == wanted
    # Everything after the first colon (the whole actor when it has none).
    name = func.substr(actor, func.strpos(actor, literal(":")) + 1)
    return name == wanted


def conditions(query: TrailQuery) -> list[ColumnElement[bool]]:
    """The SQL conditions of `query`, one per filter that is set."""
    found: list[ColumnElement[bool]] = []
    if query.tenant is not None:
        found.append(
            or_(col(AuditEvent.tenant_id) == query.tenant, resource_tenant() == query.tenant)
        )
    if query.actor is not None:
        found.append(actor_condition(query.actor))
    if query.provider is not None:
        found.append(event_provider() == query.provider)
    if query.action is not None:
        found.append(col(AuditEvent.action) == query.action)
    if query.outcome is not None:
        found.append(col(AuditEvent.outcome) == query.outcome)
    found.extend(_window(query))
    if query.after_id is not None:
        found.append(col(AuditEvent.id) > query.after_id)
    return found


def _window(query: TrailQuery) -> list[ColumnElement[bool]]:
    since, until = as_utc(query.since), as_utc(query.until)
    window: list[ColumnElement[bool]] = []
    if since is not None:
        window.append(col(AuditEvent.at) >= since)
    if until is not None:
        window.append(col(AuditEvent.at) < until)
    return window


def search(session: Session, query: TrailQuery) -> list[AuditEvent]:
    """Events matching every filter of `query`, oldest first (in the order they were written)."""
    statement = select(AuditEvent).order_by(col(AuditEvent.id))
    for condition in conditions(query):
        statement = statement.where(condition)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    return list(session.exec(statement))


def read(session: Session, query: TrailQuery, *, principal: Principal) -> list[AuditEvent]:
    """`search`, with the reading itself recorded in the trail (who read, with what filter)."""
    events = search(session, query)
    trail.record(
        session,
        action="audit.read",
        resource="audit/events",
        outcome="success",
        principal=principal,
        tenant_id=query.tenant,
        detail={"returned": len(events)},
    )
    return events
