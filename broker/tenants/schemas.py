"""Request and response bodies for tenant lifecycle."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from broker.core.identifiers import TENANT_ID_PATTERN

# A tenant id names Vault paths and a Transit key: see broker/core/identifiers.py.
TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN, max_length=63)]

# Path segments under /v1/tenants that are not tenant ids.
RESERVED_IDS = frozenset({"settings"})


class TenantCreate(BaseModel):
    """A new tenant."""

    model_config = ConfigDict(extra="forbid")

    id: TenantId = Field(description="Slug used in Vault paths, e.g. `acme-shop`.")
    # No control characters: a name is shown to people, and PostgreSQL refuses NUL.
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_IDS:
            raise ValueError(f"{value!r} is reserved")
        return value


class TenantView(BaseModel):
    """A tenant as the platform sees it."""

    id: str
    name: str
    created_at: datetime
    created_by: str


class KeyRotationView(BaseModel):
    """The outcome of one tenant key rotation."""

    tenant_id: str
    key_version: int
    rewrapped: int
    already_current: int
    resumed: bool
    failed: list[str] = Field(
        default_factory=list,
        description="Items Vault would not rewrap (they never decrypted); left as they were.",
    )
