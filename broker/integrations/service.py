"""Integration credentials: validate, test, seal in Vault, record metadata in PostgreSQL.

Write ordering (save, delete, restore, rewrap), chosen so PostgreSQL and Vault
never disagree in a way anyone can observe:

1. Everything that can fail without side effects runs first: field validation,
   the live connection test, and the Transit encryption.
2. T1 (PostgreSQL, committed): the metadata row is created if missing and
   marked `vault_sync_pending`. So a secret can never exist in Vault without a
   row describing it.
3. Vault: one KV v2 write with check-and-set against the version the row
   records. A concurrent writer makes this fail with 409; nothing is
   overwritten silently.
4. T2 (PostgreSQL, committed): the row takes the new version, hints and
   identifiers, and the pending mark is cleared, in one transaction with the
   audit event and `integrations_status`.

If step 3 fails (Vault sealed or gone) the caller gets 503, Vault holds
nothing new, and the pending mark is cleared by reconciling with Vault (now,
or by the next reader if Vault is still down). If step 4 fails after Vault
accepted the write, the row stays pending; the KV data carries the same public
hints, so the next reader rebuilds the row from Vault. Hints are therefore only
ever shown for a version Vault really holds.

This is why these functions take the engine rather than one session: the
write needs two commits around the Vault call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, NotFound, PreconditionFailed, ValidationFailed
from broker.integrations.egress import EgressClient
from broker.integrations.providers import (
    PROVIDERS,
    ConnectionResult,
    Credentials,
    ProviderEndpoints,
    ProviderSpec,
    get_provider,
)
from broker.models import IntegrationCredential, Tenant, TenantSettings, utcnow
from broker.settings.schemas import validate_group
from broker.vault.errors import VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedRecord, SealedStore

log = logging.getLogger(__name__)


def item_name(provider: str) -> str:
    """The sealed item of a provider's credentials."""
    return f"integrations/{provider}"


def etag(row: IntegrationCredential | None) -> str:
    """The ETag of one provider's credentials: the KV version they describe."""
    return f'"{row.kv_version if row else 0}"'


@dataclass(frozen=True)
class Outbound:
    """How connection tests reach providers: the guarded client and the base URLs."""

    client: EgressClient
    endpoints: ProviderEndpoints


# -- reads ----------------------------------------------------------------------------


def list_integrations(
    engine: Engine, vault: VaultGateway, *, tenant_id: str
) -> list[tuple[ProviderSpec, IntegrationCredential | None]]:
    """Every provider with its metadata row (None when never configured).

    Rows left pending by an interrupted write are reconciled with Vault first;
    if Vault is down they are returned as they are, flagged pending.
    """
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        rows = {
            row.provider: row
            for row in session.exec(
                select(IntegrationCredential).where(IntegrationCredential.tenant_id == tenant_id)
            )
        }
    if any(row.vault_sync_pending for row in rows.values()):
        store = SealedStore(vault)
        for provider, row in rows.items():
            if row.vault_sync_pending:
                rows[provider] = _try_reconcile(engine, store, tenant_id, provider) or row
    return [(spec, rows.get(name)) for name, spec in PROVIDERS.items()]


def read_credentials(
    vault: VaultGateway, *, tenant_id: str, provider: str, version: int | None = None
) -> tuple[Credentials, int]:
    """Decrypt a provider's stored credentials (Vault only; no database)."""
    store = SealedStore(vault)
    record = store.read(tenant_id, item_name(provider), version=version)
    if record is None:
        raise NotFound("this integration is not configured")
    return _open(store, tenant_id, provider, record), record.version


def versions(vault: VaultGateway, *, tenant_id: str, provider: str) -> list[dict[str, Any]]:
    """The KV versions kept for a provider (timestamps only)."""
    get_provider(provider)
    return SealedStore(vault).versions(tenant_id, item_name(provider))


# -- writes ---------------------------------------------------------------------------


