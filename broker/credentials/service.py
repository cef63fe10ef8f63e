"""Service delivery: a tenant's credentials as a short lease, or wrapped for one unwrap.

An OAuth connection delivers only its access token, leased until the token's own
expiry; the refresh token never leaves the broker. An expired access token is
refreshed first (see broker/integrations/oauth.py), the one case that needs
PostgreSQL. Otherwise only Vault is needed on this path (a PostgreSQL outage must
not stop messaging),
and every Vault call carries the service's identity in the audited headers, so
the Vault audit log names who read what. Refusals go to the broker's audit
trail as well, best effort.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import context
from broker.core.errors import Forbidden, NotFound, ValidationFailed
from broker.integrations import oauth
from broker.integrations.providers import Credentials, get_provider
from broker.integrations.service import read_sealed
from broker.vault.gateway import VaultGateway, WrappedSecret

# One answer for "not configured", "no such tenant" and "not your tenant".
NO_SUCH = "no such credentials"
_TTL = re.compile(r"^(\d{1,5})(s|m|h)?$")
_UNIT = {"s": 1, "m": 60, "h": 3600, None: 1}


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

    def __repr__(self) -> str:
        return (
            f"Lease({self.tenant_id}/{self.provider} v{self.version}, fields={sorted(self.fields)})"
        )


def lease_seconds(provider: str, *, default_s: int, caps: dict[str, int]) -> int:
    """The lease length for a provider: the default, capped per provider."""
    return min(default_s, caps.get(provider, default_s))


def authorize(engine: Engine, principal: Principal, *, tenant_id: str, provider: str) -> None:
    """Only a service token listing the tenant may fetch; others get a 404, recorded."""
    get_provider(provider)
    if principal.kind != "service":
        raise Forbidden("credentials are delivered to service tokens only")
    if not principal.may_serve(tenant_id):
        trail.record_separately(
            engine,
            action="credentials.fetch",
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="denied",
            principal=principal,
            tenant_id=tenant_id,
            detail={"reason": "tenant not in the service token"},
        )
        # The same answer as a missing tenant: a service cannot probe which exist.
        raise NotFound(NO_SUCH)


def fetch(
    vault: VaultGateway,
    *,
    tenant_id: str,
    provider: str,
    lease_s: int,
    principal: Principal,
    access: oauth.OAuthAccess,
) -> Lease:
    """Read and decrypt the current credentials and attach a lease."""
    context.update(tenant_id=tenant_id, action=f"credentials.fetch:{provider}")
    try:
        record, sealed = read_sealed(vault, tenant_id=tenant_id, provider=provider)
    except NotFound:
        raise NotFound(NO_SUCH) from None
    identifiers = {str(k): str(v) for k, v in (record.public.get("identifiers") or {}).items()}
    if record.public.get("kind") == "oauth":
        tokens, version = oauth.current_tokens(
            access,
            principal=principal,
            tenant_id=tenant_id,
            provider=provider,
            version=record.version,
            public=record.public,
            sealed=sealed,
        )
        return Lease(
            tenant_id=tenant_id,
            provider=provider,
            version=version,
            fields={**identifiers, "access_token": tokens.access_token},
            issued_at=access.clock(),
            # The lease is the token's own life: past it the provider refuses the token.
            expires_at=tokens.access_expires_at,
        )
    creds = Credentials(provider, {**identifiers, **sealed})
    now = datetime.now(UTC)
    return Lease(
        tenant_id=tenant_id,
        provider=provider,
        version=record.version,
        fields={name: creds.reveal(name) or "" for name in sorted(creds.names())},
        issued_at=now,
        expires_at=now + timedelta(seconds=lease_s),
    )


def wrap(vault: VaultGateway, lease: Lease, *, ttl_s: int) -> WrappedSecret:
    """Put the lease in a single-use wrapping token; the broker keeps no copy of it."""
    context.update(action=f"credentials.wrap:{lease.provider}")
    return vault.wrap(
        {
            "tenant_id": lease.tenant_id,
            "provider": lease.provider,
            "version": lease.version,
            "fields": lease.fields,
            "issued_at": lease.issued_at.isoformat(),
            "expires_at": lease.expires_at.isoformat(),
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
