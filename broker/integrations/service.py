"""Integration credentials: validate, test, seal in Vault, record metadata in PostgreSQL.

Write ordering (save, delete, restore), chosen so PostgreSQL never claims a
state Vault does not hold:

1. Everything that can fail without side effects runs first: field validation,
   the live connection test, and the Transit encryption.
2. T1 (PostgreSQL, committed): the metadata row is created if missing and
   marked `vault_sync_pending`. So a secret can never exist in Vault without a
   row describing it.
3. Vault: one KV v2 write with check-and-set against the version the row
   records (a delete names that exact version). A concurrent writer makes it
   fail with 409; nothing is overwritten silently.
4. T2 (PostgreSQL, committed): the row takes the new version, hints and
   identifiers and the pending mark is cleared, in one transaction with the
   audit event and `integrations_status`.

What each outcome of step 3 leaves behind:
- accepted: step 4 runs. If it fails, the row stays pending and the next
  reader rebuilds it from Vault, whose KV data carries the same (sealed,
  verified) hints.
- refused (sealed, rate limited, nothing listening): Vault holds nothing new;
  the caller's own mark is cleared and the caller gets 503.
- unknown (sent, never answered: a slow raft commit, a paused process): the
  write may still land. The row keeps its pending mark, and is rebuilt from
  Vault once KV shows a version or deletion the row does not know. Until then
  readers see the last version Vault is known to hold, flagged pending. The
  caller gets 503 and may send the same request again: a retry whose content
  Vault already holds succeeds without writing twice, and one that arrives
  first makes the lost write fail check-and-set for good.

Because check-and-set only accepts a write based on KV's current version, a
write based on an older version can never land later; that is what makes the
"unknown" state end.

Every response describes the caller's own write (its version, hints and
ETag), never a concurrent writer's.

This is why these functions take the engine rather than one session: the
write needs two commits around the Vault call.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar

import anyio
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import context
from broker.core.context import RequestContext
from broker.core.db import unit_of_work
from broker.core.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PreconditionFailed,
    ValidationFailed,
)
from broker.events import outbox
from broker.integrations.dynamic import dynamic_spec
from broker.integrations.egress import EgressClient
from broker.integrations.providers import (
    PROVIDERS,
    ConnectionResult,
    Credentials,
    ProviderEndpoints,
    ProviderSpec,
    get_provider,
)
from broker.models import AuditEvent, IntegrationCredential, Tenant, TenantSettings, utcnow
from broker.settings.schemas import validate_group
from broker.settings.service import lock_settings
from broker.vault.errors import StoredDataUnverified, VaultUnavailable, WriteOutcomeUnknown
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedRecord, SealedStore

log = logging.getLogger(__name__)


def item_name(provider: str) -> str:
    """The sealed item of a provider's credentials."""
    return f"integrations/{provider}"


def etag(row: IntegrationCredential | None) -> str:
    """The ETag of one provider's credentials: the KV version they describe."""
    return etag_of(row.kv_version if row else 0)


def etag_of(version: int) -> str:
    """The ETag of a KV version."""
    return f'"{version}"'


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
    return open_credentials(store, tenant_id, provider, record), record.version


async def read_credentials_on_loop(
    vault: VaultGateway, *, tenant_id: str, provider: str, threads: anyio.CapacityLimiter
) -> tuple[Credentials, int]:
    """`read_credentials` (the latest version), its Vault calls on the event loop when they
    can be (`VaultGateway.call_on_loop`; the rest on `threads`)."""
    store, item = SealedStore(vault), item_name(provider)
    record = await store.read_on_loop(tenant_id, item, threads=threads)
    if record is None:
        raise NotFound("this integration is not configured")
    secrets = await store.open_on_loop(tenant_id, item, record, threads=threads)
    return credentials_of(provider, record, secrets), record.version


def read_sealed(
    vault: VaultGateway, *, tenant_id: str, provider: str
) -> tuple[SealedRecord, dict[str, str]]:
    """The current record and its opened secrets, whatever its kind (Vault only)."""
    store = SealedStore(vault)
    record = store.read(tenant_id, item_name(provider))
    if record is None:
        raise NotFound("this integration is not configured")
    return record, store.open(tenant_id, item_name(provider), record)


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
        delivery = _delivery_mode(session, tenant_id, provider)
    creds = _validated(spec, fields, delivery)
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
    return _write(
        engine,
        SealedStore(vault),
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action="integration.save",
        content=_Content(creds.secret_values(), creds.identifiers()),
        public=_saved_public(spec, creds, principal, delivery, skipped=skip_connection_test),
        test=result,
        skipped=skip_connection_test,
    )


def _validated(spec: ProviderSpec, fields: Mapping[str, object], delivery: str) -> Credentials:
    """The fields as credentials, which in dynamic delivery must be able to mint keys."""
    creds = spec.validate(fields)
    if delivery == "dynamic":
        _check_root(spec.name, creds)
    return creds


