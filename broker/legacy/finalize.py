"""Phase 4: null the legacy Twilio columns of tenants whose migration was verified.

Each tenant is re-verified against Vault first (fingerprints). The progress row
is marked finalized before the legacy columns are nulled, so a crash in between
leaves the columns unreadable through the broker, and the next finalize nulls
them. A dry run takes the same decisions and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine

from broker.audit import trail
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, NotFound, UpstreamUnavailable
from broker.integrations.service import read_credentials
from broker.legacy import DEFAULT_BATCH, DEFAULT_WORKERS
from broker.legacy.mapping import PROVIDER, classify_twilio, row_identity, same_credentials
from broker.legacy.reports import FinalizeOutcome, FinalizeReport, FinalizeStatus
from broker.legacy.runner import (
    MIGRATION_SUBJECT,
    Group,
    Run,
    Stop,
    bind,
    fan_out,
    load_progress,
    operator,
    rows_by_group,
    run_batches,
    select_groups,
)
from broker.legacy.source import LegacyRow, LegacySource
from broker.models import LegacyMigration, utcnow
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway

__all__ = ["finalize_legacy"]

_CHANGED = "the legacy columns changed after the migration; rerun the migration"


def finalize_legacy(
    engine: Engine,
    vault: VaultGateway,
    source: LegacySource,
    *,
    dry_run: bool = False,
    tenants: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    subject: str = MIGRATION_SUBJECT,
    workers: int = DEFAULT_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> FinalizeReport:
    """Null the legacy Twilio columns of verified tenants (phase 4); report the rest."""
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    run = _Finalize(engine, vault, source, dry_run=dry_run, subject=subject, workers=workers)
    source.check()
    groups, missing = select_groups(source, tenants)
    report = run.report
    report.total = len(groups) + len(missing)
    report.outcomes.extend(
        FinalizeOutcome(None, [value], "failed", "no legacy tenant has this id")
        for value in missing
    )
    run_batches(groups, report, run.batch, batch_size=batch_size, on_progress=on_progress)
    return report


@dataclass
class _Decision:
    """Where one batch's tenants stand before anything is verified against Vault."""

    retire: list[Group]
    """Finalized already: re-null columns a crash left behind (idempotent)."""
    candidates: list[Group]
    """Verified by the migration: check against Vault, then finalize."""


