"""Tenant lifecycle: create (with default settings) and look up."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, Conflict, NotFound
from broker.events import outbox, webhooks
from broker.models import Tenant, utcnow
from broker.settings.service import default_settings_row
from broker.tenants.deletions import DeletionWatch
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, key_name


def create_tenant(
    session: Session, vault: VaultGateway, *, principal: Principal, tenant_id: str, name: str
) -> Tenant:
    """Create a tenant, its settings row with every group at its default, and its Transit key.

    This replaces the seed's post-save signal: both rows are written in the same
    transaction, and the key is created before that transaction commits. If
    Vault is down the request fails with 503 and nothing is kept; a key left by
    a failed commit is simply reused when the tenant is created again.
    """
    (tenant,) = add_tenants(session, principal=principal, names={tenant_id: name})
    SealedStore(vault).ensure_tenant_key(tenant_id)
    return tenant


def add_tenants(
    session: Session, *, principal: Principal, names: Mapping[str, str]
) -> list[Tenant]:
    """`create_tenant`'s rows for many tenants at once (tenant id -> name), keys aside.

    The tenants, their settings rows and their trail events, in the session's
    transaction; Conflict when any of them exists. The caller creates each
    tenant's Transit key before that transaction commits, as `create_tenant` does.
    """
    ids = list(names)
    taken = session.exec(select(Tenant.id).where(col(Tenant.id).in_(ids))).first()
    if taken is not None:
        raise Conflict(f"tenant {taken!r} already exists")
    tenants = [Tenant(id=i, name=names[i], created_by=principal.actor) for i in ids]
    session.add_all(tenants)
    try:
        session.flush()
    except IntegrityError:  # created concurrently, since the check above
        raise Conflict(
            f"tenant {ids[0]!r} already exists"
            if len(ids) == 1
            else "some of these tenants already exist"
        ) from None
    for tenant_id in ids:
        session.add(default_settings_row(tenant_id, updated_by=principal.actor))
        trail.record(
            session,
            action="tenant.create",
            resource=f"tenants/{tenant_id}",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
        )
    return tenants


def delete_tenant(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str,
    deletions: DeletionWatch | None = None,
    before_shred: Callable[[], object] | None = None,
) -> int:
    """Crypto-shred a tenant: its Vault data and Transit key first, then its rows.

    The tenant is marked as being deleted (committed) before Vault is touched,
    so it accepts no new secrets meanwhile, and a failed deletion can simply be
    retried. Delivery stops before anything is destroyed: this process stops
    serving the tenant at once, and the first Vault step retires every version
    of its key, so Vault refuses its ciphertexts to every replica (see
    `broker.tenants.deletions`). Vault goes first because a row without secrets
    is harmless, while secrets without a row would be orphans nobody knows to
    delete. Returns the number of Vault items destroyed.

    `before_shred` runs once delivery has stopped and while the secrets still open:
    revoking the dynamic keys minted from them, which nothing could revoke afterwards.
    If it raises, nothing is destroyed and the deletion can be retried.
    """
    _mark_deleting(engine, tenant_id)
    if deletions is not None:
        deletions.mark(tenant_id)
    if before_shred is not None:
        before_shred()
    retire_key(vault, tenant_id=tenant_id)
    destroyed = SealedStore(vault).shred(tenant_id)
    endpoints = _remove_rows(engine, principal, tenant_id, destroyed)
    # The tenant's endpoints went with its row; their signing secrets go now.
    webhooks.forget_secrets(vault, endpoints)
    if deletions is not None:
        deletions.forget(tenant_id)
    return destroyed


def _mark_deleting(engine: Engine, tenant_id: str) -> None:
    """Mark the tenant as being deleted (committed): it accepts no new secrets."""
    with unit_of_work(engine) as session:
        tenant = session.get(Tenant, tenant_id, with_for_update=True)
        if tenant is None:
            raise NotFound("no such tenant")
        if tenant.deleting_at is None:
            tenant.deleting_at = utcnow()
            session.add(tenant)


def _remove_rows(engine: Engine, principal: Principal, tenant_id: str, destroyed: int) -> list[str]:
    """Delete the tenant's row (its other rows cascade), audit and announce it; returns
    the ids of the webhook endpoints that went with it."""
    with unit_of_work(engine) as session:
        # Locked: a concurrent deletion of the same tenant may be deleting the row too.
        tenant = session.get(Tenant, tenant_id, with_for_update=True)
        endpoints = webhooks.endpoint_ids(session, tenant_id=tenant_id)
        if tenant is not None:
            session.delete(tenant)
        trail.record(
            session,
            action="tenant.delete",
            resource=f"tenants/{tenant_id}",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"vault_items_destroyed": destroyed, "transit_key": "deleted"},
        )
        if tenant is not None:
            outbox.emit(
                session,
                outbox.TENANT_DELETED,
                actor=principal.actor,
                tenant_id=tenant_id,
                state="deleted",
            )
    return endpoints


def retire_key(vault: VaultGateway, *, tenant_id: str) -> None:
    """Make every ciphertext of the tenant undecryptable now, before anything is destroyed.

    Transit cannot disable a key, but a fresh version that is also the minimum
    for decryption leaves every existing ciphertext (all older) refused by
    Vault itself. A tenant without a key has nothing left to refuse.
    """
    key = key_name(tenant_id)
    if vault.transit.key_info(key) is None:
        return
    try:
        latest = vault.transit.rotate(key)
        vault.transit.set_min_decryption_version(key, latest)
    except BrokerError:
        # A concurrent deletion of the same tenant may have deleted the key meanwhile.
        if vault.transit.key_info(key) is None:
            return
        raise


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    """One tenant, or NotFound."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None or tenant.deleting_at is not None:
        raise NotFound("no such tenant")
    return tenant


def require_live(engine: Engine, *, tenant_id: str) -> None:
    """NotFound unless the tenant exists and is not being deleted (for Vault-only routes)."""
    with unit_of_work(engine) as session:
        get_tenant(session, tenant_id=tenant_id)


def list_tenants(session: Session, *, limit: int = 100, after: str | None = None) -> list[Tenant]:
    """Tenants ordered by id, paged by the last id seen."""
    query = select(Tenant).order_by(Tenant.id).limit(limit)
    if after:
        query = query.where(Tenant.id > after)
    return list(session.exec(query))
