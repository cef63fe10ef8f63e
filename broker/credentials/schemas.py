"""Responses of service credential delivery."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class CredentialLease(BaseModel):
    """A tenant's decrypted credentials, valid until `expires_at`. Never cache past it."""

    tenant_id: str
    provider: str
    version: int = Field(description="The KV version served.")
    fields: dict[str, str]
    issued_at: datetime
    expires_at: datetime
    lease_id: str | None = Field(
        default=None,
        description="Dynamic delivery: the lease the key was minted for; revoked at expires_at.",
    )


class WrapInfo(BaseModel):
    """A single-use Vault response-wrapping token; unwrap it once, directly against Vault."""

    token: str
    accessor: str
    ttl: int
    creation_time: str
    creation_path: str


class WrappedCredentialLease(BaseModel):
    """Only the wrapping token and its metadata; the lease itself is inside the wrap."""

    tenant_id: str
    provider: str
    version: int
    expires_at: datetime
    lease_id: str | None = None
    wrap: WrapInfo
