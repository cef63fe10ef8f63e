"""Scheduled health checks of stored credentials: state, history, events.

Every stored credential is re-tested, through the guarded egress, with the
same connection test a save runs. The verdict is one of:

- `healthy`: the provider accepted the credentials;
- `failing` (with the provider's reason): two checks in a row failed (the
  first failure is retried after `health_retry_s` before the state flips,
  so one network blip does not alarm anybody);
- `needs_reconnect`: an OAuth token nothing can renew was refused (only the
  tenant can fix it).

A provider answering 429 is not a failure: the credential's state stays,
and that provider's checks pause for `health_rate_limit_backoff_s`. Every
check is kept in the history (`credential_health_checks`); a change of state
is announced as a `credential.health_changed` event in the same transaction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.core.errors import NotFound
from broker.events import outbox
from broker.integrations import service as integrations
from broker.integrations.providers import ConnectionResult, get_provider
from broker.integrations.service import Outbound
from broker.models import HealthCheck, IntegrationCredential, Tenant, utcnow
from broker.vault.errors import StoredDataUnverified
from broker.vault.gateway import VaultGateway

# Failed checks in a row that flip a credential to `failing`: the first is retried.
FAILURES_TO_FLIP = 2
RATE_LIMITED = "rate_limited"

Verdict = Literal["healthy", "failing", "needs_reconnect", "unknown"]
Next = Literal["done", "retry", "rate_limited", "skipped"]


@dataclass(frozen=True)
class Checked:
    """What one check found and what should happen next."""

    state: str
    changed: bool
    next: Next
    result: ConnectionResult | None = None


def interval_s(settings: Settings, provider: str) -> int:
    """How often a provider's credentials are checked."""
    return settings.health_check_intervals.get(provider, settings.health_check_interval_s)


def jitter_s(settings: Settings, provider: str) -> float:
    """A random delay spreading the checks that fall due together."""
    limit = min(settings.health_check_jitter_s, interval_s(settings, provider))
    return random.uniform(0, limit)  # noqa: S311 - spreading checks in time, not a secret


def check(
    engine: Engine,
    vault: VaultGateway,
    outbound: Outbound,
    *,
    tenant_id: str,
    provider: str,
    actor: str,
) -> Checked:
    """Test one stored credential now and record the verdict (idempotent per version)."""
    spec = get_provider(provider)
    with unit_of_work(engine) as session:
        row = session.get(IntegrationCredential, (tenant_id, provider))
        tenant = session.get(Tenant, tenant_id)
        if row is None or not row.configured or tenant is None or tenant.deleting_at:
            return Checked("unknown", False, "skipped")
        if row.needs_reconnect:
            return Checked("needs_reconnect", False, "skipped")
    try:
        creds, version = integrations.read_credentials(
            vault, tenant_id=tenant_id, provider=provider
        )
    except NotFound:
        return Checked("unknown", False, "skipped")
    except StoredDataUnverified:
        integrations.record_unverified(
            engine, vault, tenant_id, provider, action="integration.health_check"
        )
        raise
    result = spec.connection_test(outbound.client, outbound.endpoints, creds)
    checked = _record(engine, tenant_id, provider, version, result, actor)
    if (
        checked.next == "done"
        and result.code == "rejected"
        and _unrenewable(engine, tenant_id, provider)
    ):
        # Meta's business token: refused means only a reconnect helps (and emits its event).
        integrations.mark_needs_reconnect(
            engine,
            principal=Principal(subject=actor, kind="service", scopes=frozenset()),
            tenant_id=tenant_id,
            provider=provider,
            reason="token_rejected",
        )
        return Checked("needs_reconnect", True, "done", result)
    return checked


def _unrenewable(engine: Engine, tenant_id: str, provider: str) -> bool:
    oauth = get_provider(provider).oauth
    if oauth is None or oauth.refreshable:
        return False
    with unit_of_work(engine) as session:
        row = session.get(IntegrationCredential, (tenant_id, provider))
        return row is not None and row.credential_kind == "oauth"


def _judge(
    row: IntegrationCredential, result: ConnectionResult, now: datetime
) -> tuple[str, str, Next]:
    """Apply one check's result to the row: (the code to record, the new state, what next)."""
    before = row.health_state
    code: str = result.code
    upcoming: Next
    if result.status_code == 429:
        code, state, upcoming = RATE_LIMITED, before, "rate_limited"
    elif result.ok:
        row.health_failures, state, upcoming = 0, "healthy", "done"
    else:
        row.health_failures += 1
        flips = row.health_failures >= FAILURES_TO_FLIP or before == "failing"
        state = "failing" if flips else before
        upcoming = "done" if flips else "retry"
    row.health_checked_at = now
    if code != RATE_LIMITED:
        row.last_test_at, row.last_test_ok = now, result.ok
        row.last_test_code, row.last_test_reason = result.code, result.reason[:300]
    row.health_state = state
    if state == "healthy":
        row.health_reason = None
    elif state == "failing" and not result.ok:
        row.health_reason = result.reason[:300]
    return code, state, upcoming


