"""Service delivery: a tenant's credentials as a short lease, or wrapped for one unwrap.

An OAuth connection delivers only its access token, leased until the token's own
expiry; the refresh token never leaves the broker. An expired access token is
refreshed first (see broker/integrations/oauth.py), which needs PostgreSQL; so does
a token nothing can refresh (a Meta business token), whose reconnect mark is read
on every fetch (when PostgreSQL answers) so that a token Graph called dead is not
handed out. Otherwise
only Vault is needed on this path (a PostgreSQL outage must not stop messaging),
and every Vault call carries the service's identity in the audited headers, so
the Vault audit log names who read what. Refusals go to the broker's audit
trail as well, best effort.

A provider in "dynamic" delivery (sealed beside its credentials, so a fetch reads it
with them) never delivers the stored root credential: the service gets a key minted
for it (broker/leases), which needs PostgreSQL for the lease registry.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import anyio
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from broker.audit import denials, trail
from broker.audit.denials import DenialTally
from broker.auth.principal import Principal
from broker.core import context
from broker.core.config import Settings
from broker.core.errors import Forbidden, NotFound, RateLimited, ValidationFailed
from broker.core.ratelimit import RateLimiter
from broker.core.threads import run_on
from broker.credentials.opening import LastOpened, read_and_open
from broker.credentials.schemas import CredentialLease, WrapInfo, WrappedCredentialLease
from broker.integrations import oauth
from broker.integrations.providers import Credentials, get_provider
from broker.integrations.service import item_name
from broker.leases import service as leases
from broker.tenants.deletions import DeletionWatch
from broker.vault.errors import CiphertextRetired, StoredDataUnverified
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedRecord, SealedStore
from broker.vault.wrapping import WrappedSecret

# One answer for "not configured", "no such tenant" and "not your tenant".
NO_SUCH = "no such credentials"
_TTL = re.compile(r"^(\d{1,5})(s|m|h)?$")
_UNIT = {"s": 1, "m": 60, "h": 3600, None: 1}
# A refusal is recorded before the answer when the database is healthy; never waited on longer.
REFUSAL_RECORD_GRACE_S = 0.25
T = TypeVar("T")


@dataclass(frozen=True)
class Delivery:
    """Everything a credential fetch uses, built once with the app (see `delivery_for`)."""

    engine: Engine
    vault: VaultGateway
    deletions: DeletionWatch
    settings: Settings
    access: oauth.OAuthAccess
    leasing: leases.Leasing | None
    limiter: RateLimiter
    tally: DenialTally
    # The ciphertext each item was last opened from, so a fetch's decrypt can start with
    # its KV read (broker/credentials/opening.py).
    opened: LastOpened = field(default_factory=LastOpened)

    async def on_thread(self, threads: anyio.CapacityLimiter, work: Callable[[], T]) -> T:
        """`work()` on one of the fetch `threads`, waiting for one no longer than a request
        may spend on Vault: past that, 503 with Retry-After (`broker.core.threads`)."""
        return await run_on(
            threads,
            work,
            wait_s=self.settings.vault_retry_budget_s,
            retry_after_s=self.settings.retry_after_s,
        )


async def serve(
    delivery: Delivery,
    principal: Principal,
    *,
    tenant_id: str,
    provider: str,
    wrap_ttl: str | None,
    threads: anyio.CapacityLimiter,
) -> CredentialLease | WrappedCredentialLease:
    """`GET /v1/credentials/{tenant_id}/{provider}`: check, deliver, and answer.

    A static credential's two Vault calls (KV read, Transit decrypt) are made on the
    event loop when they can be (`VaultGateway.call_on_loop`), at the same time when
    the ciphertext can be expected (broker/credentials/opening.py); everything else
    that blocks (those calls' retries, an OAuth refresh, a dynamic key, a wrap) runs on
    `threads`, apart from the shared worker threads: a stalled database can fill
    those, and deliveries must not queue behind it.
    """
    settings = delivery.settings
    ttl_s = parse_wrap_ttl(wrap_ttl, maximum_s=settings.max_wrap_ttl_s) if wrap_ttl else None
    if not authorize(principal, tenant_id=tenant_id, provider=provider):
        await _refuse(delivery, principal, tenant_id=tenant_id, provider=provider)
    lease_s = lease_seconds(
        provider, default_s=settings.credential_lease_s, caps=settings.credential_lease_caps
    )
    try:
        delivered = await deliver(
            delivery,
            principal,
            Asked(tenant_id=tenant_id, provider=provider, lease_s=lease_s, wrap_ttl_s=ttl_s),
            threads=threads,
        )
    except StoredDataUnverified:
        # Tampering, not a delivery: its record may wait on the shared threads.
        await run_in_threadpool(
            record_unverified, delivery.engine, principal, tenant_id=tenant_id, provider=provider
        )
        raise
    return answer(delivered)


async def _refuse(
    delivery: Delivery, principal: Principal, *, tenant_id: str, provider: str
) -> None:
    """Record a fetch for a tenant outside the token, then answer as for a missing one."""
    recorded = record_refusal(
        delivery.engine,
        principal,
        tenant_id=tenant_id,
        provider=provider,
        limiter=delivery.limiter,
        tally=delivery.tally,
    )
    await trail.settle(recorded, within_s=REFUSAL_RECORD_GRACE_S)
    # The same answer as a missing tenant: a service cannot probe which exist.
    raise NotFound(NO_SUCH)


def answer(
    delivered: Lease | tuple[Lease, WrappedSecret],
) -> CredentialLease | WrappedCredentialLease:
    """The response body: the lease, or only the wrapping token and the lease's metadata."""
    if not isinstance(delivered, tuple):
        return CredentialLease.model_validate(delivered, from_attributes=True)
    lease, wrapped = delivered
    return WrappedCredentialLease(
        tenant_id=lease.tenant_id,
        provider=lease.provider,
        version=lease.version,
        expires_at=lease.expires_at,
        lease_id=lease.lease_id,
        wrap=WrapInfo.model_validate(wrapped, from_attributes=True),
    )


def parse_wrap_ttl(value: str, *, maximum_s: int) -> int:
    """`60s`, `5m`, `1h` or plain seconds, between 1 s and `maximum_s`."""
    match = _TTL.match(value.strip())
    if match is None:
        raise ValidationFailed("wrap_ttl must look like 60s, 5m or 1h")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not 1 <= seconds <= maximum_s:
        raise ValidationFailed(f"wrap_ttl must be between 1s and {maximum_s}s")
    return seconds


@dataclass(frozen=True)
class Lease:
    """Decrypted fields and how long the caller may use them."""

    tenant_id: str
    provider: str
    version: int
    fields: dict[str, str]
    issued_at: datetime
    expires_at: datetime
    lease_id: str | None = None
    """Set for a dynamic key: the lease it was minted for (revoked at `expires_at`)."""

    def __repr__(self) -> str:
        return (
            f"Lease({self.tenant_id}/{self.provider} v{self.version}, fields={sorted(self.fields)})"
        )


def lease_seconds(provider: str, *, default_s: int, caps: dict[str, int]) -> int:
    """The lease length for a provider: the default, capped per provider."""
    return min(default_s, caps.get(provider, default_s))


def authorize(principal: Principal, *, tenant_id: str, provider: str) -> bool:
    """Whether a service token may fetch this tenant's credentials (no I/O at all)."""
    get_provider(provider)
    if principal.kind != "service":
        raise Forbidden("credentials are delivered to service tokens only")
    return principal.may_serve(tenant_id)


def record_refusal(
    engine: Engine,
    principal: Principal,
    *,
    tenant_id: str,
    provider: str,
    limiter: RateLimiter | None = None,
    tally: DenialTally | None = None,
) -> threading.Event:
    """Leave a refused fetch in the broker's audit trail, on a thread of its own.

    Refusals count against the `denials` limit, per principal, like 403s: past
    it the caller gets RateLimited and the refusal is only counted, to be
    written with the others of its window as one event, so a service token
    cannot flood the trail with tenants it does not serve.
    """
    # The tenant comes from the path of a request nothing has validated yet: the trail
    # keeps it only when it names a registered tenant or reads as a plain name, never a
    # pasted token.
    resource = "tenants/{tenant_id}/integrations/" + provider
    reason = "tenant not in the service token"
    if limiter is not None and tally is not None:
        closed = tally.closed()
        try:
            limiter.hit("denials", f"who:{principal.actor}")
        except RateLimited:
            closed += tally.add(
                principal=principal,
                action="credentials.fetch",
                resource=resource,
                status=404,
                reason=reason,
            )
            raise
        finally:
            if closed:
                threading.Thread(
                    target=denials.write, args=(engine, closed), name="audit-denials", daemon=True
                ).start()
    return trail.record_in_background(
        engine,
        action="credentials.fetch",
        resource=resource,
        outcome="denied",
        principal=principal,
        claimed_tenant=tenant_id,
        detail={"reason": reason},
    )


@dataclass(frozen=True)
class Asked:
    """What one fetch asks for, once checked."""

    tenant_id: str
    provider: str
    lease_s: int
    wrap_ttl_s: int | None = None


async def deliver(
    delivery: Delivery,
    principal: Principal,
    asked: Asked,
    *,
    threads: anyio.CapacityLimiter,
) -> Lease | tuple[Lease, WrappedSecret]:
    """A lease, or a lease wrapped for one unwrap: Vault only, never the database
    (except to refresh an expired OAuth access token, or to check a Meta token's mark)."""
    if await _deleting(delivery, asked.tenant_id, threads=threads):
        raise NotFound(NO_SUCH)
    lease = await fetch(delivery, principal, asked, threads=threads)
    if asked.wrap_ttl_s is None:
        return lease
    wrapped = await delivery.on_thread(
        threads, partial(wrap, delivery.vault, lease, ttl_s=asked.wrap_ttl_s)
    )
    return lease, wrapped


async def _deleting(delivery: Delivery, tenant_id: str, *, threads: anyio.CapacityLimiter) -> bool:
    """`deletions.is_deleting`, whose wait for a due refresh happens off the event loop."""
    deletions = delivery.deletions
    refreshed = deletions.revalidate()
    if refreshed is not None:
        await delivery.on_thread(threads, partial(refreshed.wait, deletions.grace_s))
    return deletions.is_deleting(tenant_id)


async def fetch(
    delivery: Delivery,
    principal: Principal,
    asked: Asked,
    *,
    threads: anyio.CapacityLimiter,
) -> Lease:
    """Read and decrypt the current credentials and attach a lease."""
    tenant_id, provider, item = asked.tenant_id, asked.provider, item_name(asked.provider)
    context.update(tenant_id=tenant_id, action=f"credentials.fetch:{provider}")
    try:
        record, sealed = await read_and_open(
            SealedStore(delivery.vault), delivery.opened, tenant_id, item, threads=threads
        )
        if record is None:
            raise NotFound(NO_SUCH)
        if sealed is None:  # dynamic delivery: never the stored root credential
            dynamic = partial(_dynamic, delivery.leasing, principal, asked, record)
            return await delivery.on_thread(threads, dynamic)
    except (NotFound, CiphertextRetired):
        # A retired key version: the tenant's deletion has begun (see
        # broker.tenants.deletions), so there is nothing to deliver.
        raise NotFound(NO_SUCH) from None
    identifiers = {str(k): str(v) for k, v in (record.public.get("identifiers") or {}).items()}
    if record.public.get("kind") == "oauth":
        oauth_lease = partial(
            _oauth, delivery.access, principal, asked, record, sealed, identifiers
        )
        return await delivery.on_thread(threads, oauth_lease)
    creds = Credentials(provider, {**identifiers, **sealed})
    now = datetime.now(UTC)
    return Lease(
        tenant_id=tenant_id,
        provider=provider,
        version=record.version,
        fields={name: creds.reveal(name) or "" for name in sorted(creds.names())},
        issued_at=now,
        expires_at=now + timedelta(seconds=asked.lease_s),
    )


def _oauth(
    access: oauth.OAuthAccess,
    principal: Principal,
    asked: Asked,
    record: SealedRecord,
    sealed: dict[str, str],
    identifiers: dict[str, str],
) -> Lease:
    """An OAuth connection's current access token (refreshed first if it has expired)."""
    tokens, version = oauth.current_tokens(
        access,
        principal=principal,
        tenant_id=asked.tenant_id,
        provider=asked.provider,
        version=record.version,
        public=record.public,
        sealed=sealed,
    )
    issued = access.clock()
    return Lease(
        tenant_id=asked.tenant_id,
        provider=asked.provider,
        version=version,
        fields={**identifiers, "access_token": tokens.access_token},
        issued_at=issued,
        # The lease is the token's own life: past it the provider refuses the token.
        # A token that never expires (a Meta business token) gets the usual lease.
        expires_at=tokens.access_expires_at or issued + timedelta(seconds=asked.lease_s),
    )


def _dynamic(
    leasing: leases.Leasing | None,
    principal: Principal,
    asked: Asked,
    record: SealedRecord,
) -> Lease:
    """A key minted for this service (or its live one again); never the root credential."""
    if leasing is None:
        raise RuntimeError("dynamic delivery needs the lease registry")
    issued = leases.issue(
        leasing,
        principal=principal,
        tenant_id=asked.tenant_id,
        provider=asked.provider,
        lease_s=asked.lease_s,
        record=record,
    )
    return Lease(
        tenant_id=asked.tenant_id,
        provider=asked.provider,
        version=record.version,
        fields=issued.fields,
        issued_at=issued.issued_at,
        expires_at=issued.expires_at,
        lease_id=issued.lease_id,
    )


def wrap(vault: VaultGateway, lease: Lease, *, ttl_s: int) -> WrappedSecret:
    """Put the lease in a single-use wrapping token; the broker keeps no copy of it."""
    context.update(action=f"credentials.wrap:{lease.provider}")
    return vault.wrapping.wrap(
        {
            "tenant_id": lease.tenant_id,
            "provider": lease.provider,
            "version": lease.version,
            "fields": lease.fields,
            "issued_at": lease.issued_at.isoformat(),
            "expires_at": lease.expires_at.isoformat(),
            **({"lease_id": lease.lease_id} if lease.lease_id else {}),
        },
        ttl=f"{ttl_s}s",
    )


def record_unverified(
    engine: Engine, principal: Principal, *, tenant_id: str, provider: str
) -> None:
    """Record a fetch refused because the stored data did not verify (tampering)."""
    trail.record_separately(
        engine,
        action="credentials.fetch",
        resource=f"tenants/{tenant_id}/integrations/{provider}",
        outcome="failed",
        principal=principal,
        tenant_id=tenant_id,
        detail={"reason": "unverified"},
    )
