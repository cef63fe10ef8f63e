"""Tenant Transit keys: backfill, and rotation with rewrap (resumable).

Rotation:
1. rotate `tenant-<id>` (once; the target version is recorded in PostgreSQL,
   so a rerun after an interruption continues instead of rotating again);
2. rewrap every sealed item of the tenant to the target version in batch calls,
   and write each back to KV with check-and-set (several items at once);
3. raise `min_decryption_version` to the target once every item is written back,
   so ciphertexts from before the rotation (older KV versions, backups) can no
   longer be decrypted.

Integration metadata rows are marked pending before the rewritten KV versions
land, the same protocol the API's writes use; afterwards each row moves to the
version the rotation wrote (it knows it: check-and-set told it), and only rows it
did not move itself are reconciled from Vault. `rotate_all` runs several tenants
at a time: each tenant's steps hold only that tenant's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import TypeVar

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, Conflict, NotFound, UpstreamUnavailable
from broker.integrations.service import item_name, reconcile_tenant
from broker.models import IntegrationCredential, KeyRotation, Tenant, utcnow
from broker.payments.service import mark_payout_pending, reconcile_payout
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import (
    SealedRecord,
    SealedStore,
    binding,
    ciphertext_key_version,
    key_name,
)

# Items of one tenant read and written back at once, and ciphertexts per rewrap call.
ITEM_CONCURRENCY = 8
REWRAP_BATCH = 250

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class RotationReport:
    """What one tenant's rotation did."""

    tenant_id: str
    key_version: int
    rewrapped: int
    already_current: int
    resumed: bool
    # Items Vault would not rewrap (e.g. a ciphertext that never decrypted
    # under this tenant's binding): left as they were, named here for an operator.
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
    started = _begin(engine, vault, principal, tenant_id)
    outcome = _rewrap_and_finish(engine, SealedStore(vault), principal, tenant_id, started)
    return RotationReport(
        tenant_id,
        started.target,
        len(outcome.written),
        outcome.current,
        started.resumed,
        outcome.failed,
    )


@dataclass(frozen=True)
class _Started:
    """A rotation under way: its key version, whether a rerun resumed it, and whether it
    marked the payout record pending itself (its own marks to clear at the end)."""

    target: int
    resumed: bool
    # When this rotation marked the rows pending: a row still marked at that instant
    # carries the rotation's own mark, not another write's.
    mark: datetime
    payout_marked: bool


@dataclass(frozen=True)
class _Written:
    """One item moved from KV version `before` to `after` by the rewrap."""

    item: str
    before: int
    after: int


@dataclass(frozen=True)
class _Outcome:
    written: list[_Written]
    current: int
    failed: tuple[str, ...]


def _begin(engine: Engine, vault: VaultGateway, principal: Principal, tenant_id: str) -> _Started:
    """Rotate the key once and record the target, or find the run to resume.

    Committed before any KV write: the recorded target makes a rerun resume instead of
    rotating again, and the metadata rows are marked pending (their KV versions are
    about to move) so a crash mid-way leaves them for the reconcile job.
    """
    with unit_of_work(engine) as session:
        # Shared lock: a deletion racing this first step waits for its commit rather than
        # removing the tenant under the KeyRotation row about to be added (a foreign-key
        # violation, a 500); it then marks the tenant, and the next step answers 404.
        _live_tenant(session, tenant_id)
        running = _running(session, tenant_id)
        resumed = running is not None
        if running is None:
            running = KeyRotation(
                tenant_id=tenant_id,
                target_version=vault.transit.rotate(key_name(tenant_id)),
                status="running",
                started_by=principal.actor,
            )
            session.add(running)
        mark = utcnow()
        # A row another write marked already keeps that write's mark.
        session.exec(
            update(IntegrationCredential)
            .where(
                col(IntegrationCredential.tenant_id) == tenant_id,
                col(IntegrationCredential.vault_sync_pending).is_(False),
            )
            .values(vault_sync_pending=True, pending_since=mark)
        )
        # A rewrap of the payout record whose answer is lost may land later: marked, its
        # next write reconciles first instead of failing check-and-set (a false 409).
        payout_marked = mark_payout_pending(session, tenant_id)
        return _Started(running.target_version, resumed, mark, payout_marked)


