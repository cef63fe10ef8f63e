"""Tenant Transit keys: backfill, and rotation with rewrap (resumable).

Rotation, for a batch of up to `BATCH_TENANTS` tenants at a time:
1. one transaction: rotate each `tenant-<id>` key (once; the target version is
   recorded in PostgreSQL, so a rerun after an interruption continues instead of
   rotating again) and mark the tenants' metadata rows pending, since their KV
   versions are about to move;
2. the Vault work of each tenant (`broker.tenants.rewrap`), `workers` tenants at a
   time: rewrap every sealed item to the target version in one batch call, write
   each back to KV with check-and-set, then raise `min_decryption_version` to the
   target, so ciphertexts from before the rotation (older KV versions, backups) can
   no longer be decrypted;
3. in the transaction that held the tenants' rows through step 2: move each row to
   the version the rotation wrote (check-and-set told it), close the rotation
   records and audit them.

Only rows the rotation did not move itself are reconciled from Vault afterwards. A
crash anywhere leaves rows marked pending and records running: the reconcile job
settles the rows from Vault, and a rerun resumes each tenant where it stood.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import NotFound
from broker.integrations.service import item_name, reconcile_tenant
from broker.models import IntegrationCredential, KeyRotation, PaymentProfile, Tenant, utcnow
from broker.payments.service import (
    PAYOUT_ITEM,
    mark_payouts_pending,
    reconcile_payout,
    settle_rewrapped_payouts,
)
from broker.tenants.rewrap import Outcome, rewrap_tenant
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, key_name

# Tenants whose marks share one transaction, and whose settling shares another. With
# 100 and 16 tenants' Vault work at once (the CLI's default), 10,000 secrets cost
# OpenBao less CPU than with 50 and 8: more of its writes commit together.
BATCH_TENANTS = 100
# Ciphertexts per rewrap call.
REWRAP_BATCH = 250


@dataclass(frozen=True)
class RotationReport:
    """What one tenant's rotation did."""

    tenant_id: str
    key_version: int
    rewrapped: int
    already_current: int
    resumed: bool
    # Items Vault would not rewrap (e.g. a ciphertext that never decrypted under this
    # tenant's binding): left as they were, named here for an operator.
    failed: tuple[str, ...] = ()


def backfill_keys(engine: Engine, vault: VaultGateway) -> list[str]:
    """Create the Transit key of every tenant that lacks one; returns their ids."""
    store = SealedStore(vault)
    return [t for t in live_tenant_ids(engine) if store.ensure_tenant_key(t)]


def live_tenant_ids(engine: Engine) -> list[str]:
    """Ids of every tenant not being deleted, in order."""
    with unit_of_work(engine) as session:
        query = select(Tenant.id).where(col(Tenant.deleting_at).is_(None)).order_by(col(Tenant.id))
        return list(session.exec(query))


def rotate_tenant_key(
    engine: Engine, vault: VaultGateway, *, principal: Principal, tenant_id: str
) -> RotationReport:
    """Rotate one tenant's key and rewrap everything it protects (resumable)."""
    (report,) = rotate_all(engine, vault, principal=principal, tenant_ids=[tenant_id])
    return report


def rotate_all(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_ids: Iterable[str] | None = None,
    on_done: Callable[[RotationReport], None] | None = None,
    workers: int = 1,
) -> list[RotationReport]:
    """Rotate several tenants (all by default), in batches, `workers` tenants' Vault work
    at a time; returns the reports in the tenants' order.

    `on_done` is called with each report from the calling thread, batch by batch. The
    first error stops the run: the other tenants of its batch finish (none after a
    tenant that is gone starts), no later batch starts, and the error is raised; a
    rerun resumes where each tenant stood.
    """
    # Each tenant once: a batch rotates each of its tenants' keys once.
    ids = list(dict.fromkeys(live_tenant_ids(engine) if tenant_ids is None else tenant_ids))
    reports: list[RotationReport] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        rotation = _Rotation(engine, SealedStore(vault), principal, pool, max(1, workers))
        for start in range(0, len(ids), BATCH_TENANTS):
            done, error = rotation.batch(ids[start : start + BATCH_TENANTS])
            for report in done:
                reports.append(report)
                if on_done is not None:
                    on_done(report)
            if error is not None:
                raise error
    return reports


@dataclass(frozen=True)
class _Started:
    """A tenant's rotation under way: its key version, and whether a rerun resumed it."""

    target: int
    resumed: bool


@dataclass(frozen=True)
class _Marks:
    """What step one marked pending: the integration rows carry `at` (a row still
    marked at that instant carries the rotation's own mark, not another write's), and
    the payout records of `payouts`."""

    at: datetime
    payouts: frozenset[str]


