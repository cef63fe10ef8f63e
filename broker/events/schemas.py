"""Request and response bodies for events, the change feed and webhook endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.models import Event, WebhookDelivery, WebhookEndpoint


class EventView(BaseModel):
    """One event: identifiers, provider, version, state, actor and time; never a secret."""

    id: int
    type: str
    at: datetime
    tenant_id: str | None
    provider: str | None
    version: int | None
    state: str | None
    actor: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: Event) -> EventView:
        """The view of an event row."""
        return cls.model_validate(event.model_dump(exclude={"txid"}))


class EventPage(BaseModel):
    """Events after the cursor given, and the cursor to ask with next."""

    events: list[EventView]
    cursor: str = Field(description="Pass as `after` on the next call.")


class EndpointCreate(BaseModel):
    """A receiver for signed deliveries."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=8,
        max_length=2000,
        description="Public https URL; checked now and again on every delivery.",
    )
    event_types: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=32, description="Types to deliver; empty for all."
    )
    # PostgreSQL text holds no NUL: refused here, not at the database.
    description: str | None = Field(default=None, max_length=200, pattern=r"^[^\x00]*$")


class EndpointView(BaseModel):
    """A registered endpoint (its secret is never shown again)."""

    id: str
    tenant_id: str | None
    url: str
    description: str | None
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> EndpointView:
        """The view of an endpoint row."""
        return cls.model_validate(endpoint.model_dump())


class EndpointCreated(EndpointView):
    """A new endpoint with its signing secret: shown this once, store it now."""

    secret: str = Field(description="The whsec_ signing secret (Standard Webhooks).")


class DeliveryView(BaseModel):
    """One event sent (or being sent) to one endpoint."""

    id: int
    event_id: int
    endpoint_id: str
    webhook_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> DeliveryView:
        """The view of a delivery row."""
        return cls.model_validate(delivery.model_dump())