def _saved_public(
    spec: ProviderSpec, creds: Credentials, principal: Principal, delivery: str, *, skipped: bool
) -> dict[str, Any]:
    """The public part a save stores beside (and seals with) the secrets."""
    return {
        "hints": _secret_hints(spec, creds),
        "identifiers": creds.identifiers(),
        "updated_by": principal.actor,
        "connection_test": "skipped" if skipped else "passed",
        **({"delivery": "dynamic"} if delivery == "dynamic" else {}),
    }


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
    if record.public.get("kind") == "oauth":
        # Its refresh token was rotated away or will be: restoring it would store a dead grant.
        raise ValidationFailed("an OAuth connection cannot be restored; connect the account again")
    creds = open_credentials(store, tenant_id, provider, record)
    with unit_of_work(engine) as session:
        delivery = _delivery_mode(session, tenant_id, provider)
    if delivery == "dynamic":
        # A version saved before the switch must not bring static delivery back with it.
        _check_root(provider, creds)
    # The old version's URL is written again: it passes today's egress check, as a save
    # would (it may predate the check, or its host may resolve elsewhere now).
    spec.check_target(outbound.client, outbound.endpoints, creds)
    public = {**record.public, "updated_by": principal.actor, "restored_from": version}
    public.pop("delivery", None)
    if delivery == "dynamic":
        public["delivery"] = "dynamic"
    return _write(
        engine,
        store,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action="integration.restore",
        content=_Content(creds.secret_values(), creds.identifiers()),
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
    begun = _begin(
        engine, store, tenant_id=tenant_id, provider=provider, if_match=if_match, create=False
    )
    resource = f"tenants/{tenant_id}/integrations/{provider}"
    if begun.done is not None:
        _record_applied(engine, principal, tenant_id, "integration.delete", resource, begun.cas)
        return
    try:
        # That exact version: a delete answered late must not remove a newer save.
        store.delete_version(tenant_id, item_name(provider), begun.cas)
    except WriteOutcomeUnknown:
        _keep_pending(engine, tenant_id, provider, begun)
        raise
    except BrokerError:
        _abandon(engine, store, tenant_id, provider, begun)
        raise
    with unit_of_work(engine) as session:
        row = _locked_row(session, tenant_id, provider)
        if row is None:  # the tenant was deleted meanwhile, and its rows with it
            raise NotFound("no such tenant")
        if row.kv_version == begun.cas:
            _describe_deleted(row, principal.actor)
        session.add(row)
        _update_status(session, row)
        trail.record(
            session,
            action="integration.delete",
            resource=resource,
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"kv_version": begun.cas},
        )
        outbox.emit(
            session,
            outbox.CREDENTIAL_DELETED,
            actor=principal.actor,
            tenant_id=tenant_id,
            provider=provider,
            version=begun.cas,
            state="deleted",
        )


def _delivery_mode(session: Session, tenant_id: str, provider: str) -> DeliveryMode:
    """How the provider's credentials are handed out now ("static" before the first save)."""
    return _delivery_of(session.get(IntegrationCredential, (tenant_id, provider)))


def _delivery_of(row: IntegrationCredential | None) -> DeliveryMode:
    return "dynamic" if row is not None and row.delivery_mode == "dynamic" else "static"


def _describe_deleted(row: IntegrationCredential, actor: str) -> None:
    """The row of credentials just deleted in Vault: nothing configured, nothing pending."""
    row.configured = False
    row.hints = {}
    row.identifiers = {}
    row.token_expires_at = None
    row.updated_at = utcnow()
    row.updated_by = actor
    _settle(row)


DeliveryMode = Literal["static", "dynamic"]


def set_delivery(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    mode: DeliveryMode,
    if_match: str | None,
) -> IntegrationCredential:
    """Choose how services receive a provider's credentials: as stored, or minted per lease.

    The mode is sealed with the credentials (a new KV version with the same secrets),
    so a fetch reads it together with them from Vault: no replica, cache or database
    outage can hand out the root credential of a provider in dynamic delivery.
    """
    get_provider(provider)
    store = SealedStore(vault)
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
    record = store.read(tenant_id, item_name(provider))
    if record is None:
        raise NotFound("this integration is not configured")
    if mode == "dynamic":
        if record.public.get("kind") == "oauth":
            raise ValidationFailed("an OAuth connection cannot be delivered as dynamic keys")
        creds = open_credentials(store, tenant_id, provider, record)
        _check_root(provider, creds)
    else:
        creds = open_credentials(store, tenant_id, provider, record)
    if (record.public.get("delivery") or "static") == mode:
        with unit_of_work(engine) as session:
            row = session.get(IntegrationCredential, (tenant_id, provider))
            if row is None:
                raise NotFound("this integration is not configured")
            return _view(row)
    public = {k: v for k, v in record.public.items() if k != "delivery"}
    if mode == "dynamic":
        public["delivery"] = "dynamic"
    public["updated_by"] = principal.actor
    return _write(
        engine,
        store,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action=f"integration.delivery:{mode}",
        content=_Content(creds.secret_values(), creds.identifiers()),
        public=public,
        test=None,
        skipped=record.public.get("connection_test") == "skipped",
    )


def _check_root(provider: str, creds: Credentials) -> None:
    """ValidationFailed unless `creds` can mint this provider's dynamic keys."""
    dynamic = dynamic_spec(provider)
    if dynamic is None:
        raise ValidationFailed(
            f"{get_provider(provider).title} keys cannot be minted per lease; only Twilio "
            "and OpenAI have dynamic delivery"
        )
    problem = dynamic.check(creds)
    if problem is not None:
        raise ValidationFailed(f"dynamic delivery: {problem}")