def _live_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id, with_for_update={"read": True})
    if tenant is None or tenant.deleting_at is not None:
        raise NotFound("no such tenant")
    return tenant


def _running(session: Session, tenant_id: str) -> KeyRotation | None:
    return session.exec(
        select(KeyRotation)
        .where(KeyRotation.tenant_id == tenant_id, KeyRotation.status == "running")
        .with_for_update()
    ).first()


def _rewrap_and_finish(
    engine: Engine,
    store: SealedStore,
    principal: Principal,
    tenant_id: str,
    started: _Started,
) -> _Outcome:
    """Rewrap every item, retire the old key versions, settle the rows and close the
    rotation record, in one transaction holding the tenant's row.

    Held (shared) through the Vault work: a deletion, which locks the row to mark it,
    waits for the rotation instead of shredding under it, and a rotation never starts
    on a tenant whose deletion has begun. Should this die after some KV writes, the
    rows are still marked pending (step one) and the record still running: a rerun
    resumes, and the reconcile job settles the rows.
    """
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        outcome = _rewrap_items(store, tenant_id, started.target)
        # Only once every rewrapped item is written back, and even when some items
        # failed: those never decrypted anyway, every other ciphertext is on `target`.
        store.vault.transit.set_min_decryption_version(key_name(tenant_id), started.target)
        unsettled = _settle_rows(session, tenant_id, outcome.written)
        _close_record(session, principal, tenant_id, started, outcome)
    if unsettled:
        # Rows this run did not move itself (an item that failed, a save that won the
        # race): Vault tells what they hold now.
        reconcile_tenant(engine, store, tenant_id)
        # Every rewrap was answered: what the reconcile left marked with the rotation's
        # own mark (an item already current on a resumed run) is what Vault holds.
        _release_marks(engine, tenant_id, started.mark)
    # The payout record's KV version moved too; without this its next write would fail
    # check-and-set against a version only the rotation wrote. Every rewrap was answered
    # by now, so the rotation's own mark is cleared even where nothing moved.
    reconcile_payout(engine, store.vault, tenant_id=tenant_id, marked=started.payout_marked)
    return outcome


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


def _close_record(
    session: Session,
    principal: Principal,
    tenant_id: str,
    started: _Started,
    outcome: _Outcome,
) -> None:
    """Mark the rotation done and audit it."""
    rotation = _running(session, tenant_id)
    if rotation is not None:
        rotation.status = "done"
        rotation.rewrapped += len(outcome.written)
        rotation.finished_at = utcnow()
        session.add(rotation)
    trail.record(
        session,
        action="tenant.key.rotate",
        resource=f"transit/keys/{key_name(tenant_id)}",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={
            "key_version": started.target,
            "rewrapped": len(outcome.written),
            "resumed": started.resumed,
            "failed": list(outcome.failed),
        },
    )


def _settle_rows(session: Session, tenant_id: str, written: list[_Written]) -> bool:
    """Move each row whose item this run rewrote to its new KV version and clear its mark.

    A rewrap changes the wrapping, not the secret, its public part or its age: only
    the version moves. A row whose version is not the one rewritten from belongs to a
    save that raced the rotation and is left to the reconcile. True when some row
    stays pending.
    """
    moved = {w.item: w for w in written}
    rows = session.exec(
        select(IntegrationCredential)
        .where(IntegrationCredential.tenant_id == tenant_id)
        .with_for_update()
    )
    unsettled = False
    for row in rows:
        step = moved.get(item_name(row.provider))
        if step is not None and row.kv_version == step.before:
            row.kv_version = step.after
            row.vault_sync_pending = False
            row.pending_since = None
            session.add(row)
        elif row.vault_sync_pending:
            unsettled = True
    return unsettled