def save_credentials(
    engine: Engine,
    vault: VaultGateway,
    outbound: Outbound,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    fields: Mapping[str, object],
    if_match: str | None,
    skip_connection_test: bool,
) -> IntegrationCredential:
    """Validate, live-test (unless explicitly skipped), seal and store credentials."""
    spec = get_provider(provider)
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
    creds = spec.validate(fields)
    result: ConnectionResult | None = None
    if skip_connection_test:
        # No call now, but the SDK will send these credentials to the stored URL: it
        # passes the connection test's own egress check all the same.
        spec.check_target(outbound.client, outbound.endpoints, creds)
    else:
        result = spec.connection_test(outbound.client, outbound.endpoints, creds)
        if not result.ok:
            _record_test(engine, principal, tenant_id, provider, result, stored=False)
            raise ValidationFailed(
                f"connection test failed: {result.reason}; nothing was stored",
                connection_test={"code": result.code, "reason": result.reason},
            )
    store = SealedStore(vault)
    ciphertext = store.seal(tenant_id, item_name(provider), creds.secret_values())
    public = {
        "hints": _secret_hints(spec, creds),
        "identifiers": creds.identifiers(),
        "updated_by": principal.actor,
        "connection_test": "skipped" if skip_connection_test else "passed",
    }
    return _write(
        engine,
        store,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action="integration.save",
        ciphertext=ciphertext,
        public=public,
        test=result,
        skipped=skip_connection_test,
    )


def restore_version(
    engine: Engine,
    vault: VaultGateway,
    outbound: Outbound,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    version: int,
    if_match: str | None,
) -> IntegrationCredential:
    """Make an earlier KV version current again (as a new version)."""
    spec = get_provider(provider)
    store = SealedStore(vault)
    record = store.read(tenant_id, item_name(provider), version=version)
    if record is None:
        raise NotFound("no such version (it may have been deleted or destroyed)")
    creds = _open(store, tenant_id, provider, record)
    # The old version's URL is written again: it passes today's egress check, as a save
    # would (it may predate the check, or its host may resolve elsewhere now).
    spec.check_target(outbound.client, outbound.endpoints, creds)
    # Re-seal with the newest key version: the old ciphertext may predate a rotation.
    ciphertext = store.seal(tenant_id, item_name(provider), creds.secret_values())
    public = {**record.public, "updated_by": principal.actor, "restored_from": version}
    return _write(
        engine,
        store,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action="integration.restore",
        ciphertext=ciphertext,
        public=public,
        test=None,
        skipped=record.public.get("connection_test") == "skipped",
    )


def delete_credentials(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    if_match: str | None,
) -> None:
    """Remove the current credentials. Earlier KV versions stay restorable."""
    get_provider(provider)
    store = SealedStore(vault)
    _, token = _begin(
        engine, store, tenant_id=tenant_id, provider=provider, if_match=if_match, create=False
    )
    try:
        store.soft_delete(tenant_id, item_name(provider))
    except BrokerError:
        _try_reconcile(engine, store, tenant_id, provider)
        raise
    with unit_of_work(engine) as session:
        row = _locked_row(session, tenant_id, provider)
        assert row is not None
        row.configured = False
        row.hints = {}
        row.identifiers = {}
        row.updated_at = utcnow()
        row.updated_by = principal.actor
        _clear_pending(row, token)
        session.add(row)
        _update_status(session, row)
        trail.record(
            session,
            action="integration.delete",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"kv_version": row.kv_version},
        )


def run_connection_test(
    engine: Engine,
    vault: VaultGateway,
    outbound: Outbound,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    fields: Mapping[str, object] | None,
) -> ConnectionResult:
    """Test the credentials in the body, or the stored ones, and record the result."""
    spec = get_provider(provider)
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
    if fields is not None:
        creds = spec.validate(fields)
    else:
        creds, _ = read_credentials(vault, tenant_id=tenant_id, provider=provider)
    result = spec.connection_test(outbound.client, outbound.endpoints, creds)
    _record_test(engine, principal, tenant_id, provider, result, stored=fields is None)
    return result


