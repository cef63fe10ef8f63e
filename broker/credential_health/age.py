"""Credential age: rotation due dates, expiry, reminders, and the platform's problem report.

A pasted (static) credential is due for rotation `rotation_period_days` after
its secret last changed, a cryptoperiod in the sense of NIST SP 800-57 Part 1
and PCI DSS requirement 3.7.4; reminders go out before, and past the date it
is `overdue`. An OAuth token the broker refreshes rotates by itself; one
nothing renews (Meta's business token) is `expiring` before its expiry and
`expired` after. The hourly sweep announces each transition once per version
(`credential.rotation_due`, `credential.expiring`); a new version starts over.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.events import outbox
from broker.integrations.providers import get_provider
from broker.models import IntegrationCredential, Tenant, utcnow

AgeState = Literal["ok", "due", "overdue", "expiring", "expired"]
PROBLEMS = ("overdue", "due", "expiring", "expired", "failing", "needs_reconnect")
_SWEEP_BATCH = 1000
ACTOR = "broker-age-sweep"


def rotation_period(settings: Settings, provider: str) -> timedelta:
    """How long a pasted credential of `provider` may live before it is due for rotation."""
    days = settings.rotation_period_days.get(provider, settings.rotation_period_default_days)
    return timedelta(days=days)


@dataclass(frozen=True)
class Age:
    """One credential's age: since when, when it is due or expires, and what that means now."""

    created_at: datetime | None
    rotated_at: datetime | None
    rotation_due_at: datetime | None
    expires_at: datetime | None
    state: AgeState


def age_of(row: IntegrationCredential, settings: Settings, now: datetime) -> Age:
    """The age of a configured credential at `now`."""
    rotated = row.rotated_at or row.first_stored_at or row.updated_at
    oauth = get_provider(row.provider).oauth
    if row.credential_kind == "oauth":
        renewed = oauth is not None and oauth.refreshable
        expires = None if renewed else row.token_expires_at
        state: AgeState = "ok"
        if expires is not None:
            if now >= expires:
                state = "expired"
            elif now >= expires - timedelta(days=settings.expiry_reminder_days):
                state = "expiring"
        return Age(row.first_stored_at, rotated, None, row.token_expires_at, state)
    due = rotated + rotation_period(settings, row.provider)
    if now >= due:
        state = "overdue"
    elif now >= due - timedelta(days=settings.rotation_reminder_days):
        state = "due"
    else:
        state = "ok"
    return Age(row.first_stored_at, rotated, due, None, state)


def sweep(engine: Engine, settings: Settings, *, now: datetime | None = None) -> int:
    """Announce every credential whose age state changed since its last reminder.

    Returns how many reminders were emitted. Idempotent: a state already
    announced for this version is not announced again.
    """
    now = now or utcnow()
    emitted = 0
    after: tuple[str, str] = ("", "")
    while True:
        with unit_of_work(engine) as session:
            rows = list(
                session.exec(
                    select(IntegrationCredential)
                    .where(col(IntegrationCredential.configured).is_(True))
                    .where(
                        (col(IntegrationCredential.tenant_id) > after[0])
                        | (
                            (col(IntegrationCredential.tenant_id) == after[0])
                            & (col(IntegrationCredential.provider) > after[1])
                        )
                    )
                    .order_by(
                        col(IntegrationCredential.tenant_id), col(IntegrationCredential.provider)
                    )
                    .limit(_SWEEP_BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                emitted += _announce(session, row, age_of(row, settings, now))
        if len(rows) < _SWEEP_BATCH:
            return emitted
        after = (rows[-1].tenant_id, rows[-1].provider)


def _announce(session: Session, row: IntegrationCredential, age: Age) -> int:
    notice = None if age.state == "ok" else age.state
    if notice == row.age_notice:
        return 0
    row.age_notice = notice
    session.add(row)
    # Imported here: the integrations service reaches this module through its schemas.
    from broker.integrations.service import update_status

    update_status(session, row)  # the settings' integrations_status shows the new age
    if notice is None:
        return 0
    kind = outbox.EXPIRING if notice in ("expiring", "expired") else outbox.ROTATION_DUE
    when = age.expires_at if kind == outbox.EXPIRING else age.rotation_due_at
    outbox.emit(
        session,
        kind,
        actor=ACTOR,
        tenant_id=row.tenant_id,
        provider=row.provider,
        version=row.kv_version,
        state=notice,
        detail={"at": when.isoformat() if when else None},
    )
    return 1


@dataclass(frozen=True)
class ReportRow:
    """One credential with a problem, across tenants (identifiers only)."""

    tenant_id: str
    provider: str
    kind: str
    version: int
    health: str
    health_reason: str | None
    age: AgeState
    created_at: datetime | None
    rotated_at: datetime | None
    rotation_due_at: datetime | None
    expires_at: datetime | None

    @property
    def problems(self) -> list[str]:
        """What is wrong with it."""
        found: list[str] = [self.age] if self.age != "ok" else []
        if self.health in ("failing", "needs_reconnect"):
            found.append(self.health)
        return found


def report(
    engine: Engine,
    settings: Settings,
    *,
    problems: frozenset[str] = frozenset(PROBLEMS),
    now: datetime | None = None,
    limit: int = 1000,
) -> list[ReportRow]:
    """Every live tenant's credentials that are overdue, due, expiring, expired or failing."""
    now = now or utcnow()
    with unit_of_work(engine) as session:
        rows = session.exec(
            select(IntegrationCredential)
            .join(Tenant, col(Tenant.id) == col(IntegrationCredential.tenant_id))
            .where(col(IntegrationCredential.configured).is_(True))
            .where(col(Tenant.deleting_at).is_(None))
            .order_by(col(IntegrationCredential.tenant_id), col(IntegrationCredential.provider))
            .execution_options(yield_per=1000)
        )
        # Closed explicitly: stopping at `limit` leaves the server-side cursor open.
        with closing(rows):
            found = _problem_rows(rows, settings, now, problems, limit)
    return found


def _problem_rows(
    rows: Iterable[IntegrationCredential],
    settings: Settings,
    now: datetime,
    problems: frozenset[str],
    limit: int,
) -> list[ReportRow]:
    found: list[ReportRow] = []
    for row in rows:
        age = age_of(row, settings, now)
        item = ReportRow(
            tenant_id=row.tenant_id,
            provider=row.provider,
            kind=row.credential_kind,
            version=row.kv_version,
            health="needs_reconnect" if row.needs_reconnect else row.health_state,
            health_reason=row.health_reason,
            age=age.state,
            created_at=age.created_at,
            rotated_at=age.rotated_at,
            rotation_due_at=age.rotation_due_at,
            expires_at=age.expires_at,
        )
        if set(item.problems) & problems:
            found.append(item)
            if len(found) >= limit:
                break
    return found


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Configured credentials by (health state, last age notice), for the metric."""
    from sqlalchemy import func

    rows = session.exec(
        select(
            IntegrationCredential.health_state,
            IntegrationCredential.age_notice,
            func.count(),
        )
        .where(col(IntegrationCredential.configured).is_(True))
        .group_by(col(IntegrationCredential.health_state), col(IntegrationCredential.age_notice))
    )
    return {(str(health), str(age or "ok")): int(n) for health, age, n in rows}