def store_token_set(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    secrets: dict[str, str],
    identifiers: dict[str, str],
    public: dict[str, Any],
    action: str,
    if_match: str | None,
    test: ConnectionResult | None,
) -> IntegrationCredential:
    """Store an OAuth token set through the same write protocol as any credential."""
    get_provider(provider)
    return _write(
        engine,
        SealedStore(vault),
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        if_match=if_match,
        action=action,
        content=_Content(dict(secrets), dict(identifiers)),
        public=public,
        test=test,
        skipped=False,
    )


def mark_needs_reconnect(
    engine: Engine,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    reason: str = "invalid_grant",
) -> None:
    """The provider refused the stored grant: say so in the row, the status and the trail."""
    with unit_of_work(engine) as session:
        row = _locked_row(session, tenant_id, provider)
        if row is None:
            return
        if not row.needs_reconnect:
            row.needs_reconnect = True
            row.health_state = "needs_reconnect"
            row.health_reason = reason
            row.updated_at = utcnow()
            session.add(row)
            _update_status(session, row)
            outbox.emit(
                session,
                outbox.RECONNECT_NEEDED,
                actor=principal.actor,
                tenant_id=tenant_id,
                provider=provider,
                version=row.kv_version,
                state="needs_reconnect",
                detail={"reason": reason},
            )
        trail.record(
            session,
            action="integration.needs_reconnect",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="failed",
            principal=principal,
            tenant_id=tenant_id,
            detail={"reason": reason, "kv_version": row.kv_version},
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
    if fields is None and result.code == "rejected" and _unrenewable(engine, tenant_id, spec):
        # A token nothing can renew (Meta's business token) that the provider refuses
        # (Graph code 190): only a reconnect helps, and services must not get it.
        mark_needs_reconnect(
            engine,
            principal=principal,
            tenant_id=tenant_id,
            provider=provider,
            reason="token_rejected",
        )
    return result


def _unrenewable(engine: Engine, tenant_id: str, spec: ProviderSpec) -> bool:
    """Whether the stored credentials are an OAuth token the broker cannot refresh."""
    if spec.oauth is None or spec.oauth.refreshable:
        return False
    with unit_of_work(engine) as session:
        row = session.get(IntegrationCredential, (tenant_id, spec.name))
        return row is not None and row.credential_kind == "oauth"


# -- the write protocol ---------------------------------------------------------------


@dataclass(frozen=True)
class _Content:
    """What a write stores, to recognise it in Vault: a retry of the same write."""

    secrets: dict[str, str]
    identifiers: dict[str, str]

    def __repr__(self) -> str:
        return f"_Content(fields={sorted(self.secrets)})"


@dataclass(frozen=True)
class _Begun:
    """What T1 decided: the version to write against, and whether a write was open."""

    cas: int
    # The row was already pending and Vault did not show that write's outcome:
    # failing ourselves settles nothing about it.
    inherited: bool
    # Vault already holds exactly this content (an earlier attempt of this very
    # request landed): nothing is written, and this is the answer.
    done: IntegrationCredential | None = None
    # This write's own pending mark (its timestamp): only the writer whose mark is
    # still on the row may clear it when its write fails.
    token: datetime | None = None


def _write(
    engine: Engine,
    store: SealedStore,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    if_match: str | None,
    action: str,
    content: _Content,
    public: dict[str, Any],
    test: ConnectionResult | None,
    skipped: bool,
) -> IntegrationCredential:
    item = item_name(provider)
    ciphertext = store.seal(tenant_id, item, content.secrets, public)
    begun = _begin(
        engine, store, tenant_id=tenant_id, provider=provider, if_match=if_match, content=content
    )
    resource = f"tenants/{tenant_id}/integrations/{provider}"
    if begun.done is not None:
        _record_applied(engine, principal, tenant_id, action, resource, begun.done.kv_version)
        return begun.done
    try:
        version = store.write(tenant_id, item, ciphertext=ciphertext, public=public, cas=begun.cas)
    except WriteOutcomeUnknown:
        _keep_pending(engine, tenant_id, provider, begun)
        raise
    except Conflict as refused:
        return _after_conflict(
            engine, store, principal, tenant_id, provider, action, content, begun, refused
        )
    except BrokerError:
        _abandon(engine, store, tenant_id, provider, begun)
        raise
    return _finish_write(
        engine,
        store,
        principal=principal,
        tenant_id=tenant_id,
        provider=provider,
        action=action,
        version=version,
        public=public,
        test=test,
        skipped=skipped,
    )


def _after_conflict(
    engine: Engine,
    store: SealedStore,
    principal: Principal,
    tenant_id: str,
    provider: str,
    action: str,
    content: _Content,
    begun: _Begun,
    refused: Conflict,
) -> IntegrationCredential:
    """Check-and-set refused the write: someone's write landed first.

    If Vault holds exactly this content, that was an earlier attempt of this same
    request, answered late: it succeeded. Otherwise the mark is cleared and the
    refusal stands.
    """
    row = _try_reconcile(engine, store, tenant_id, provider)
    if row is not None and _holds(store, tenant_id, provider, content):
        resource = f"tenants/{tenant_id}/integrations/{provider}"
        _record_applied(engine, principal, tenant_id, action, resource, row.kv_version)
        return _view(row)
    _abandon(engine, store, tenant_id, provider, begun)
    raise refused


def _finish_write(
    engine: Engine,
    store: SealedStore,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    action: str,
    version: int,
    public: dict[str, Any],
    test: ConnectionResult | None,
    skipped: bool,
) -> IntegrationCredential:
    """T2: the row takes the version Vault accepted, with the audit event and the change event."""
    with unit_of_work(engine) as session:
        row = _row_or_shred(session, store, tenant_id, provider)
        return _record_write(
            session,
            row,
            lock_settings(session, [tenant_id]).get(tenant_id),
            principal=principal,
            action=action,
            version=version,
            public=public,
            test=test,
            skipped=skipped,
        )


def _record_write(
    session: Session,
    row: IntegrationCredential,
    settings: TenantSettings | None,
    *,
    principal: Principal,
    action: str,
    version: int,
    public: dict[str, Any],
    test: ConnectionResult | None,
    skipped: bool,
) -> IntegrationCredential:
    """T2's work on the locked row (and settings): the version Vault accepted, the audit
    and change events.

    Returns the answer, which describes this write even when a concurrent one is newer.
    """
    tenant_id, provider = row.tenant_id, row.provider
    resource = f"tenants/{tenant_id}/integrations/{provider}"
    # A later writer may have finished first; never move the row backwards.
    if version >= row.kv_version:
        _describe(row, version, public, principal.actor, test, skipped)
        _settle(row)
        session.add(row)
        _feed_status(session, settings, row)
    trail.record(
        session,
        action=action,
        resource=resource,
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={
            "kv_version": version,
            "connection_test": "skipped" if skipped else ("passed" if test else "none"),
            **({"restored_from": public["restored_from"]} if "restored_from" in public else {}),
        },
    )
    # Same transaction as the row: announced exactly when the new version is on record.
    outbox.emit(
        session,
        _EVENT_OF_ACTION.get(action, outbox.CREDENTIAL_SAVED),
        actor=principal.actor,
        tenant_id=tenant_id,
        provider=provider,
        version=version,
        state="configured",
        detail={
            "kind": str(public.get("kind") or "static"),
            **({"restored_from": public["restored_from"]} if "restored_from" in public else {}),
        },
    )
    own = _view(row)
    _describe(own, version, public, principal.actor, test, skipped)
    return own


def _row_or_shred(
    session: Session, store: SealedStore, tenant_id: str, provider: str
) -> IntegrationCredential:
    """The locked row a write landed for; NotFound when its tenant was deleted meanwhile.

    Its rows went with the tenant, and its shredding may have run before the write
    landed: what the write left is destroyed, or it outlives the tenant. (No lock is
    held: there is no row.)
    """
    row = _locked_row(session, tenant_id, provider)
    if row is None:
        store.destroy(tenant_id, item_name(provider))
        raise NotFound("no such tenant")
    return row


# The event each write action announces (any other write: credential.saved).
_EVENT_OF_ACTION = {
    "integration.save": outbox.CREDENTIAL_SAVED,
    "integration.restore": outbox.CREDENTIAL_RESTORED,
    "integration.oauth.connect": outbox.CREDENTIAL_SAVED,
    "integration.oauth.refresh": outbox.CREDENTIAL_ROTATED,
    "integration.oauth.migrate": outbox.CREDENTIAL_ROTATED,
}


def _record_applied(
    engine: Engine, principal: Principal, tenant_id: str, action: str, resource: str, version: int
) -> None:
    """Audit a write Vault already held: an earlier, unanswered attempt of the same request."""
    trail.record_separately(
        engine,
        action=action,
        resource=resource,
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={"kv_version": version, "already_applied": True},
    )


def _describe(
    row: IntegrationCredential,
    version: int,
    public: Mapping[str, Any],
    actor: str,
    test: ConnectionResult | None,
    skipped: bool,
) -> None:
    _aged(row, version)
    row.kv_version = version
    row.configured = True
    row.hints = dict(public.get("hints") or {})
    row.identifiers = dict(public.get("identifiers") or {})
    row.updated_at = utcnow()
    row.updated_by = actor
    row.connection_test_skipped = skipped
    row.credential_kind = str(public.get("kind") or "static")
    row.delivery_mode = "dynamic" if public.get("delivery") == "dynamic" else "static"
    row.token_expires_at = _token_expiry(public)
    # A new grant (or a pasted token) replaces whatever the provider refused.
    row.needs_reconnect = False
    if test is not None:
        _apply_test(row, test)
        if test.ok:
            # A passing live test is a health check too.
            row.health_state, row.health_checked_at = "healthy", row.last_test_at


def _aged(row: IntegrationCredential, version: int) -> None:
    """A new version's age: the secret changed now; the credential exists since its first."""
    if version != row.kv_version or not row.configured:
        now = utcnow()
        row.rotated_at = now
        if row.first_stored_at is None or not row.configured:
            row.first_stored_at = now
        # A new secret starts without a health verdict (unless its test gave one) or reminder.
        row.health_state, row.health_reason, row.health_failures = "unknown", None, 0
        row.age_notice = None


def _token_expiry(public: Mapping[str, Any]) -> datetime | None:
    """An OAuth record's access token expiry (sealed with it), None for static ones."""
    value = public.get("access_expires_at") if public.get("kind") == "oauth" else None
    return datetime.fromisoformat(str(value)) if value else None


def _view(row: IntegrationCredential) -> IntegrationCredential:
    """A detached copy of a row, for an answer that must not change with the row."""
    copy = IntegrationCredential.model_validate(row.model_dump())
    copy.vault_sync_pending = False
    return copy


def _begin(
    engine: Engine,
    store: SealedStore,
    *,
    tenant_id: str,
    provider: str,
    if_match: str | None,
    create: bool = True,
    content: _Content | None = None,
) -> _Begun:
    """T1: lock (or create) the row, settle an earlier write, check If-Match, mark pending."""
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        if create:
            _create_rows(session, [tenant_id], provider)
        row = _locked_row(session, tenant_id, provider)
        if row is None:
            raise NotFound("this integration is not configured")
        return _begin_row(session, store, row, if_match=if_match, create=create, content=content)


def _create_rows(session: Session, tenant_ids: Sequence[str], provider: str) -> None:
    """The metadata rows of a first save, unless they exist."""
    if not tenant_ids:
        return
    now = utcnow()
    # Concurrent first saves race to create the row; let PostgreSQL pick one.
    session.execute(
        pg_insert(IntegrationCredential).on_conflict_do_nothing(),
        [
            {
                "tenant_id": tenant_id,
                "provider": provider,
                "configured": False,
                "kv_version": 0,
                "hints": {},
                "identifiers": {},
                "updated_at": now,
                "connection_test_skipped": False,
                "vault_sync_pending": False,
            }
            for tenant_id in tenant_ids
        ],
    )


def _begin_row(
    session: Session,
    store: SealedStore,
    row: IntegrationCredential,
    *,
    if_match: str | None,
    create: bool,
    content: _Content | None,
) -> _Begun:
    """T1's decisions on the locked row: settle an earlier write, check If-Match, mark pending."""
    tenant_id, provider = row.tenant_id, row.provider
    inherited = False
    if row.vault_sync_pending:
        moved = _reconcile(row, store, session)
        inherited = not moved
        # The earlier write may have been this one, retried after an unanswered attempt.
        if moved and content is not None and _holds(store, tenant_id, provider, content):
            session.add(row)
            return _Begun(row.kv_version, inherited, done=_view(row))
    if not create and not row.configured:
        # A delete that finds its version already deleted (an earlier, unanswered attempt
        # of it landed) is done: a retried DELETE succeeds, like a retried PUT.
        if row.kv_version > 0 and (if_match is None or if_match.strip() == etag(row)):
            session.add(row)
            return _Begun(row.kv_version, inherited, done=_view(row))
        raise NotFound("this integration is not configured")
    if if_match is not None and if_match.strip() not in ("*", etag(row)):
        if content is not None and _holds(store, tenant_id, provider, content):
            session.add(row)
            return _Begun(row.kv_version, inherited, done=_view(row))
        raise PreconditionFailed("the credentials changed since they were read; reload")
    row.vault_sync_pending = True
    row.pending_since = utcnow()
    session.add(row)
    return _Begun(row.kv_version, inherited, token=row.pending_since)


def _holds(store: SealedStore, tenant_id: str, provider: str, content: _Content) -> bool:
    """True when Vault's current version of the credentials is exactly `content`."""
    record = store.read(tenant_id, item_name(provider))
    if record is None:
        return False
    secrets = store.open(tenant_id, item_name(provider), record)
    identifiers = {str(k): str(v) for k, v in (record.public.get("identifiers") or {}).items()}
    return secrets == content.secrets and identifiers == content.identifiers


def _settle(row: IntegrationCredential) -> None:
    row.vault_sync_pending = False
    row.pending_since = None


def _keep_pending(engine: Engine, tenant_id: str, provider: str, begun: _Begun) -> None:
    """The write may still land: keep (or put back) the mark while it could."""
    try:
        with unit_of_work(engine) as session:
            row = _locked_row(session, tenant_id, provider)
            # Once the row records a newer version, a write based on `cas` can never land.
            if row is not None and row.kv_version <= begun.cas:
                row.vault_sync_pending = True
                row.pending_since = row.pending_since or utcnow()
                session.add(row)
    except BrokerError:
        log.warning("could not keep an unconfirmed write marked; the T1 mark stands")


def _abandon(
    engine: Engine, store: SealedStore, tenant_id: str, provider: str, begun: _Begun
) -> None:
    """This write failed without landing: clear the mark unless another write is open.

    Only this write's own mark is cleared (another writer that marked the row since
    may still be in flight, or unanswered), and only if the row was not already
    pending when it began.
    """
    if begun.inherited:
        _try_reconcile(engine, store, tenant_id, provider)
        return
    try:
        with unit_of_work(engine) as session:
            row = _locked_row(session, tenant_id, provider)
            if (
                row is not None
                and row.vault_sync_pending
                and row.pending_since == begun.token
                and row.kv_version >= begun.cas
            ):
                _settle(row)
                session.add(row)
    except BrokerError:
        log.warning("could not clear a failed write's mark; the next reader will")


def _try_reconcile(
    engine: Engine, store: SealedStore, tenant_id: str, provider: str
) -> IntegrationCredential | None:
    """Best effort: make the row match Vault now; leave it pending if Vault is down."""
    try:
        with unit_of_work(engine) as session:
            row = _locked_row(session, tenant_id, provider)
            if row is not None and row.vault_sync_pending:
                _reconcile(row, store, session)
                session.add(row)
            return row
    except VaultUnavailable:
        return None
    except StoredDataUnverified:
        record_unverified(engine, store.vault, tenant_id, provider, action="integration.reconcile")
        return None
    except BrokerError:
        log.warning("could not reconcile integration metadata with Vault")
        return None


def record_unverified(
    engine: Engine, vault: VaultGateway, tenant_id: str, provider: str, *, action: str
) -> None:
    """KV shows a version whose public part is not the sealed one: tampering.

    Nothing was used (a rebuilt row keeps what it had, flagged pending); the trail says
    so once per KV version and action, not once per reader or scheduled run.
    """
    log.warning(
        "stored data does not verify; it was not used", extra={"fields": {"action": action}}
    )
    resource = f"tenants/{tenant_id}/integrations/{provider}"
    try:
        version, _ = SealedStore(vault).current_version(tenant_id, item_name(provider))
        with unit_of_work(engine) as session:
            seen = session.exec(
                select(AuditEvent.id).where(
                    AuditEvent.tenant_id == tenant_id,
                    AuditEvent.action == action,
                    AuditEvent.resource == resource,
                    col(AuditEvent.detail)["kv_version"].as_integer() == version,
                )
            ).first()
            if seen is None:
                trail.record(
                    session,
                    action=action,
                    resource=resource,
                    outcome="failed",
                    tenant_id=tenant_id,
                    detail={"reason": "unverified", "kv_version": version},
                )
    except BrokerError:
        log.warning("could not record unverified stored data in the trail")


def _reconcile(row: IntegrationCredential, store: SealedStore, session: Session) -> bool:
    """Rebuild a pending row from Vault, the source of truth; False when Vault shows nothing new.

    A KV version or deletion the row does not know settles every write that was
    open (check-and-set refuses any write based on an older version). When KV
    still holds exactly what the row says, an unanswered write may yet land, so
    the row stays pending.
    """
    item = item_name(row.provider)
    version, live = store.current_version(row.tenant_id, item)
    if version == row.kv_version and live == row.configured:
        return False
    record = store.read(row.tenant_id, item) if live else None
    if record is not None:
        store.open(row.tenant_id, item, record)  # adopt only hints that verify
        _aged(row, version)
        row.hints = dict(record.public.get("hints") or {})
        row.identifiers = dict(record.public.get("identifiers") or {})
        row.updated_by = record.public.get("updated_by")
        row.connection_test_skipped = record.public.get("connection_test") == "skipped"
        row.credential_kind = str(record.public.get("kind") or "static")
        row.delivery_mode = "dynamic" if record.public.get("delivery") == "dynamic" else "static"
        row.token_expires_at = _token_expiry(record.public)
        row.needs_reconnect = False
    else:
        row.hints, row.identifiers = {}, {}
        row.token_expires_at = None
    row.updated_at = utcnow()
    row.kv_version = version
    row.configured = record is not None
    _settle(row)
    # The write whose answer was lost is confirmed only now: announce it now.
    outbox.emit(
        session,
        outbox.CREDENTIAL_SAVED if row.configured else outbox.CREDENTIAL_DELETED,
        actor=str(row.updated_by or "broker-reconcile") if row.configured else "broker-reconcile",
        tenant_id=row.tenant_id,
        provider=row.provider,
        version=version,
        state="configured" if row.configured else "deleted",
        detail={"settled_by": "reconcile"},
    )
    return True


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
    _feed_status(session, lock_settings(session, [row.tenant_id]).get(row.tenant_id), row)


def _feed_status(
    session: Session, settings: TenantSettings | None, row: IntegrationCredential
) -> None:
    """`_update_status` on the tenant's settings row, locked already (None: it has none)."""
    if settings is None:
        return
    status = dict(settings.integrations_status or {})
    entry = dict(status.get(row.provider) or {})
    entry.update(
        enabled=row.configured,
        last_test_at=row.last_test_at.isoformat() if row.last_test_at else None,
        last_test_ok=row.last_test_ok,
        last_test_reason=row.last_test_reason,
        needs_reconnect=row.needs_reconnect,
        connection_expires_at=_connection_expiry(row),
        health=row.health_state,
        health_reason=row.health_reason[:200] if row.health_reason else None,
        health_checked_at=row.health_checked_at.isoformat() if row.health_checked_at else None,
        delivery="dynamic" if row.delivery_mode == "dynamic" else "static",
        created_at=row.first_stored_at.isoformat() if row.first_stored_at else None,
        rotated_at=row.rotated_at.isoformat() if row.rotated_at else None,
        age=(row.age_notice or "ok") if row.configured else None,
    )
    status[row.provider] = entry
    validated = validate_group("integrations_status", status)
    if validated != settings.integrations_status:
        settings.integrations_status = validated
        settings.version += 1
        settings.updated_at = utcnow()
        session.add(settings)


def update_status(session: Session, row: IntegrationCredential) -> None:
    """Feed `integrations_status` from a changed row (for other domains, e.g. health)."""
    _update_status(session, row)


def _connection_expiry(row: IntegrationCredential) -> str | None:
    """The expiry worth showing in the settings: only of a token nothing renews."""
    oauth = get_provider(row.provider).oauth
    # A refreshed token's hourly expiry would churn the settings' version for nothing.
    if row.credential_kind != "oauth" or oauth is None or oauth.refreshable:
        return None
    return row.token_expires_at.isoformat() if row.token_expires_at else None


def _locked_row(session: Session, tenant_id: str, provider: str) -> IntegrationCredential | None:
    return session.exec(
        select(IntegrationCredential)
        .where(IntegrationCredential.tenant_id == tenant_id)
        .where(IntegrationCredential.provider == provider)
        .with_for_update()
    ).first()


def live_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant, unless missing or being deleted (NotFound)."""
    return _live_tenant(session, tenant_id)


def _live_tenant(session: Session, tenant_id: str) -> Tenant:
    return _live(session.get(Tenant, tenant_id))


def _live(tenant: Tenant | None) -> Tenant:
    """The tenant, unless missing or being deleted (NotFound)."""
    if tenant is None or tenant.deleting_at is not None:
        raise NotFound("no such tenant")
    return tenant


def open_credentials(
    store: SealedStore, tenant_id: str, provider: str, record: SealedRecord
) -> Credentials:
    """A stored record's credentials: its sealed secrets beside its public identifiers."""
    return credentials_of(provider, record, store.open(tenant_id, item_name(provider), record))


def credentials_of(provider: str, record: SealedRecord, secrets: dict[str, str]) -> Credentials:
    """The credentials of a record whose sealed secrets were opened (`SealedStore.open`)."""
    identifiers = {str(k): str(v) for k, v in (record.public.get("identifiers") or {}).items()}
    if record.public.get("kind") == "oauth":
        # The refresh token stays with the OAuth code; a Credentials never carries it,
        # nor identifiers that are no field of the provider (WhatsApp's phone number id).
        secrets = {"access_token": secrets["access_token"]}
        names = {f.name for f in get_provider(provider).fields}
        identifiers = {k: v for k, v in identifiers.items() if k in names}
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


# -- the write protocol, a batch at a time --------------------------------------------


@dataclass
class BatchSave:
    """One tenant's credentials in a `SaveBatch`, and what each step left of them."""

    principal: Principal
    tenant_id: str
    fields: Mapping[str, object] = field(repr=False)
    if_match: str | None
    public: dict[str, Any] = field(default_factory=dict, repr=False)
    content: _Content | None = None
    ciphertext: str | None = field(default=None, repr=False)
    begun: _Begun | None = None
    version: int | None = None
    """The KV version Vault accepted for this write."""
    result: IntegrationCredential | None = None
    """The answer, once settled: what `save_credentials` would have returned."""
    error: BrokerError | None = None
    """Why this save failed; the later steps pass it by."""
    context: RequestContext | None = None
    """The request context this save's Vault calls and trail events are stamped with."""

    @property
    def sealed(self) -> bool:
        """Sealed and not failed: ready to be marked."""
        return self.ciphertext is not None and self.error is None

    @property
    def to_write(self) -> bool:
        """Marked pending, not failed, and Vault does not hold it yet: ready to be written."""
        return self.begun is not None and self.begun.done is None and self.error is None


@dataclass
class SaveBatch:
    """`save_credentials` for many tenants at once, with the connection test skipped.

    The same write protocol and the same guarantees, each step taken for the whole
    batch: one read (`check`), one T1 (`mark`) and one T2 (`settle`) for all of
    them. The Vault calls are one per tenant (each tenant has its own key), so
    `seal` and `write` take one save and the caller runs them concurrently. A save
    that fails does so alone (its `error`); the later steps pass it by. The skipped
    connection test is recorded as skipped, as with `skip_connection_test=True`.

        batch = SaveBatch(engine, vault, outbound, "twilio", saves)
        batch.check()                     # live tenants, delivery mode, fields, egress
        for each save: batch.seal(save)   # Transit, concurrently
        batch.mark()                      # T1: rows created if missing, marked pending
        for each save: batch.write(save)  # KV with check-and-set, concurrently
        batch.settle()                    # T2; a failed write is settled as in `_write`

    A save `write` never reached (the caller stopped) is settled like a refused one.
    """

    engine: Engine
    vault: VaultGateway
    outbound: Outbound
    provider: str
    saves: list[BatchSave]
    action: str = "integration.save"

    def __post_init__(self) -> None:
        self.spec = get_provider(self.provider)
        self.store = SealedStore(self.vault)

    def check(self) -> None:
        """Step 1 without Vault: each tenant live, its delivery mode, its fields, its egress."""
        ids = [s.tenant_id for s in self.saves]
        with unit_of_work(self.engine) as session:
            tenants = {t.id: t for t in session.exec(select(Tenant).where(col(Tenant.id).in_(ids)))}
            rows = {r.tenant_id: r for r in session.exec(_rows_of(ids, self.provider))}
            for save in self.saves:
                try:
                    _live(tenants.get(save.tenant_id))
                    delivery = _delivery_of(rows.get(save.tenant_id))
                    creds = _validated(self.spec, save.fields, delivery)
                    self.spec.check_target(self.outbound.client, self.outbound.endpoints, creds)
                except BrokerError as exc:
                    save.error = exc
                    continue
                save.content = _Content(creds.secret_values(), creds.identifiers())
                save.public = _saved_public(
                    self.spec, creds, save.principal, delivery, skipped=True
                )

    def seal(self, save: BatchSave) -> None:
        """Step 1's Transit encryption, for one save."""
        content = save.content
        if save.error is not None or content is None:
            return
        item = item_name(self.provider)
        try:
            save.ciphertext = _as(
                save, self.store.seal, save.tenant_id, item, content.secrets, save.public
            )
        except BrokerError as exc:
            save.error = exc

    def mark(self) -> None:
        """T1 for every sealed save, in one transaction.

        A save that fails here changes nothing of its row, unless it first
        reconciled the row with Vault (which any reader may do), so no savepoint
        is needed for it to fail alone.
        """
        ready = [s for s in self.saves if s.sealed]
        if not ready:
            return
        ids = [s.tenant_id for s in ready]
        with unit_of_work(self.engine) as session:
            # Key-share locks: no tenant can be deleted under its new rows.
            live = {
                t.id: t
                for t in session.exec(
                    select(Tenant)
                    .where(col(Tenant.id).in_(ids), col(Tenant.deleting_at).is_(None))
                    .with_for_update(read=True, key_share=True)
                )
            }
            _create_rows(session, list(live), self.provider)
            rows = _locked_rows(session, ids, self.provider)
            for save in ready:
                try:
                    _live(live.get(save.tenant_id))
                    save.begun = _as(
                        save,
                        _begin_row,
                        session,
                        self.store,
                        rows[save.tenant_id],
                        if_match=save.if_match,
                        create=True,
                        content=save.content,
                    )
                except BrokerError as exc:
                    save.error = exc

    def write(self, save: BatchSave) -> None:
        """Step 3, for one save: the KV write with check-and-set."""
        begun, ciphertext = save.begun, save.ciphertext
        if not save.to_write or begun is None or ciphertext is None:
            return
        item = item_name(self.provider)
        try:
            save.version = _as(
                save,
                self.store.write,
                save.tenant_id,
                item,
                ciphertext=ciphertext,
                public=save.public,
                cas=begun.cas,
            )
        except BrokerError as exc:
            save.error = exc

    def settle(self) -> None:
        """T2 for every write Vault accepted, in one transaction; then each other marked save."""
        written = [s for s in self.saves if s.version is not None]
        if written:
            with unit_of_work(self.engine) as session:
                ids = [s.tenant_id for s in written]
                rows = _locked_rows(session, ids, self.provider)
                settings = lock_settings(session, ids)
                # Flushed once, at the commit: nothing below reads what the loop changes.
                with session.no_autoflush:
                    for save in written:
                        row = rows.get(save.tenant_id)
                        _as(save, self._record, session, save, row, settings)
        for save in self.saves:
            begun = save.begun
            if begun is not None and save.version is None:
                _as(save, self._settle_unwritten, save, begun)

    def _record(
        self,
        session: Session,
        save: BatchSave,
        row: IntegrationCredential | None,
        settings: Mapping[str, TenantSettings],
    ) -> None:
        if row is None:  # the tenant was deleted meanwhile, and its rows with it
            try:
                _row_or_shred(session, self.store, save.tenant_id, self.provider)
            except BrokerError as exc:
                save.error = exc
            return
        save.result = _record_write(
            session,
            row,
            settings.get(save.tenant_id),
            principal=save.principal,
            action=self.action,
            version=save.version or 0,
            public=save.public,
            test=None,
            skipped=True,
        )

    def _settle_unwritten(self, save: BatchSave, begun: _Begun) -> None:
        """What `_write` does when Vault held it already, or the write failed or never went."""
        tenant_id, provider = save.tenant_id, self.provider
        if begun.done is not None:
            resource = f"tenants/{tenant_id}/integrations/{provider}"
            version = begun.done.kv_version
            _record_applied(self.engine, save.principal, tenant_id, self.action, resource, version)
            save.result = begun.done
        elif isinstance(save.error, WriteOutcomeUnknown):
            _keep_pending(self.engine, tenant_id, provider, begun)
        elif isinstance(save.error, Conflict) and save.content is not None:
            try:
                save.result = _after_conflict(
                    self.engine,
                    self.store,
                    save.principal,
                    tenant_id,
                    provider,
                    self.action,
                    save.content,
                    begun,
                    save.error,
                )
                save.error = None
            except BrokerError as exc:
                save.error = exc
        else:  # refused, or never sent
            _abandon(self.engine, self.store, tenant_id, provider, begun)


_T = TypeVar("_T")


def _as(save: BatchSave, step: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one save's step under its own request context, when it has one."""
    if save.context is None:
        return step(*args, **kwargs)
    return contextvars.copy_context().run(_bound, save.context, partial(step, *args, **kwargs))


def _bound(ctx: RequestContext, step: Callable[[], _T]) -> _T:
    context.bind(ctx)
    return step()


def _rows_of(tenant_ids: Sequence[str], provider: str) -> Any:
    """The statement selecting these tenants' metadata rows of one provider."""
    return (
        select(IntegrationCredential)
        .where(col(IntegrationCredential.tenant_id).in_(tenant_ids))
        .where(IntegrationCredential.provider == provider)
        .order_by(col(IntegrationCredential.tenant_id))
    )


def _locked_rows(
    session: Session, tenant_ids: Sequence[str], provider: str
) -> dict[str, IntegrationCredential]:
    """These tenants' metadata rows of one provider, locked (in tenant order), by tenant."""
    rows = session.exec(_rows_of(tenant_ids, provider).with_for_update())
    return {row.tenant_id: row for row in rows}