# -- the write protocol ---------------------------------------------------------------


def _write(
    engine: Engine,
    store: SealedStore,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    if_match: str | None,
    action: str,
    ciphertext: str,
    public: dict[str, Any],
    test: ConnectionResult | None,
    skipped: bool,
) -> IntegrationCredential:
    cas, token = _begin(engine, store, tenant_id=tenant_id, provider=provider, if_match=if_match)
    try:
        version = store.write(
            tenant_id, item_name(provider), ciphertext=ciphertext, public=public, cas=cas
        )
    except BrokerError:
        _try_reconcile(engine, store, tenant_id, provider)
        raise
    with unit_of_work(engine) as session:
        row = _locked_row(session, tenant_id, provider)
        assert row is not None
        # A later writer may have finished first; never move the row backwards.
        if version >= row.kv_version:
            row.kv_version = version
            row.configured = True
            row.hints = dict(public.get("hints") or {})
            row.identifiers = dict(public.get("identifiers") or {})
            row.updated_at = utcnow()
            row.updated_by = principal.actor
            row.connection_test_skipped = skipped
            if test is not None:
                _apply_test(row, test)
        _clear_pending(row, token)
        session.add(row)
        _update_status(session, row)
        trail.record(
            session,
            action=action,
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={
                "kv_version": version,
                "connection_test": "skipped" if skipped else ("passed" if test else "none"),
                **({"restored_from": public["restored_from"]} if "restored_from" in public else {}),
            },
        )
        return row


def _begin(
    engine: Engine,
    store: SealedStore,
    *,
    tenant_id: str,
    provider: str,
    if_match: str | None,
    create: bool = True,
) -> tuple[int, datetime]:
    """T1: lock (or create) the row, check If-Match, mark it pending.

    Returns the CAS version and this writer's pending token (the mark's
    timestamp): only the writer whose mark is still on the row clears it, so a
    concurrent writer still in flight keeps the row pending until it finishes.
    """
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        if create:
            # Concurrent first saves race to create the row; let PostgreSQL pick one.
            session.execute(
                pg_insert(IntegrationCredential)
                .values(
                    tenant_id=tenant_id,
                    provider=provider,
                    configured=False,
                    kv_version=0,
                    hints={},
                    identifiers={},
                    updated_at=utcnow(),
                    connection_test_skipped=False,
                    vault_sync_pending=False,
                )
                .on_conflict_do_nothing()
            )
        row = _locked_row(session, tenant_id, provider)
        if row is None:
            raise NotFound("this integration is not configured")
        if row.vault_sync_pending:
            _reconcile(row, store)
        if not create and not row.configured:
            raise NotFound("this integration is not configured")
        if if_match is not None and if_match.strip() not in ("*", etag(row)):
            raise PreconditionFailed("the credentials changed since they were read; reload")
        row.vault_sync_pending = True
        row.pending_since = utcnow()
        session.add(row)
        return row.kv_version, row.pending_since


def _clear_pending(row: IntegrationCredential, token: datetime) -> None:
    if row.pending_since == token:
        row.vault_sync_pending = False
        row.pending_since = None


def _try_reconcile(
    engine: Engine, store: SealedStore, tenant_id: str, provider: str
) -> IntegrationCredential | None:
    """Best effort: make the row match Vault now; leave it pending if Vault is down."""
    try:
        with unit_of_work(engine) as session:
            row = _locked_row(session, tenant_id, provider)
            if row is not None and row.vault_sync_pending:
                _reconcile(row, store)
                session.add(row)
            return row
    except VaultUnavailable:
        return None
    except BrokerError:
        log.warning("could not reconcile integration metadata with Vault")
        return None


