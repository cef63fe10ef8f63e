"""Requests and answers of dynamic credentials: delivery mode, leases, revocations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.integrations.providers import PROVIDERS
from broker.models import DynamicLease
from broker.tenants.schemas import TenantId

ProviderName = Annotated[
    str,
    Field(pattern=f"^({'|'.join(PROVIDERS)})$", description=f"One of: {', '.join(PROVIDERS)}."),
]
LeaseId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="A lease id.")]
Subject = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._:@/-]+$",
        description="A service's token subject.",
    ),
]
LeaseState = Literal["minting", "active", "revoked", "failing"]


class DeliveryWrite(BaseModel):
    """How services receive a provider's credentials."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["static", "dynamic"] = Field(
        description=(
            "static: the stored fields with an advisory lease. dynamic (Twilio, OpenAI): a key "
            "minted per service lease and revoked when it ends; the stored root credential "
            "never leaves the broker."
        )
    )


class LeaseView(BaseModel):
    """One lease in the registry: identifiers and times, never a secret."""

    id: str
    tenant_id: str
    provider: str
    subject: str = Field(description="The service the key was minted for.")
    provider_key_id: str | None = Field(
        description="The key's id at the provider (Twilio SK sid, OpenAI service account id)."
    )
    state: Literal["minting", "active", "revoked"]
    issued_at: datetime
    expires_at: datetime
    due_at: datetime = Field(description="When revocation is due (the end, or sooner).")
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None
    revoke_attempts: int = Field(description="Failed revocation attempts so far.")
    next_attempt_at: datetime | None
    last_error: str | None = Field(description="Class of the last failed revocation.")

    @classmethod
    def of(cls, row: DynamicLease) -> LeaseView:
        """From a registry row."""
        return cls.model_validate(row, from_attributes=True)


class TenantRevoke(BaseModel):
    """Which of the tenant's leases to revoke: all, or one provider's, service's or lease."""

    model_config = ConfigDict(extra="forbid")

    provider: ProviderName | None = None
    subject: Subject | None = None
    lease_id: LeaseId | None = None


class ServiceRevoke(BaseModel):
    """Every lease of one service, across tenants (optionally one provider's or tenant's)."""

    model_config = ConfigDict(extra="forbid")

    subject: Subject
    provider: ProviderName | None = None
    tenant_id: TenantId | None = None


class RevocationResult(BaseModel):
    """What an on-demand revocation did. Failed and queued ones are retried by the sweep."""

    revoked: int
    failed: int
    already: int = Field(description="Revoked before this request.")
    queued: int = Field(description="Marked due and left to the sweep.")
