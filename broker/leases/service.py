"""Dynamic credentials: a provider key minted per lease, and revoked when the lease ends.

A tenant admin puts a provider (Twilio, OpenAI) in "dynamic" delivery. From then on a
service's fetch never receives the stored root credential: the broker mints a key for
that service, named after its lease, and hands out only that key, valid until the
lease ends. The same service asking again while its lease still has a useful life
(`reuse_min_s`) gets the same key back, read from Vault, where it is sealed with the
tenant's key like any credential (`tenants/<id>/leases/<lease id>`).

Write ordering of a mint, so no key is ever left behind unknown:
1. under a lock per tenant, provider and service (one mint at a time for them), a
   lease row is registered as `minting` and committed, together with the job that
   revokes it at its end;
2. the provider mints a key named `broker-lease-<id>`;
3. the key is sealed in Vault;
4. the row becomes `active` with the provider's key id.
A crash or a timeout after step 2 leaves a `minting` row whose key the revoker finds by
its name and deletes. A key that cannot be sealed (step 3) is revoked at once.

Revocation locks the lease's row (`FOR UPDATE SKIP LOCKED`) for the provider call and
marks it revoked in the same transaction, so two workers (or a worker and an on-demand
revocation) never revoke one lease twice; a failure is recorded on the row (attempts,
error class, next attempt with exponential backoff) and retried by the sweep. The key
is deleted with the root credential version that minted it, so a rotation that moves
to another account still revokes the old account's keys.

A key handed out is announced (`lease.minted`) in the transaction that makes its lease
active, and a key deleted at the provider (`lease.revoked`) in the one that marks it
revoked: the change feed and webhooks see each once, with identifiers only.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, func, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select, update

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import context
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, Conflict, NotFound, RateLimited, UpstreamUnavailable
from broker.events import outbox
from broker.integrations.dynamic import (
    DynamicSpec,
    KeyCallFailed,
    KeyCalls,
    MintedKey,
    dynamic_spec,
    lease_key_name,
)
from broker.integrations.providers import Credentials, ProviderEndpoints
from broker.integrations.service import Outbound, item_name, open_credentials
from broker.models import DynamicLease, utcnow
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedRecord, SealedStore

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
LeaseState = Literal["minting", "active", "revoked"]
RevokeOutcome = Literal["revoked", "already", "busy", "failed", "not_due", "missing", "skipped"]
# A sweep stops calling a provider that failed this many revocations in a row: the rest
# wait for the next run instead of each waiting out the egress timeout (an outage must
# not hold a worker for batch x timeout, starving the other jobs of its queue).
BREAKER_FAILURES = 5

WORKER = Principal(subject="broker-worker", kind="service", scopes=frozenset())
# On-demand revocation revokes this many leases before answering; the sweep takes the rest.
INLINE_REVOCATIONS = 200
# Leases one sweep run revokes at most, and how many at a time (each waits on the provider).
SWEEP_BATCH = 1000
SWEEP_THREADS = 4


@dataclass(frozen=True)
class Leasing:
    """What minting and revoking need: stores, the provider calls, the knobs and a clock."""

    engine: Engine
    vault: VaultGateway
    calls: KeyCalls
    endpoints: ProviderEndpoints
    clock: Clock = utcnow
    live_cap: int = 5
    reuse_min_s: int = 60
    backoff_s: float = 5.0
    backoff_max_s: float = 3600.0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        engine: Engine,
        vault: VaultGateway,
        outbound: Outbound,
        clock: Clock = utcnow,
    ) -> Leasing:
        """Built from the settings, with the egress policy and endpoints of connection tests."""
        return cls(
            engine=engine,
            vault=vault,
            calls=KeyCalls(outbound.client.policy),
            endpoints=outbound.endpoints,
            clock=clock,
            live_cap=settings.lease_live_cap,
            reuse_min_s=settings.lease_reuse_min_s,
            backoff_s=settings.lease_revoke_backoff_s,
            backoff_max_s=settings.lease_revoke_backoff_max_s,
        )


@dataclass(frozen=True)
class IssuedKey:
    """A minted key as a service receives it (the fields hold the key, never the root)."""

    lease_id: str
    fields: dict[str, str] = field(repr=False)
    issued_at: datetime
    expires_at: datetime
    reused: bool

    def __repr__(self) -> str:
        return f"IssuedKey({self.lease_id}, fields={sorted(self.fields)}, reused={self.reused})"


class _Breaker:
    """Consecutive revocation failures per provider within one run (thread-safe)."""

    def __init__(self, threshold: int = BREAKER_FAILURES) -> None:
        self._threshold = threshold
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def is_open(self, provider: str) -> bool:
        with self._lock:
            return self._failures.get(provider, 0) >= self._threshold

    def record(self, provider: str, *, ok: bool) -> None:
        with self._lock:
            self._failures[provider] = 0 if ok else self._failures.get(provider, 0) + 1


@dataclass
class Revocations:
    """How an on-demand revocation or a sweep went."""

    revoked: int = 0
    failed: int = 0
    already: int = 0
    queued: int = 0
    """Marked due but left to the sweep (past the inline limit, or busy elsewhere)."""


def lease_item(lease_id: str) -> str:
    """The sealed item holding a lease's minted secret."""
    return f"leases/{lease_id}"


