"""Tenant lifecycle: create (with default settings) and look up."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.errors import Conflict, NotFound
from broker.models import Tenant, TenantSettings
from broker.settings.service import default_settings_row


def create_tenant(session: Session, *, principal: Principal, tenant_id: str, name: str) -> Tenant:
    """Create a tenant and its settings row with every group at its default.

    This replaces the seed's post-save signal: the two rows are written in the
    same transaction, so a tenant never exists without settings.
    """
    if session.get(Tenant, tenant_id) is not None:
        raise Conflict(f"tenant {tenant_id!r} already exists")
    tenant = Tenant(id=tenant_id, name=name, created_by=principal.actor)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"tenant {tenant_id!r} already exists") from None
    session.add(default_settings_row(tenant_id, updated_by=principal.actor))
    trail.record(
        session,
        action="tenant.create",
        resource=f"tenants/{tenant_id}",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
    )
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    """One tenant, or NotFound."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("no such tenant")
    return tenant


def list_tenants(session: Session, *, limit: int = 100, after: str | None = None) -> list[Tenant]:
    """Tenants ordered by id, paged by the last id seen."""
    query = select(Tenant).order_by(Tenant.id).limit(limit)
    if after:
        query = query.where(Tenant.id > after)
    return list(session.exec(query))


def ensure_settings(session: Session, *, tenant_id: str) -> TenantSettings:
    """The tenant's settings row, created with defaults if an old tenant lacks one."""
    row = session.get(TenantSettings, tenant_id)
    if row is None:
        row = default_settings_row(tenant_id, updated_by="system")
        session.add(row)
        session.flush()
    return row
