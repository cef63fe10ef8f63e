"""Tenant Transit keys: backfill, and rotation with rewrap (resumable).

Rotation:
1. rotate `tenant-<id>` (once; the target version is recorded in PostgreSQL,
   so a rerun after an interruption continues instead of rotating again);
2. rewrap every sealed item of the tenant to the target version in one batch
   call, and write each back to KV with check-and-set;
3. raise `min_decryption_version` to the target, so ciphertexts from before the
   rotation (older KV versions, backups) can no longer be decrypted.

Integration metadata rows are marked pending before the rewritten KV versions
land and reconciled from Vault afterwards, the same protocol the API's writes use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, Conflict, NotFound, UpstreamUnavailable
from broker.integrations.service import reconcile_tenant
from broker.models import IntegrationCredential, KeyRotation, Tenant, utcnow
from broker.payments.service import reconcile_payout
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import (
    SealedRecord,
    SealedStore,
    binding,
    ciphertext_key_version,
    key_name,
)


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
    store = SealedStore(vault)
    with unit_of_work(engine) as session:
        # Shared lock: a deletion racing this first step waits for its commit rather than
        # removing the tenant under the KeyRotation row about to be added (a foreign-key
        # violation, a 500); it then marks the tenant, and the next step answers 404.
        tenant = session.get(Tenant, tenant_id, with_for_update={"read": True})
        if tenant is None or tenant.deleting_at is not None:
            raise NotFound("no such tenant")
        running = session.exec(
            select(KeyRotation)
            .where(KeyRotation.tenant_id == tenant_id, KeyRotation.status == "running")
            .with_for_update()
        ).first()
        resumed = running is not None
        if running is None:
            target = vault.transit.rotate(key_name(tenant_id))
            running = KeyRotation(
                tenant_id=tenant_id,
                target_version=target,
                status="running",
                started_by=principal.actor,
            )
            session.add(running)
        target = running.target_version
        # Mark the metadata rows pending: their KV versions are about to move.
        for row in session.exec(
            select(IntegrationCredential).where(IntegrationCredential.tenant_id == tenant_id)
        ):
            row.vault_sync_pending = True
            row.pending_since = utcnow()
            session.add(row)

    with unit_of_work(engine) as session:
        # Held (shared) through the Vault work: a deletion, which locks the row
        # to mark it, waits for the rotation instead of shredding under it, and
        # a rotation never starts on a tenant whose deletion has begun.
        tenant = session.get(Tenant, tenant_id, with_for_update={"read": True})
        if tenant is None or tenant.deleting_at is not None:
            raise NotFound("no such tenant")
        rewrapped, current, failed = _rewrap_items(store, tenant_id, target)
        # Raised even when some items failed: those never decrypted anyway,
        # and every other ciphertext is on the new version now.
        vault.transit.set_min_decryption_version(key_name(tenant_id), target)

    reconcile_tenant(engine, store, tenant_id)
    # The payout record's KV version moved too; without this its next write
    # would fail check-and-set against a version only the rotation wrote.
    reconcile_payout(engine, vault, tenant_id=tenant_id)
    with unit_of_work(engine) as session:
        rotation = session.exec(
            select(KeyRotation)
            .where(KeyRotation.tenant_id == tenant_id, KeyRotation.status == "running")
            .with_for_update()
        ).first()
        if rotation is not None:
            rotation.status = "done"
            rotation.rewrapped += rewrapped
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
                "key_version": target,
                "rewrapped": rewrapped,
                "resumed": resumed,
                "failed": list(failed),
            },
        )
    return RotationReport(tenant_id, target, rewrapped, current, resumed, failed)


def _rewrap_items(
    store: SealedStore, tenant_id: str, target: int
) -> tuple[int, int, tuple[str, ...]]:
    """Rewrap every live item older than `target`: (rewrapped, already current, failed)."""
    stale = []
    current = 0
    failed: list[str] = []
    for item in store.items(tenant_id):
        record = store.read(tenant_id, item)
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
    done = 0
    for (item, record), ciphertext in rewrapped:
        try:
            store.write(
                tenant_id, item, ciphertext=ciphertext, public=record.public, cas=record.version
            )
        except Conflict:
            # Someone saved new credentials meanwhile: those are already sealed
            # with the newest key version, so there is nothing left to rewrap.
            current += 1
            continue
        done += 1
    return done, current, tuple(sorted(failed))


def _rewrap(
    store: SealedStore, tenant_id: str, stale: list[tuple[str, SealedRecord]]
) -> tuple[list[tuple[tuple[str, SealedRecord], str]], list[str]]:
    """Rewrap ciphertexts, in one batch call when all succeed, else one by one."""
    if not stale:
        return [], []
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
) -> list[RotationReport]:
    """Rotate several tenants (all by default), reporting each as it finishes."""
    if tenant_ids is None:
        tenant_ids = live_tenant_ids(engine)
    reports = []
    for tenant_id in tenant_ids:
        report = rotate_tenant_key(engine, vault, principal=principal, tenant_id=tenant_id)
        reports.append(report)
        if on_done is not None:
            on_done(report)
    return reports