def _resource(tenant_id: str, lease_id: str) -> str:
    return f"tenants/{tenant_id}/leases/{lease_id}"


def _spec(provider: str) -> DynamicSpec:
    spec = dynamic_spec(provider)
    if spec is None:
        raise Conflict("this provider has no dynamic credentials")
    return spec


# -- issuing --------------------------------------------------------------------------


def _lock_key(*parts: str) -> int:
    digest = hashlib.sha256("\x1f".join(("lease", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _owner_lock(engine: Engine, tenant_id: str, provider: str, subject: str) -> Iterator[None]:
    """One issue at a time per tenant, provider and service, across replicas.

    A transaction-level advisory lock, held on a connection of its own for the whole
    mint: a concurrent fetch by the same service waits and then reuses the new lease
    instead of minting a second key (bounded by the statement timeout).
    """
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": _lock_key(tenant_id, provider, subject)},
            )
            yield
    except SQLAlchemyError:
        raise UpstreamUnavailable("the database is unavailable") from None


def issue(
    leasing: Leasing,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    lease_s: int,
    record: SealedRecord,
) -> IssuedKey:
    """The service's live lease on a key of `provider`, or a newly minted one."""
    spec = _spec(provider)
    store = SealedStore(leasing.vault)
    with _owner_lock(leasing.engine, tenant_id, provider, principal.subject):
        now = leasing.clock()
        with unit_of_work(leasing.engine) as session:
            live = list(
                session.exec(
                    select(DynamicLease)
                    .where(DynamicLease.tenant_id == tenant_id)
                    .where(DynamicLease.provider == provider)
                    .where(DynamicLease.subject == principal.subject)
                    .where(col(DynamicLease.state).in_(("minting", "active")))
                    .where(col(DynamicLease.due_at) > now)
                    .order_by(col(DynamicLease.expires_at).desc())
                )
            )
        useful = timedelta(seconds=min(leasing.reuse_min_s, lease_s // 2))
        for lease in live:
            # A new root (a save, a restore) made the older leases due already; a key
            # rotation's rewrap is a new KV version of the same root, and changes nothing.
            if lease.state == "active" and lease.expires_at - now >= useful:
                reused = _reuse(store, lease, now=now)
                if reused is not None:
                    return reused
        if len(live) >= leasing.live_cap:
            soonest = min(lease.due_at for lease in live)
            raise RateLimited(
                f"this service holds {len(live)} live {spec.title} leases for the tenant, "
                "the most allowed; reuse one or wait for one to end",
                retry_after=max(1, int((soonest - now).total_seconds()) + 1),
            )
        return _mint(
            leasing,
            spec,
            store,
            principal=principal,
            tenant_id=tenant_id,
            provider=provider,
            lease_s=lease_s,
            record=record,
            now=now,
        )


def _reuse(store: SealedStore, lease: DynamicLease, *, now: datetime) -> IssuedKey | None:
    """The live lease's key from Vault (None if its sealed copy is gone).

    Issued now, as far as the caller is told: a client sizes its cache by
    `expires_at - issued_at`, which must be what is left of the lease.
    """
    context.update(action=f"leases.reuse:{lease.provider}")
    sealed = store.read(lease.tenant_id, lease_item(lease.id))
    if sealed is None:
        return None
    secrets = store.open(lease.tenant_id, lease_item(lease.id), sealed)
    public = {str(k): str(v) for k, v in (sealed.public.get("fields") or {}).items()}
    return IssuedKey(
        lease_id=lease.id,
        fields={**public, **secrets},
        issued_at=now,
        expires_at=lease.expires_at,
        reused=True,
    )


def _mint(
    leasing: Leasing,
    spec: DynamicSpec,
    store: SealedStore,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str,
    lease_s: int,
    record: SealedRecord,
    now: datetime,
) -> IssuedKey:
    # The root credential is opened here, in the broker, and never leaves it.
    context.update(action=f"leases.mint:{provider}")
    root = open_credentials(store, tenant_id, provider, record)
    problem = spec.check(root)
    if problem is not None:
        raise Conflict(f"{problem}; save such credentials or switch the delivery to static")
    lease_id = uuid.uuid4().hex
    expires_at = now + timedelta(seconds=lease_s)
    _open_lease(leasing, spec, principal, tenant_id, provider, lease_id, record, root, now, lease_s)
    key = _mint_key(leasing, spec, principal, lease_id, root, lease_s)
    context.restart_vault_budget()  # the provider's time was not Vault's
    fields = spec.deliver(root, key)
    identifiers = {name: value for name, value in fields.items() if name not in key.secrets}
    try:
        ciphertext = store.seal(
            tenant_id,
            lease_item(lease_id),
            key.secrets,
            public := {
                "lease_id": lease_id,
                "provider": provider,
                "key_id": key.key_id,
                "expires_at": expires_at.isoformat(),
                "fields": identifiers,
            },
        )
        store.write(tenant_id, lease_item(lease_id), ciphertext=ciphertext, public=public, cas=0)
    except BrokerError:
        # A key nobody can be given must not live on: revoke it now, or let the sweep.
        _due_now(leasing, lease_id, key_id=key.key_id, reason="not_stored")
        revoke_one(leasing, lease_id, actor=WORKER)
        raise
    if not _activate(leasing, principal, tenant_id, provider, lease_id, key, record, expires_at):
        revoke_one(leasing, lease_id, actor=WORKER)
        raise NotFound("no such credentials")
    return IssuedKey(
        lease_id=lease_id, fields=fields, issued_at=now, expires_at=expires_at, reused=False
    )


def _open_lease(
    leasing: Leasing,
    spec: DynamicSpec,
    principal: Principal,
    tenant_id: str,
    provider: str,
    lease_id: str,
    record: SealedRecord,
    root: Credentials,
    now: datetime,
    lease_s: int,
) -> None:
    """T1: the lease exists, with the job that revokes it at its end, before any key does."""
    from broker.leases import jobs  # the jobs module imports this one

    expires_at = now + timedelta(seconds=lease_s)
    with unit_of_work(leasing.engine) as session:
        session.add(
            DynamicLease(
                id=lease_id,
                tenant_id=tenant_id,
                provider=provider,
                subject=principal.subject,
                root_version=record.version,
                root_account=_account_hash(spec, root),
                state="minting",
                issued_at=now,
                expires_at=expires_at,
                due_at=expires_at,
            )
        )
        session.flush()
        jobs.schedule_revocation(session, lease_id, in_s=lease_s)


def _mint_key(
    leasing: Leasing,
    spec: DynamicSpec,
    principal: Principal,
    lease_id: str,
    root: Credentials,
    lease_s: int,
) -> MintedKey:
    """The provider's new key for the lease; a refusal is recorded on the lease."""
    try:
        return spec.mint(leasing.calls, leasing.endpoints, root, lease_key_name(lease_id), lease_s)
    except KeyCallFailed as exc:
        _mint_failed(leasing, lease_id, exc, principal=principal)
        if exc.error == "rejected":
            raise Conflict(
                f"{spec.title} refused the stored root credential; check it and save it again"
            ) from None
        raise UpstreamUnavailable(
            f"could not mint a {spec.title} key now ({exc.error})",
            retry_after=exc.retry_after_s or 5,
        ) from None


def _activate(
    leasing: Leasing,
    principal: Principal,
    tenant_id: str,
    provider: str,
    lease_id: str,
    key: MintedKey,
    record: SealedRecord,
    expires_at: datetime,
) -> bool:
    """T2: the lease is active, unless it was revoked meanwhile (a tenant incident); False
    when it was."""
    with unit_of_work(leasing.engine) as session:
        row = _locked(session, lease_id)
        revoked = row is None or row.state == "revoked" or row.due_at <= leasing.clock()
        if row is not None and revoked:
            # The revoker found no key by this name yet (it was still being minted):
            # the row takes the key back, due now, so it is deleted and not forgotten.
            row.state = "active"
            row.provider_key_id = key.key_id
            row.revoked_at = None
            row.due_at = min(row.due_at, leasing.clock())
            row.next_attempt_at = None
            session.add(row)
        elif row is not None:
            row.state = "active"
            row.provider_key_id = key.key_id
            session.add(row)
            trail.record(
                session,
                action="lease.mint",
                resource=_resource(tenant_id, lease_id),
                outcome="success",
                principal=principal,
                tenant_id=tenant_id,
                detail={
                    "provider": provider,
                    "key_id": key.key_id,
                    "expires_at": expires_at.isoformat(),
                    "root_version": record.version,
                },
            )
            # Announced with the row that makes the key deliverable, never before: a mint
            # that fails, or is revoked before it is handed out, is not announced minted.
            outbox.emit(
                session,
                outbox.LEASE_MINTED,
                actor=principal.actor,
                tenant_id=tenant_id,
                provider=provider,
                version=record.version,
                state="active",
                detail=_event_detail(row, expires_at=expires_at.isoformat()),
            )
    return not revoked


def _mint_failed(
    leasing: Leasing, lease_id: str, exc: KeyCallFailed, *, principal: Principal
) -> None:
    """Record a failed mint: a key that may exist is due now; one that cannot, is done."""
    now = leasing.clock()
    with unit_of_work(leasing.engine) as session:
        row = _locked(session, lease_id)
        if row is None:
            return
        row.last_error = exc.error
        if exc.unknown:
            # The provider may have minted it: the revoker looks for it by name.
            row.due_at = now
            row.revoke_reason = "mint_unconfirmed"
        else:
            row.state = "revoked"
            row.revoked_at = now
            row.revoke_reason = "mint_failed"
        session.add(row)
        trail.record(
            session,
            action="lease.mint",
            resource=_resource(row.tenant_id, lease_id),
            outcome="failed",
            principal=principal,
            tenant_id=row.tenant_id,
            detail={"provider": row.provider, "error": exc.error, "unconfirmed": exc.unknown},
        )


def _due_now(leasing: Leasing, lease_id: str, *, key_id: str | None, reason: str | None) -> None:
    try:
        with unit_of_work(leasing.engine) as session:
            row = _locked(session, lease_id)
            if row is None or row.state == "revoked":
                return
            row.provider_key_id = key_id or row.provider_key_id
            row.due_at = leasing.clock()
            row.next_attempt_at = None
            row.revoke_reason = reason or row.revoke_reason
            session.add(row)
    except BrokerError:
        log.warning("could not mark a lease due; the sweep finds it at its end")


def _locked(session: Session, lease_id: str, *, skip: bool = False) -> DynamicLease | None:
    return session.exec(
        select(DynamicLease).where(DynamicLease.id == lease_id).with_for_update(skip_locked=skip)
    ).first()


# -- revoking -------------------------------------------------------------------------


def revoke_one(
    leasing: Leasing,
    lease_id: str,
    *,
    actor: Principal,
    reason: str | None = None,
    only_if_due: bool = False,
    breaker: _Breaker | None = None,
) -> RevokeOutcome:
    """Delete one lease's key at the provider and mark it revoked (at most once, ever).

    The row stays locked through the provider call; whoever finds it locked leaves it
    ("busy"). A failure is recorded on the row and retried later with backoff.
    """
    with unit_of_work(leasing.engine) as session:
        row = _locked(session, lease_id, skip=True)
        if row is None:
            # Locked by another revoker (or the mint that is finishing it), or gone.
            exists = session.exec(
                select(DynamicLease.id).where(DynamicLease.id == lease_id)
            ).first()
            return "busy" if exists is not None else "missing"
        if row.state == "revoked":
            return "already"
        now = leasing.clock()
        if only_if_due and (
            row.due_at > now or (row.next_attempt_at is not None and row.next_attempt_at > now)
        ):
            return "not_due"
        if breaker is not None and breaker.is_open(row.provider):
            return "skipped"
        context.update(tenant_id=row.tenant_id, action=f"leases.revoke:{row.provider}")
        try:
            _delete_key(leasing, row)
        except (KeyCallFailed, BrokerError) as exc:
            _revoke_failed(leasing, session, row, exc, now, breaker)
            return "failed"
        if breaker is not None:
            breaker.record(row.provider, ok=True)
        _record_revoked(leasing, session, row, actor, reason)
        return "revoked"


def _revoke_failed(
    leasing: Leasing,
    session: Session,
    row: DynamicLease,
    exc: KeyCallFailed | BrokerError,
    now: datetime,
    breaker: _Breaker | None,
) -> None:
    """The provider did not delete the key: recorded on the row, retried later with backoff."""
    if breaker is not None:
        breaker.record(row.provider, ok=False)
    error = exc.error if isinstance(exc, KeyCallFailed) else _broker_error_class(exc)
    retry_after = exc.retry_after_s if isinstance(exc, KeyCallFailed) else None
    row.revoke_attempts += 1
    row.last_error = error
    backoff = min(leasing.backoff_max_s, leasing.backoff_s * 2 ** (row.revoke_attempts - 1))
    row.next_attempt_at = now + timedelta(seconds=max(backoff, retry_after or 0))
    session.add(row)
    log.warning(
        "could not revoke a lease; it will be retried",
        extra={
            "fields": {
                "lease_id": row.id,
                "provider": row.provider,
                "error": error,
                "attempts": row.revoke_attempts,
            }
        },
    )


def _record_revoked(
    leasing: Leasing, session: Session, row: DynamicLease, actor: Principal, reason: str | None
) -> None:
    """The key is gone at the provider: the row says so, with the trail and the event."""
    row.state = "revoked"
    row.revoked_at = leasing.clock()
    row.revoked_by = actor.actor
    row.revoke_reason = reason or row.revoke_reason or "expired"
    row.next_attempt_at = None
    session.add(row)
    trail.record(
        session,
        action="lease.revoke",
        resource=_resource(row.tenant_id, row.id),
        outcome="success",
        principal=actor,
        tenant_id=row.tenant_id,
        detail={
            "provider": row.provider,
            "key_id": row.provider_key_id,
            "reason": row.revoke_reason,
            "attempts": row.revoke_attempts + 1,
        },
    )
    if row.provider_key_id is not None:
        # A key was deleted at the provider (even one never handed out: an unconfirmed
        # mint found by its name, a key that could not be sealed). A lease whose mint
        # left no key revoked nothing, and announces nothing.
        outbox.emit(
            session,
            outbox.LEASE_REVOKED,
            actor=actor.actor,
            tenant_id=row.tenant_id,
            provider=row.provider,
            version=row.root_version,
            state="revoked",
            detail=_event_detail(row, reason=row.revoke_reason),
        )


def _event_detail(row: DynamicLease, **extra: str | None) -> dict[str, str | None]:
    """What a lease event says: identifiers only. The key id is the provider's name for the
    key (Twilio SK sid, OpenAI service account id), never its secret."""
    return {
        "lease_id": row.id,
        "subject": row.subject,
        "key_id": row.provider_key_id,
        **extra,
    }


def _broker_error_class(exc: BrokerError) -> str:
    if isinstance(exc, UpstreamUnavailable):
        return "vault_unavailable"
    if isinstance(exc, NotFound):
        return "no_root"
    return "broker_error"


def _delete_key(leasing: Leasing, row: DynamicLease) -> None:
    """Delete the lease's key (found by name when its mint was never confirmed)."""
    spec = _spec(row.provider)
    store = SealedStore(leasing.vault)
    root = _root_for(store, spec, row)
    key_id = row.provider_key_id
    if key_id is None:
        key_id = spec.find(leasing.calls, leasing.endpoints, root, lease_key_name(row.id))
        row.provider_key_id = key_id
    if key_id is not None:
        spec.revoke(leasing.calls, leasing.endpoints, root, key_id)
    context.restart_vault_budget()
    # The minted secret has no use left: destroy its sealed copy too.
    store.destroy(row.tenant_id, lease_item(row.id))


def _account_hash(spec: DynamicSpec, root: Credentials) -> str:
    return hashlib.sha256(spec.account(root).encode()).hexdigest()


def _root_for(store: SealedStore, spec: DynamicSpec, row: DynamicLease) -> Credentials:
    """A root credential of the account the key lives in: the version that minted it, or
    the current one (that version may be deleted, or retired by a key rotation)."""
    item = item_name(row.provider)
    for version in (row.root_version, None):
        try:
            record = store.read(row.tenant_id, item, version=version)
            if record is None:
                continue
            root = open_credentials(store, row.tenant_id, row.provider, record)
        except UpstreamUnavailable:
            raise
        except (BrokerError, ValueError):
            continue  # undecryptable (a retired key version) or incomplete: try the next
        if row.root_account is None or _account_hash(spec, root) == row.root_account:
            return root
    raise NotFound("no root credential of the key's account is left")


def due_leases(leasing: Leasing, *, limit: int = SWEEP_BATCH) -> list[str]:
    """Leases whose revocation is due now (and not waiting for a retry), most overdue first."""
    now = leasing.clock()
    with unit_of_work(leasing.engine) as session:
        return list(
            session.exec(
                select(DynamicLease.id)
                .where(DynamicLease.state != "revoked")
                .where(col(DynamicLease.due_at) <= now)
                .where(
                    col(DynamicLease.next_attempt_at).is_(None)
                    | (col(DynamicLease.next_attempt_at) <= now)
                )
                .order_by(col(DynamicLease.due_at))
                .limit(limit)
            )
        )


def revoke_due(
    leasing: Leasing, *, limit: int = SWEEP_BATCH, actor: Principal = WORKER
) -> Revocations:
    """Revoke every lease that is due (the sweep): expired, requested, or to be retried."""
    return _revoke_ids(leasing, due_leases(leasing, limit=limit), actor=actor, only_if_due=True)


def _revoke_ids(
    leasing: Leasing,
    ids: Sequence[str],
    *,
    actor: Principal,
    reason: str | None = None,
    only_if_due: bool = False,
) -> Revocations:
    result = Revocations()
    if not ids:
        return result
    breaker = _Breaker()

    def one(lease_id: str) -> RevokeOutcome:
        try:
            return revoke_one(
                leasing,
                lease_id,
                actor=actor,
                reason=reason,
                only_if_due=only_if_due,
                breaker=breaker,
            )
        except BrokerError:
            # The database went away: the row keeps its state, the next sweep retries.
            return "failed"

    # A few at a time, each in a copy of this context (the audited headers).
    with ThreadPoolExecutor(SWEEP_THREADS, thread_name_prefix="lease-revoke") as pool:
        runs = [pool.submit(contextvars.copy_context().run, one, lease_id) for lease_id in ids]
        for run in runs:
            outcome = run.result()
            if outcome == "revoked":
                result.revoked += 1
            elif outcome == "failed":
                result.failed += 1
            elif outcome in ("already", "missing"):
                result.already += 1
            else:
                result.queued += 1
    return result


# -- on demand ------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Which leases: one lease, a tenant's (or one provider's of it), or a service's."""

    lease_id: str | None = None
    tenant_id: str | None = None
    provider: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        if not (self.lease_id or self.tenant_id or self.subject):
            raise ValueError("a lease, a tenant or a service subject must be named")


def _matching(selector: Selector):  # type: ignore[no-untyped-def]
    query = select(DynamicLease)
    if selector.lease_id is not None:
        query = query.where(DynamicLease.id == selector.lease_id)
    if selector.tenant_id is not None:
        query = query.where(DynamicLease.tenant_id == selector.tenant_id)
    if selector.provider is not None:
        query = query.where(DynamicLease.provider == selector.provider)
    if selector.subject is not None:
        query = query.where(DynamicLease.subject == selector.subject)
    return query


def revoke_matching(
    leasing: Leasing,
    selector: Selector,
    *,
    principal: Principal,
    reason: str,
    inline: int = INLINE_REVOCATIONS,
) -> Revocations:
    """Make every live lease matching `selector` due now, and revoke them (up to `inline`).

    Marking comes first and is committed: what this call does not finish (past the
    inline limit, a provider outage) the sweep finishes, with the same reason.
    """
    now = leasing.clock()
    with unit_of_work(leasing.engine) as session:
        ids = list(
            session.exec(
                _matching(selector)
                .with_only_columns(col(DynamicLease.id))
                .where(DynamicLease.state != "revoked")
                .order_by(col(DynamicLease.due_at))
            )
        )
        if ids:
            session.execute(
                update(DynamicLease)
                .where(col(DynamicLease.id).in_(ids))
                .where(col(DynamicLease.state) != "revoked")
                .values(due_at=now, next_attempt_at=None, revoke_reason=reason)
            )
        trail.record(
            session,
            action="lease.revoke_requested",
            resource=_selector_resource(selector),
            outcome="success",
            principal=principal,
            tenant_id=selector.tenant_id,
            detail={"reason": reason, "leases": len(ids), **_selector_detail(selector)},
        )
    result = _revoke_ids(leasing, ids[:inline], actor=principal, reason=reason)
    result.queued += max(0, len(ids) - inline)
    return result


def _selector_resource(selector: Selector) -> str:
    if selector.tenant_id is not None and selector.lease_id is not None:
        return _resource(selector.tenant_id, selector.lease_id)
    if selector.tenant_id is not None:
        return f"tenants/{selector.tenant_id}/leases"
    return "leases"


def _selector_detail(selector: Selector) -> dict[str, str]:
    return {
        name: value
        for name, value in (
            ("lease_id", selector.lease_id),
            ("provider", selector.provider),
            ("subject", selector.subject),
        )
        if value is not None
    }


def retire_for_root(leasing: Leasing, *, tenant_id: str, provider: str, reason: str) -> int:
    """The root credential changed: every lease minted from an older version is due now.

    Only marked (the sweep revokes them with the version that minted them): the save
    that rotated the root has nothing to wait for, and does not fail with this step
    (the keys then end with their leases, minutes later). Returns how many were marked.
    """
    now = leasing.clock()
    try:
        with unit_of_work(leasing.engine) as session:
            marked = session.execute(
                update(DynamicLease)
                .where(col(DynamicLease.tenant_id) == tenant_id)
                .where(col(DynamicLease.provider) == provider)
                .where(col(DynamicLease.state) != "revoked")
                .where(col(DynamicLease.due_at) > now)
                .values(due_at=now, next_attempt_at=None, revoke_reason=reason)
            )
            return int(marked.rowcount or 0)  # type: ignore[attr-defined]
    except BrokerError:
        log.warning(
            "could not mark the leases of a replaced root credential due",
            extra={"fields": {"tenant_id": tenant_id, "provider": provider}},
        )
        return 0


def revoke_before_removal(
    leasing: Leasing,
    *,
    principal: Principal,
    tenant_id: str,
    provider: str | None,
    reason: str,
) -> Revocations:
    """Revoke every lease before the root credential (or the tenant) goes.

    Once the root is deleted or shredded nothing can revoke its keys any more, so a
    key that could not be revoked stops the removal: UpstreamUnavailable, retry later.
    """
    result = revoke_matching(
        leasing,
        Selector(tenant_id=tenant_id, provider=provider),
        principal=principal,
        reason=reason,
        inline=10_000,
    )
    if result.failed or result.queued:
        raise UpstreamUnavailable(
            f"{result.failed + result.queued} dynamic keys could not be revoked yet; nothing "
            "was removed, retry later"
        )
    return result


# -- reading --------------------------------------------------------------------------


def list_leases(
    session: Session,
    *,
    tenant_id: str | None = None,
    provider: str | None = None,
    subject: str | None = None,
    state: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> list[DynamicLease]:
    """Leases filtered, in id order (page with `after`); never a secret."""
    query = select(DynamicLease)
    if tenant_id is not None:
        query = query.where(DynamicLease.tenant_id == tenant_id)
    if provider is not None:
        query = query.where(DynamicLease.provider == provider)
    if subject is not None:
        query = query.where(DynamicLease.subject == subject)
    if state == "failing":
        query = query.where(DynamicLease.state != "revoked").where(
            col(DynamicLease.revoke_attempts) > 0
        )
    elif state is not None:
        query = query.where(DynamicLease.state == state)
    if after is not None:
        query = query.where(col(DynamicLease.id) > after)
    return list(session.exec(query.order_by(col(DynamicLease.id)).limit(limit)))


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Leases by provider and state (for metrics)."""
    rows = session.exec(
        select(DynamicLease.provider, DynamicLease.state, func.count()).group_by(
            col(DynamicLease.provider), col(DynamicLease.state)
        )
    )
    return {(provider, state): int(n) for provider, state, n in rows}


__all__ = [
    "IssuedKey",
    "Leasing",
    "MintedKey",
    "Revocations",
    "Selector",
    "issue",
    "lease_item",
    "list_leases",
    "retire_for_root",
    "revoke_before_removal",
    "revoke_due",
    "revoke_matching",
    "revoke_one",
]
