"""What the migration would do with each tenant of a batch: the dry run is this plan.

Planning reads (the progress table, the tenants and their settings, the legacy
rows, and Vault for tenants that may already hold credentials) and writes
nothing. A dry run reports the plan; a real run applies it (`broker.legacy.migrate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine
from sqlmodel import col, select

from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, NotFound, UpstreamUnavailable
from broker.integrations.providers import Credentials
from broker.integrations.service import read_credentials
from broker.legacy.mapping import (
    PROVIDER,
    changed_groups,
    classify_twilio,
    map_metadata,
    row_identity,
    same_credentials,
)
from broker.legacy.reports import OutcomeStatus, TenantOutcome, UnmappedKey
from broker.legacy.runner import Group, Stop, fan_out, load_progress, rows_by_group
from broker.legacy.source import LegacyRow, LegacySource
from broker.models import IntegrationCredential, LegacyMigration, Tenant, TenantSettings
from broker.settings.schemas import default_group
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway

__all__ = ["BatchPlan", "TenantPlan", "plan_batch"]

Action = Literal["report", "record", "apply"]
"""report: nothing to write (an earlier run did it); record: only the outcome is
recorded (progress row and trail); apply: tenant, settings and credentials, then record."""


@dataclass
class TenantPlan:
    """One tenant's planned outcome, and what applying it takes."""

    group: Group
    outcome: TenantOutcome
    action: Action
    row: LegacyRow | None = None
    creds: Credentials | None = None
    """Credentials to store (None when there is nothing to store)."""
    patch: dict[str, Any] = field(default_factory=dict)
    """Settings merge patches, only for the groups they change."""
    tenant_existed: bool = False
    reconcile: bool = False
    """The tenant's Twilio metadata row was left pending by an interrupted write."""
    kv_version: int | None = None
    """The KV version holding the tenant's (verified) credentials."""
    reached: bool = True
    """False when the run stopped before applying this plan: it is not reported."""

    @property
    def tenant_id(self) -> str:
        """The tenant id (every plan that writes has one)."""
        return self.group.tenant_id or ""

    def fail(self, reason: str, status: OutcomeStatus = "failed", **kwargs: Any) -> TenantOutcome:
        """Turn the outcome into a failure (or conflict) with `reason`; returns it."""
        self.outcome = TenantOutcome(
            self.group.tenant_id, self.group.legacy_ids, status, reason=reason, **kwargs
        )
        self.creds = None
        return self.outcome


@dataclass
class BatchPlan:
    """The plans of one batch, in order; `stopped` when Vault or PostgreSQL went away."""

    plans: list[TenantPlan]
    stopped: str | None = None


Stored = tuple[Credentials, int] | None | BrokerError
"""What Vault holds for a tenant: its credentials and KV version, nothing, or why unreadable."""


@dataclass
class _Known:
    """What the broker holds now for the batch's tenants, read once per batch."""

    progress: Mapping[str, LegacyMigration]
    rows: Mapping[str, list[LegacyRow]] = field(default_factory=dict)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    settings: Mapping[str, TenantSettings] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    stored: dict[str, Stored] = field(default_factory=dict)
    stop: Stop | None = None


def plan_batch(
    engine: Engine, vault: VaultGateway, source: LegacySource, batch: list[Group], *, workers: int
) -> BatchPlan:
    """Plan one batch: reads only, writes nothing."""
    known = _Known(load_progress(engine, source.label, batch))
    todo = [g for g in batch if g.tenant_id is not None and _already_done(g, known) is None]
    _read_broker(engine, source, todo, known)
    _read_vault(vault, [g for g in todo if _may_hold(g, known)], known, workers)
    plans = [plan for group in batch if (plan := _plan(group, known)) is not None]
    return BatchPlan(plans, known.stop.message if known.stop is not None else None)