def _record(
    engine: Engine,
    tenant_id: str,
    provider: str,
    version: int,
    result: ConnectionResult,
    actor: str,
) -> Checked:
    with unit_of_work(engine) as session:
        row = session.exec(
            select(IntegrationCredential)
            .where(IntegrationCredential.tenant_id == tenant_id)
            .where(IntegrationCredential.provider == provider)
            .with_for_update()
        ).first()
        if row is None or row.kv_version != version or not row.configured:
            # Changed while it was tested: this verdict is about a version that is gone.
            return Checked(row.health_state if row else "unknown", False, "skipped", result)
        now = utcnow()
        before = row.health_state
        code, state, upcoming = _judge(row, result, now)
        session.add(row)
        session.add(
            HealthCheck(
                tenant_id=tenant_id,
                provider=provider,
                at=now,
                ok=result.ok,
                code=code,
                reason=result.reason[:300],
                state=state,
            )
        )
        changed = state != before
        integrations.update_status(session, row)
        if changed:
            outbox.emit(
                session,
                outbox.HEALTH_CHANGED,
                actor=actor,
                tenant_id=tenant_id,
                provider=provider,
                version=version,
                state=state,
                detail={"previous": before, "code": result.code, "reason": result.reason},
            )
        return Checked(state, changed, upcoming, result)


def due(engine: Engine, settings: Settings, *, limit: int) -> list[tuple[str, str]]:
    """(tenant, provider) pairs whose last check is older than their provider's interval.

    Providers that answered 429 within the backoff are left out altogether.
    """
    now = utcnow()
    with unit_of_work(engine) as session:
        paused = set(
            session.exec(
                select(HealthCheck.provider)
                .where(HealthCheck.code == RATE_LIMITED)
                .where(
                    col(HealthCheck.at)
                    > now - timedelta(seconds=settings.health_rate_limit_backoff_s)
                )
                .distinct()
            )
        )
        found: list[tuple[str, str]] = []
        for provider in _providers(session):
            if provider in paused:
                continue
            cutoff = now - timedelta(seconds=interval_s(settings, provider))
            rows = session.exec(
                select(IntegrationCredential.tenant_id)
                .join(Tenant, col(Tenant.id) == col(IntegrationCredential.tenant_id))
                .where(IntegrationCredential.provider == provider)
                .where(col(IntegrationCredential.configured).is_(True))
                .where(col(IntegrationCredential.needs_reconnect).is_(False))
                .where(col(IntegrationCredential.vault_sync_pending).is_(False))
                .where(col(Tenant.deleting_at).is_(None))
                .where(
                    (col(IntegrationCredential.health_checked_at).is_(None))
                    | (col(IntegrationCredential.health_checked_at) < cutoff)
                )
                .order_by(col(IntegrationCredential.health_checked_at).nulls_first())
                .limit(limit - len(found))
            )
            found.extend((tenant_id, provider) for tenant_id in rows)
            if len(found) >= limit:
                break
        return found


def _providers(session: Session) -> list[str]:
    return list(
        session.exec(
            select(IntegrationCredential.provider)
            .where(col(IntegrationCredential.configured).is_(True))
            .distinct()
        )
    )


@dataclass(frozen=True)
class Health:
    """A credential's health as the tenant admin sees it, with its recent history."""

    state: str
    reason: str | None
    checked_at: datetime | None
    history: list[HealthCheck]
    row: IntegrationCredential


def health_of(session: Session, *, tenant_id: str, provider: str, limit: int = 50) -> Health:
    """The current verdict and the latest checks of one credential."""
    get_provider(provider)
    integrations.live_tenant(session, tenant_id)
    row = session.get(IntegrationCredential, (tenant_id, provider))
    if row is None or not row.configured:
        raise NotFound("this integration is not configured")
    history = list(
        session.exec(
            select(HealthCheck)
            .where(HealthCheck.tenant_id == tenant_id)
            .where(HealthCheck.provider == provider)
            .order_by(col(HealthCheck.at).desc(), col(HealthCheck.id).desc())
            .limit(limit)
        )
    )
    return Health(row.health_state, row.health_reason, row.health_checked_at, history, row)


def audit_requested(
    engine: Engine, principal: Principal, tenant_id: str, provider: str, state: str
) -> None:
    """Record that a tenant admin asked for a check."""
    trail.record_separately(
        engine,
        action="integration.health_check",
        resource=f"tenants/{tenant_id}/integrations/{provider}",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={"state": state},
    )


def counts_by_state(session: Session) -> dict[str, int]:
    """How many configured credentials are in each health state (for the metric)."""
    rows = session.exec(
        select(IntegrationCredential.health_state, func.count())
        .where(col(IntegrationCredential.configured).is_(True))
        .group_by(col(IntegrationCredential.health_state))
    )
    return {str(state): int(count) for state, count in rows}