@dataclass
class _Finalize(Run):
    report: FinalizeReport = field(init=False)

    def __post_init__(self) -> None:
        self.report = FinalizeReport(self.run_id, self.source.label, self.dry_run)

    def batch(self, batch: list[Group]) -> None:
        """Decide, verify against Vault, then (unless dry) mark and retire one batch."""
        decision = self._decide(batch)
        verified = self._verify(decision.candidates)
        if not self.dry_run:
            if verified:
                self._mark_finalized(verified)
            keys = [k for g in [*decision.retire, *verified] for k in g.keys]
            self.report.rows_nulled += self.source.retire(keys)

    def _decide(self, batch: list[Group]) -> _Decision:
        progress = load_progress(self.engine, self.source.label, batch)
        decision = _Decision([], [])
        for group in batch:
            records = [progress.get(legacy) for legacy in group.legacy_ids]
            statuses = {r.status if r is not None else None for r in records}
            if group.tenant_id is None:
                reason = "the legacy id cannot be mapped to a tenant id"
            elif None in statuses:
                reason = "not migrated yet"
            elif statuses == {"finalized"}:
                self._report(group, "already_finalized")
                decision.retire.append(group)
                continue
            elif statuses == {"verified"}:
                decision.candidates.append(group)
                continue
            else:
                reason = _why_not_verified(records)
            self._report(group, "left_alone", reason)
        return decision

    def _verify(self, candidates: list[Group]) -> list[Group]:
        """The candidates Vault still agrees with; the others are reported failed."""
        rows = rows_by_group(self.source, candidates)
        verified: list[Group] = []

        def check(group: Group) -> str:
            return self._mismatch(group, rows[group.tenant_id or ""]) or ""

        for group, mismatch, stop in fan_out(check, candidates, self.workers):
            if stop is not None:
                # Still finalize the ones verified before Vault went away.
                self.report.outcomes.append(stop.outcome)
                self.report.stopped = self.report.stopped or f"{stop.message}; rerun to resume"
            elif mismatch == "":
                verified.append(group)
                self._report(group, "finalized")
            elif mismatch is not None:
                self._report(group, "failed", mismatch)
                if not self.dry_run:
                    self._mark_failed(group, mismatch)
        return verified

    def _report(self, group: Group, status: FinalizeStatus, reason: str | None = None) -> None:
        self.report.outcomes.append(
            FinalizeOutcome(group.tenant_id, group.legacy_ids, status, reason)
        )

    def _mismatch(self, group: Group, rows: list[LegacyRow]) -> str | None:
        """Why this verified tenant may not be finalized now, or None when it may."""
        tenant_id = group.tenant_id
        assert tenant_id is not None  # noqa: S101 - only candidates with a tenant id get here
        bind(self.run_id, operator(self.subject, tenant_id), tenant_id, "legacy.finalize")
        if not rows:
            return None  # the rows are gone: nothing left to retire
        if len({row_identity(r) for r in rows}) > 1:
            return _CHANGED
        twilio = classify_twilio(rows[0])
        if twilio.kind == "absent":
            return None
        if twilio.creds is None:
            return _CHANGED
        try:
            stored, _ = read_credentials(self.vault, tenant_id=tenant_id, provider=PROVIDER)
        except NotFound:
            return "Vault no longer holds the migrated credentials; rerun the migration"
        except (UpstreamUnavailable, VaultMisconfigured) as exc:
            raise Stop(
                exc.message, FinalizeOutcome(tenant_id, group.legacy_ids, "failed", exc.message)
            ) from None
        except BrokerError as exc:
            return exc.message
        if not same_credentials(stored, twilio.creds):
            return (
                "the legacy columns or Vault changed after the migration (their fingerprints "
                "no longer match); rerun the migration to see the conflict"
            )
        return None

    def _mark_failed(self, group: Group, reason: str) -> None:
        with unit_of_work(self.engine) as session:
            for legacy in group.legacy_ids:
                record = session.get(LegacyMigration, (self.source.label, legacy))
                if record is not None:
                    record.status = "failed"
                    record.last_error = reason[:500]
                    record.updated_at = utcnow()
                    session.add(record)

    def _mark_finalized(self, groups: list[Group]) -> None:
        now = utcnow()
        with unit_of_work(self.engine) as session:
            for group in groups:
                principal = operator(self.subject, group.tenant_id)
                bind(self.run_id, principal, group.tenant_id, "legacy.finalize")
                for legacy in group.legacy_ids:
                    record = session.get(
                        LegacyMigration, (self.source.label, legacy), with_for_update=True
                    )
                    if record is not None:
                        record.status = "finalized"
                        record.finalized_at = now
                        record.updated_at = now
                        record.run_id = self.run_id
                        session.add(record)
                trail.record(
                    session,
                    action="legacy.finalize",
                    resource=f"tenants/{group.tenant_id}",
                    outcome="success",
                    principal=principal,
                    tenant_id=group.tenant_id,
                    detail={"source": self.source.label, "legacy_ids": group.legacy_ids[:20]},
                )


def _why_not_verified(records: Sequence[LegacyMigration | None]) -> str:
    for record in records:
        if record is None or record.status in ("verified", "finalized"):
            continue
        if record.status == "pending":
            return "the migration of this tenant did not finish; rerun the migration"
        detail = f": {record.last_error}" if record.last_error else ""
        return f"migration status is {record.status}{detail}"
    return "some legacy rows of this tenant were finalized and others not"