def _plan(group: Group, known: _Known) -> TenantPlan | None:
    """The group's plan; None when the run stopped before reaching it."""
    done = _already_done(group, known)
    if done is not None:
        return done
    if group.tenant_id is None:
        reason = "the legacy id has no letters or digits to make a tenant id from"
        return TenantPlan(
            group, TenantOutcome(None, group.legacy_ids, "failed", reason=reason), "record"
        )
    stop = known.stop
    if stop is not None and stop.outcome.tenant_id == group.tenant_id:
        return TenantPlan(group, stop.outcome, "record")
    if _may_hold(group, known) and group.tenant_id not in known.stored:
        return None  # not reached: the run stopped first
    return _plan_tenant(group, known)


def _read_broker(engine: Engine, source: LegacySource, groups: list[Group], known: _Known) -> None:
    """The legacy rows, tenants, settings and pending writes of `groups`, one read each."""
    ids = [g.tenant_id or "" for g in groups]
    known.rows = rows_by_group(source, groups)
    with unit_of_work(engine) as session:
        known.tenants = {
            t.id: t for t in session.exec(select(Tenant).where(col(Tenant.id).in_(ids)))
        }
        existing = list(known.tenants)
        known.settings = {
            s.tenant_id: s
            for s in session.exec(
                select(TenantSettings).where(col(TenantSettings.tenant_id).in_(existing))
            )
        }
        known.pending = set(
            session.exec(
                select(IntegrationCredential.tenant_id)
                .where(col(IntegrationCredential.tenant_id).in_(existing))
                .where(IntegrationCredential.provider == PROVIDER)
                .where(col(IntegrationCredential.vault_sync_pending))
            )
        )


def _may_hold(group: Group, known: _Known) -> bool:
    """Whether Vault may hold credentials to compare: the tenant exists and the row has some."""
    rows = known.rows.get(group.tenant_id or "") or []
    return (
        group.tenant_id in known.tenants
        and len(rows) > 0
        and classify_twilio(rows[0]).creds is not None
    )


def _read_vault(vault: VaultGateway, groups: list[Group], known: _Known, workers: int) -> None:
    """The Twilio credentials Vault holds now for these tenants (read concurrently)."""

    def read(group: Group) -> Stored:
        try:
            return read_credentials(vault, tenant_id=group.tenant_id or "", provider=PROVIDER)
        except NotFound:
            return None
        except (UpstreamUnavailable, VaultMisconfigured) as exc:
            outcome = TenantOutcome(group.tenant_id, group.legacy_ids, "failed", reason=exc.message)
            raise Stop(exc.message, outcome) from None
        except BrokerError as exc:
            return exc

    for group, result, stop in fan_out(read, groups, workers):
        if stop is not None:
            known.stop = stop
        else:
            known.stored[group.tenant_id or ""] = result


def _already_done(group: Group, known: _Known) -> TenantPlan | None:
    """A plan that only reports, when earlier runs did (or must not redo) this tenant."""
    records = [known.progress.get(legacy) for legacy in group.legacy_ids]
    present = [r for r in records if r is not None]
    statuses = {r.status for r in present}
    if "finalized" in statuses and (len(present) < len(records) or statuses != {"finalized"}):
        reason = (
            "some legacy rows of this tenant were already finalized and these were "
            "not; resolve the new legacy rows by hand"
        )
        outcome = TenantOutcome(group.tenant_id, group.legacy_ids, "conflict", reason=reason)
        return TenantPlan(group, outcome, "report")
    if len(present) < len(records) or not statuses <= {"verified", "finalized"}:
        return None
    if any(r.tenant_id != group.tenant_id for r in present):
        return None
    first = present[0]
    outcome = TenantOutcome(
        group.tenant_id,
        group.legacy_ids,
        "skipped",
        credential=first.credential,
        reason="already finalized" if statuses == {"finalized"} else "already migrated",
        settings_groups=list(first.settings_groups),
        unmapped=unmapped_of(first),
    )
    return TenantPlan(group, outcome, "report")