@dataclass(frozen=True)
class _Rotation:
    """One run of rotations: where it works, as whom, its pool for the key rotations and
    how many tenants' Vault work runs at once."""

    engine: Engine
    store: SealedStore
    principal: Principal
    pool: ThreadPoolExecutor
    workers: int

    def batch(self, tenant_ids: Sequence[str]) -> tuple[list[RotationReport], Exception | None]:
        """Rotate a batch; the reports of the tenants that finished, and the first error."""
        started, marks, error = self._begin(tenant_ids)
        settled = self._rewrap_and_settle(started, marks)
        self._reconcile_leftovers(settled, marks)
        reports = [
            RotationReport(
                tenant,
                started[tenant].target,
                len(outcome.written),
                outcome.current,
                started[tenant].resumed,
                outcome.failed,
            )
            for tenant, outcome in settled.outcomes.items()
        ]
        return reports, error or settled.error

    def _begin(
        self, tenant_ids: Sequence[str]
    ) -> tuple[dict[str, _Started], _Marks, NotFound | None]:
        """Rotate each key once and record the target, or find the run to resume; mark
        the rows pending. Stops at the first tenant that is gone (its error returned).

        Committed before any KV write: the recorded target makes a rerun resume instead
        of rotating again, and a crash mid-way leaves the marked rows to the reconcile job.
        """
        with unit_of_work(self.engine) as session:
            # Shared locks: a deletion racing this step waits for its commit rather than
            # removing a tenant under the KeyRotation row about to be added (a foreign-key
            # violation, a 500); it then marks the tenant, and the next step answers 404.
            live, error = _live_prefix(session, tenant_ids)
            started = self._records(session, live)
            mark = utcnow()
            # A row another write marked already keeps that write's mark.
            session.exec(
                update(IntegrationCredential)
                .where(
                    col(IntegrationCredential.tenant_id).in_(live),
                    col(IntegrationCredential.vault_sync_pending).is_(False),
                )
                .values(vault_sync_pending=True, pending_since=mark)
            )
            # A rewrap of a payout record whose answer is lost may land later: marked, its
            # next write reconciles first instead of failing check-and-set (a false 409).
            payouts = frozenset(mark_payouts_pending(session, live))
            return started, _Marks(mark, payouts), error

    def _records(self, session: Session, tenant_ids: list[str]) -> dict[str, _Started]:
        """Each tenant's running rotation, or a new one with its key rotated now."""
        running = {r.tenant_id: r for r in _running(session, tenant_ids)}
        fresh = [t for t in tenant_ids if t not in running]
        # Each in a copy of the caller's context: a request's audited headers go along.
        calls = [(contextvars.copy_context(), key_name(t)) for t in fresh]
        rotate = self.store.vault.transit.rotate
        targets = self.pool.map(lambda call: call[0].run(rotate, call[1]), calls)
        for tenant, target in zip(fresh, targets, strict=True):
            running[tenant] = KeyRotation(
                tenant_id=tenant,
                target_version=target,
                status="running",
                started_by=self.principal.actor,
            )
            session.add(running[tenant])
        return {t: _Started(running[t].target_version, t not in fresh) for t in tenant_ids}

    def _rewrap_each(
        self, started: Mapping[str, _Started]
    ) -> tuple[dict[str, Outcome], Exception | None]:
        """Each tenant's Vault work, `workers` at a time on an event loop of its own; the
        outcomes, and the first error."""
        results = self.store.vault.each_on_loop(
            lambda tenant, threads: rewrap_tenant(
                self.store, tenant, started[tenant].target, batch=REWRAP_BATCH, threads=threads
            ),
            list(started),
            at_once=self.workers,
        )
        outcomes: dict[str, Outcome] = {}
        error: Exception | None = None
        for tenant, result in zip(started, results, strict=True):
            if isinstance(result, Exception):
                error = error or result
            else:
                outcomes[tenant] = result
        return outcomes, error

    def _rewrap_and_settle(self, started: dict[str, _Started], marks: _Marks) -> _Settled:
        """Rewrap every tenant's items, settle the rows and close the rotation records, in
        one transaction holding the tenants' rows.

        Held (shared) through the Vault work: a deletion, which locks a tenant's row to
        mark it, waits for the rotation instead of shredding under it, and a rotation
        never goes on with a tenant whose deletion has begun (NotFound, once the others
        are done). A tenant whose Vault work failed keeps its marks and running record.
        """
        with unit_of_work(self.engine) as session:
            live, gone = _live_prefix(session, list(started))
            outcomes, error = self._rewrap_each({t: started[t] for t in live})
            rows = _settle_rows(session, outcomes)
            settle_rewrapped_payouts(
                session, _payout_moves(outcomes), marks.payouts & outcomes.keys()
            )
            payouts = _pending_payouts(session, outcomes)
            _close_records(session, self.principal, outcomes, started)
        return _Settled(outcomes, rows, payouts, gone or error)

    def _reconcile_leftovers(self, settled: _Settled, marks: _Marks) -> None:
        """Rows and payout records this run did not move itself (an item that failed, a
        save that won the race, an item already current on a resumed run, one an
        interrupted run wrote but could not settle): Vault tells what they hold now.
        Every rewrap of these tenants was answered by now, so what is left marked with
        the rotation's own mark is what Vault holds."""
        for tenant in settled.outcomes:
            if tenant in settled.unsettled_rows:
                reconcile_tenant(self.engine, self.store, tenant)
                _release_marks(self.engine, tenant, marks.at)
            if tenant in settled.unsettled_payouts:
                marked = tenant in marks.payouts
                reconcile_payout(self.engine, self.store.vault, tenant_id=tenant, marked=marked)