def _rewrap_items(store: SealedStore, tenant_id: str, target: int) -> _Outcome:
    """Rewrap every live item older than `target` and write it back with check-and-set."""
    records = _map(lambda item: (item, store.read(tenant_id, item)), store.items(tenant_id))
    stale: list[tuple[str, SealedRecord]] = []
    current = 0
    failed: list[str] = []
    for item, record in records:
        if record is None:
            continue
        try:
            version = ciphertext_key_version(record.ciphertext)
        except ValueError:
            failed.append(item)
            continue
        if version >= target:
            current += 1
        else:
            stale.append((item, record))
    rewrapped, unwrappable = _rewrap(store, tenant_id, stale)
    failed.extend(unwrappable)

    def write(entry: tuple[tuple[str, SealedRecord], str]) -> _Written | None:
        (item, record), ciphertext = entry
        try:
            after = store.write(
                tenant_id, item, ciphertext=ciphertext, public=record.public, cas=record.version
            )
        except Conflict:
            # Someone saved new credentials meanwhile: those are already sealed
            # with the newest key version, so there is nothing left to rewrap.
            return None
        return _Written(item, record.version, after)

    results = _map(write, rewrapped)
    written = [w for w in results if w is not None]
    current += len(results) - len(written)
    return _Outcome(written, current, tuple(sorted(failed)))


def _map(fn: Callable[[_In], _Out], entries: Sequence[_In]) -> list[_Out]:
    """`fn` over `entries`, several at a time when there are several (Vault round trips)."""
    if len(entries) <= 1:
        return [fn(entry) for entry in entries]
    with ThreadPoolExecutor(min(len(entries), ITEM_CONCURRENCY)) as pool:
        return list(pool.map(fn, entries))


def _rewrap(
    store: SealedStore, tenant_id: str, stale: list[tuple[str, SealedRecord]]
) -> tuple[list[tuple[tuple[str, SealedRecord], str]], list[str]]:
    """Rewrap ciphertexts in batch calls, one by one only within a batch that fails."""
    done: list[tuple[tuple[str, SealedRecord], str]] = []
    failed: list[str] = []
    for start in range(0, len(stale), REWRAP_BATCH):
        chunk_done, chunk_failed = _rewrap_batch(
            store, tenant_id, stale[start : start + REWRAP_BATCH]
        )
        done.extend(chunk_done)
        failed.extend(chunk_failed)
    return done, failed


def _rewrap_batch(
    store: SealedStore, tenant_id: str, stale: list[tuple[str, SealedRecord]]
) -> tuple[list[tuple[tuple[str, SealedRecord], str]], list[str]]:
    """One batch call when all succeed, else one by one to name the bad items."""
    key = key_name(tenant_id)
    try:
        # Each entry carries its own context; one bad entry fails the whole batch.
        fresh = store.vault.transit.rewrap(
            key, [(r.ciphertext, binding(tenant_id, item)) for item, r in stale]
        )
        return list(zip(stale, fresh, strict=True)), []
    except (UpstreamUnavailable, VaultMisconfigured):
        raise  # Vault or the broker's policy, not an item: stop here, resumable
    except BrokerError:
        pass
    done: list[tuple[tuple[str, SealedRecord], str]] = []
    failed: list[str] = []
    for item, record in stale:
        try:
            (ciphertext,) = store.vault.transit.rewrap(
                key, [(record.ciphertext, binding(tenant_id, item))]
            )
        except (UpstreamUnavailable, VaultMisconfigured):
            raise
        except BrokerError:
            failed.append(item)
            continue
        done.append(((item, record), ciphertext))
    return done, failed


def rotate_all(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_ids: Iterable[str] | None = None,
    on_done: Callable[[RotationReport], None] | None = None,
    workers: int = 1,
) -> list[RotationReport]:
    """Rotate several tenants (all by default), `workers` at a time, in the order they finish.

    `on_done` is called with each report from the calling thread. The first error
    stops the run: no further tenant starts, the ones under way finish, the error is
    raised; a rerun resumes where each tenant stood.
    """
    pending = iter(live_tenant_ids(engine) if tenant_ids is None else tenant_ids)

    def one(tenant_id: str) -> RotationReport:
        return rotate_tenant_key(engine, vault, principal=principal, tenant_id=tenant_id)

    reports: list[RotationReport] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        running = {pool.submit(one, t) for t in islice(pending, max(1, workers))}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                report = future.result()
                reports.append(report)
                if on_done is not None:
                    on_done(report)
                running.update(pool.submit(one, t) for t in islice(pending, 1))
    return reports
