"""Test bearer tokens, signed with the session's own key (the app under test trusts it)."""

from __future__ import annotations

import uuid

from broker.auth.tokens import mint_token

TEST_SIGNING_KEY = "test-signing-key-" + uuid.uuid4().hex
ISSUER = "tenant-secrets-broker"
AUDIENCE = "tenant-secrets-broker"


def token(
    *scopes: str,
    tenant_id: str | None = None,
    kind: str = "user",
    tenants: tuple[str, ...] = (),
    subject: str = "alice",
    key: str = TEST_SIGNING_KEY,
    audience: str | None = AUDIENCE,
    issuer: str = ISSUER,
    ttl_s: int = 3600,
    not_before_s: int = 0,
) -> str:
    """A signed test token.

    Valid for an hour by default: modules mint some at import, and a loaded machine may
    take well over ten minutes to reach their tests.
    """
    return mint_token(
        key,
        subject=subject,
        scopes=scopes,
        issuer=issuer,
        audience=audience,
        tenant_id=tenant_id,
        kind=kind,
        tenants=tenants,
        ttl_s=ttl_s,
        not_before_s=not_before_s,
    )


def bearer(jwt: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {jwt}"}