@dataclass(frozen=True)
class _Settled:
    """The outcome of each tenant whose Vault work finished, the tenants with a row or a
    payout record left pending, and the first error of the batch."""

    outcomes: dict[str, Outcome]
    unsettled_rows: set[str]
    unsettled_payouts: set[str]
    error: Exception | None


def _live_prefix(session: Session, tenant_ids: Sequence[str]) -> tuple[list[str], NotFound | None]:
    """The tenants before the first one that is gone or being deleted, locked (shared)."""
    rows = session.exec(
        select(Tenant.id, Tenant.deleting_at)
        .where(col(Tenant.id).in_(tenant_ids))
        .with_for_update(read=True)
    )
    live = {tenant for tenant, deleting_at in rows if deleting_at is None}
    for index, tenant in enumerate(tenant_ids):
        if tenant not in live:
            return list(tenant_ids[:index]), NotFound("no such tenant")
    return list(tenant_ids), None


def _running(session: Session, tenant_ids: Sequence[str]) -> list[KeyRotation]:
    return list(
        session.exec(
            select(KeyRotation)
            .where(col(KeyRotation.tenant_id).in_(tenant_ids), KeyRotation.status == "running")
            .with_for_update()
        )
    )


def _payout_moves(outcomes: Mapping[str, Outcome]) -> dict[str, tuple[int, int]]:
    """Tenant -> (before, after) of each payout record the rewrap wrote."""
    moves = {tenant: outcome.moved(PAYOUT_ITEM) for tenant, outcome in outcomes.items()}
    return {tenant: (w.before, w.after) for tenant, w in moves.items() if w is not None}


def _pending_payouts(session: Session, outcomes: Mapping[str, Outcome]) -> set[str]:
    """The tenants whose payout record is still marked pending once the rewrap is settled:
    the rotation's mark on a record it did not move, a save's that raced it, or the mark
    of an interrupted run whose write landed (the record is current now, so not moved)."""
    pending = session.exec(
        select(PaymentProfile.tenant_id).where(
            col(PaymentProfile.tenant_id).in_(list(outcomes)),
            col(PaymentProfile.payout_sync_pending).is_(True),
        )
    )
    return set(pending)


def _settle_rows(session: Session, outcomes: Mapping[str, Outcome]) -> set[str]:
    """Move each row whose item the rewrap wrote to its new KV version and clear its mark.

    A rewrap changes the wrapping, not the secret, its public part or its age: only
    the version moves. A row whose version is not the one rewritten from belongs to a
    save that raced the rotation and is left to the reconcile. Returns the tenants
    with a row still pending.
    """
    rows = session.exec(
        select(IntegrationCredential)
        .where(col(IntegrationCredential.tenant_id).in_(list(outcomes)))
        .with_for_update()
    )
    unsettled: set[str] = set()
    for row in rows:
        step = outcomes[row.tenant_id].moved(item_name(row.provider))
        if step is not None and row.kv_version == step.before:
            row.kv_version = step.after
            row.vault_sync_pending = False
            row.pending_since = None
            session.add(row)
        elif row.vault_sync_pending:
            unsettled.add(row.tenant_id)
    return unsettled


def _close_records(
    session: Session,
    principal: Principal,
    outcomes: Mapping[str, Outcome],
    started: Mapping[str, _Started],
) -> None:
    """Mark each tenant's rotation done and audit it."""
    for rotation in _running(session, list(outcomes)):
        rotation.status = "done"
        rotation.rewrapped += len(outcomes[rotation.tenant_id].written)
        rotation.finished_at = utcnow()
        session.add(rotation)
    for tenant, outcome in outcomes.items():
        trail.record(
            session,
            action="tenant.key.rotate",
            resource=f"transit/keys/{key_name(tenant)}",
            outcome="success",
            principal=principal,
            tenant_id=tenant,
            detail={
                "key_version": started[tenant].target,
                "rewrapped": len(outcome.written),
                "resumed": started[tenant].resumed,
                "failed": list(outcome.failed),
            },
        )


def _release_marks(engine: Engine, tenant_id: str, mark: datetime) -> None:
    """Clear the rotation's own marks that reconciling left (no newer write marked them)."""
    with unit_of_work(engine) as session:
        session.exec(
            update(IntegrationCredential)
            .where(
                col(IntegrationCredential.tenant_id) == tenant_id,
                col(IntegrationCredential.vault_sync_pending).is_(True),
                col(IntegrationCredential.pending_since) == mark,
            )
            .values(vault_sync_pending=False, pending_since=None)
        )