def _reconcile(row: IntegrationCredential, store: SealedStore) -> None:
    """Rebuild a pending row from Vault, which is the source of truth for versions."""
    version, live = store.current_version(row.tenant_id, item_name(row.provider))
    if live and version != row.kv_version:
        record = store.read(row.tenant_id, item_name(row.provider))
        if record is not None:
            row.hints = dict(record.public.get("hints") or {})
            row.identifiers = dict(record.public.get("identifiers") or {})
            row.updated_by = record.public.get("updated_by")
            row.connection_test_skipped = record.public.get("connection_test") == "skipped"
            row.updated_at = utcnow()
    elif not live:
        row.hints, row.identifiers = {}, {}
    row.kv_version = version
    row.configured = live
    row.vault_sync_pending = False
    row.pending_since = None


def _record_test(
    engine: Engine,
    principal: Principal,
    tenant_id: str,
    provider: str,
    result: ConnectionResult,
    *,
    stored: bool,
) -> None:
    with unit_of_work(engine) as session:
        if stored:
            row = _locked_row(session, tenant_id, provider)
            if row is not None:
                _apply_test(row, result)
                session.add(row)
                _update_status(session, row)
        trail.record(
            session,
            action="integration.test",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="success" if result.ok else "failed",
            principal=principal,
            tenant_id=tenant_id,
            detail={"credentials": "stored" if stored else "candidate", "code": result.code},
        )


def _apply_test(row: IntegrationCredential, result: ConnectionResult) -> None:
    row.last_test_at = utcnow()
    row.last_test_ok = result.ok
    row.last_test_code = result.code
    row.last_test_reason = result.reason[:300]


def _update_status(session: Session, row: IntegrationCredential) -> None:
    """Feed `integrations_status` in the tenant's settings from the metadata row."""
    settings = session.exec(
        select(TenantSettings).where(TenantSettings.tenant_id == row.tenant_id).with_for_update()
    ).first()
    if settings is None:
        return
    status = dict(settings.integrations_status or {})
    entry = dict(status.get(row.provider) or {})
    entry.update(
        enabled=row.configured,
        last_test_at=row.last_test_at.isoformat() if row.last_test_at else None,
        last_test_ok=row.last_test_ok,
        last_test_reason=row.last_test_reason,
    )
    status[row.provider] = entry
    validated = validate_group("integrations_status", status)
    if validated != settings.integrations_status:
        settings.integrations_status = validated
        settings.version += 1
        settings.updated_at = utcnow()
        session.add(settings)


def _locked_row(session: Session, tenant_id: str, provider: str) -> IntegrationCredential | None:
    return session.exec(
        select(IntegrationCredential)
        .where(IntegrationCredential.tenant_id == tenant_id)
        .where(IntegrationCredential.provider == provider)
        .with_for_update()
    ).first()


def _live_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None or tenant.deleting_at is not None:
        raise NotFound("no such tenant")
    return tenant


def _open(store: SealedStore, tenant_id: str, provider: str, record: SealedRecord) -> Credentials:
    secrets = store.unseal(tenant_id, item_name(provider), record.ciphertext)
    identifiers = {str(k): str(v) for k, v in (record.public.get("identifiers") or {}).items()}
    return Credentials(provider, {**identifiers, **secrets})


def _secret_hints(spec: ProviderSpec, creds: Credentials) -> dict[str, str]:
    secret_names = {f.name for f in spec.fields if f.secret}
    return {name: hint for name, hint in spec.hints(creds).items() if name in secret_names}


def reconcile_tenant(engine: Engine, store: SealedStore, tenant_id: str) -> int:
    """Reconcile every pending row of a tenant with Vault; returns how many were pending."""
    with unit_of_work(engine) as session:
        providers = list(
            session.exec(
                select(IntegrationCredential.provider).where(
                    IntegrationCredential.tenant_id == tenant_id,
                    IntegrationCredential.vault_sync_pending == True,  # noqa: E712
                )
            )
        )
    for provider in providers:
        _try_reconcile(engine, store, tenant_id, provider)
    return len(providers)