def unmapped_of(record: LegacyMigration) -> list[UnmappedKey]:
    """The unmapped keys an earlier run recorded."""
    return [UnmappedKey(**u) for u in record.unmapped_keys]


def _plan_tenant(group: Group, known: _Known) -> TenantPlan:
    """The plan of a tenant with an id that no earlier run finished."""
    tenant_id = group.tenant_id or ""
    rows = known.rows.get(tenant_id) or []
    tenant = known.tenants.get(tenant_id)
    stored = known.stored.get(tenant_id)
    plan = TenantPlan(
        group,
        TenantOutcome(tenant_id, group.legacy_ids, "skipped"),
        "record",
        row=rows[0] if rows else None,
        tenant_existed=tenant is not None,
        reconcile=tenant_id in known.pending,
    )
    if _refused(plan, rows, tenant, stored) or plan.row is None:
        return plan
    twilio = classify_twilio(plan.row)
    groups, unmapped = _settings_change(plan, plan.row, known)
    credential: str = twilio.kind
    if twilio.creds is not None and isinstance(stored, tuple):
        credential, plan.kv_version = "unchanged", stored[1]
    elif twilio.creds is not None:
        credential, plan.creds = "stored", twilio.creds
    status: OutcomeStatus = "migrated"
    reason: str | None = None
    if twilio.kind == "incomplete":
        status, reason = "skipped", twilio.reason
    elif tenant is not None and not groups and credential != "stored":
        status, reason = "skipped", "already in the broker"
    plan.action = "apply"
    plan.outcome = TenantOutcome(
        tenant_id,
        group.legacy_ids,
        status,
        credential=credential,
        reason=reason,
        created=tenant is None,
        settings_groups=groups,
        unmapped=unmapped,
    )
    return plan


def _refused(
    plan: TenantPlan, rows: list[LegacyRow], tenant: Tenant | None, stored: Stored
) -> bool:
    """Fail the plan when the tenant must not be touched at all (recorded, nothing written)."""
    twilio = classify_twilio(rows[0]) if rows else None
    if twilio is None:
        plan.fail("the legacy row disappeared")
    elif len({row_identity(r) for r in rows}) > 1:
        ids = ", ".join(repr(i) for i in plan.group.legacy_ids)
        plan.fail(
            f"{len(rows)} legacy rows ({ids}) map to this tenant and disagree; "
            "nothing was migrated",
            "conflict",
        )
    elif twilio.kind == "invalid":
        plan.fail(twilio.reason or "invalid Twilio credentials", credential="invalid")
    elif tenant is not None and tenant.deleting_at is not None:
        plan.fail("the tenant is being deleted")
    elif isinstance(stored, BrokerError):
        plan.fail(stored.message)
    elif stored and twilio.creds and not same_credentials(stored[0], twilio.creds):
        # Existing credentials first: a conflict must leave the tenant untouched.
        plan.fail(
            "different Twilio credentials are already stored for this tenant; both were "
            "left untouched",
            "conflict",
            credential="conflict",
        )
    else:
        return False
    return True


def _settings_change(
    plan: TenantPlan, row: LegacyRow, known: _Known
) -> tuple[list[str], list[UnmappedKey]]:
    """The settings groups the metadata changes (setting `plan.patch`), and the unmapped keys.

    Metadata is applied once: when an earlier run applied it, its record is the answer.
    """
    records = [known.progress.get(legacy) for legacy in plan.group.legacy_ids]
    applied = next((r for r in records if r is not None and r.settings_applied), None)
    if applied is not None:
        return list(applied.settings_groups), unmapped_of(applied)
    settings = known.settings.get(plan.tenant_id)

    def current(name: str) -> Mapping[str, Any]:
        value = getattr(settings, name) if settings is not None else None
        return value or default_group(name)

    patch, unmapped = map_metadata(row.metadata, current)
    groups = changed_groups(patch, current)
    plan.patch = {name: patch[name] for name in groups}
    return groups, unmapped
