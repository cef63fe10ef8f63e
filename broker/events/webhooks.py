"""Webhook endpoints: registration (signing secret in Vault), fan-out, deliveries, replay.

An endpoint belongs to one tenant (its admin registers it) or to the platform
(`tenant_id` None; it receives every tenant's events). Registration answers
with the `whsec_` signing secret exactly once; the secret is kept in Vault KV
at `webhooks/<endpoint id>` and never in PostgreSQL. The receiver's URL goes
through the guarded egress at registration (public https only) and again on
every delivery, when the connection is made.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import NotFound, ValidationFailed
from broker.events import outbox
from broker.integrations.egress import EgressClient, EgressFailed, EgressRefused
from broker.models import WebhookDelivery, WebhookEndpoint, utcnow
from broker.vault.gateway import VaultGateway

MAX_ENDPOINTS_PER_OWNER = 20


def secret_path(endpoint_id: str) -> str:
    """Where an endpoint's signing secret lives in Vault KV."""
    return f"webhooks/{endpoint_id}"


def message_id(event_id: int) -> str:
    """The Standard Webhooks message id of an event: the same on every attempt and replay."""
    return f"msg_{event_id}"


@dataclass(frozen=True)
class Registered:
    """A new endpoint and its signing secret, which is shown this once."""

    endpoint: WebhookEndpoint
    secret: str

    def __repr__(self) -> str:
        return f"Registered(endpoint={self.endpoint.id!r})"


def new_secret() -> str:
    """A Standard Webhooks symmetric secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_receiver(client: EgressClient, url: str) -> None:
    """Refuse a receiver URL the guarded egress would not call (ValidationFailed, safe text)."""
    try:
        client.check_url(url)
    except EgressRefused as exc:
        raise ValidationFailed(f"url: {exc}") from None
    except EgressFailed as exc:
        raise ValidationFailed(f"url: {exc}") from None


def check_event_types(types: Sequence[str]) -> list[str]:
    """The filter as stored: known types only, each once, sorted."""
    unknown = [t for t in types if t not in outbox.EVENT_TYPES]
    if unknown:
        raise ValidationFailed(
            f"event_types: unknown type(s); known are {', '.join(sorted(outbox.EVENT_TYPES))}"
        )
    return sorted(set(types))


def register(
    engine: Engine,
    vault: VaultGateway,
    client: EgressClient,
    *,
    principal: Principal,
    tenant_id: str | None,
    url: str,
    event_types: Sequence[str],
    description: str | None,
) -> Registered:
    """Check the URL, store a new signing secret in Vault, then record the endpoint."""
    types = check_event_types(event_types)
    check_receiver(client, url)
    with unit_of_work(engine) as session:
        if tenant_id is not None:
            from broker.integrations.service import live_tenant

            live_tenant(session, tenant_id)
        count = len(list(session.exec(select(WebhookEndpoint.id).where(_owned(tenant_id)))))
        if count >= MAX_ENDPOINTS_PER_OWNER:
            raise ValidationFailed(f"at most {MAX_ENDPOINTS_PER_OWNER} endpoints per owner")
    endpoint_id = "ep_" + uuid.uuid4().hex
    secret = new_secret()
    # Vault first: an endpoint row without its secret could never sign a delivery.
    vault.kv.write(secret_path(endpoint_id), {"secret": secret}, cas=0)
    try:
        with unit_of_work(engine) as session:
            endpoint = WebhookEndpoint(
                id=endpoint_id,
                tenant_id=tenant_id,
                url=url,
                description=description,
                event_types=types,
                created_by=principal.actor,
            )
            session.add(endpoint)
            trail.record(
                session,
                action="webhook.register",
                resource=_resource(tenant_id, endpoint_id),
                outcome="success",
                principal=principal,
                tenant_id=tenant_id,
                detail={"event_types": ",".join(types) or "*"},
            )
            session.flush()
            view = WebhookEndpoint.model_validate(endpoint.model_dump())
    except BaseException:
        vault.kv.destroy(secret_path(endpoint_id))
        raise
    return Registered(view, secret)


@dataclass(frozen=True)
class Owner:
    """Who acts on endpoints, and whose endpoints they are: a tenant's, or the platform's (None).

    Every change to one endpoint goes through `change`, which finds the endpoint among
    the owner's (another owner's is NotFound like a missing one) and records the change.
    """

    principal: Principal
    tenant_id: str | None

    @contextmanager
    def change(
        self,
        engine: Engine,
        endpoint_id: str,
        *,
        action: str,
        detail: dict[str, Any] | None = None,
    ) -> Iterator[tuple[Session, WebhookEndpoint]]:
        """One unit of work on the owner's endpoint, recorded in the trail when it succeeds."""
        with unit_of_work(engine) as session:
            endpoint = get_endpoint(session, tenant_id=self.tenant_id, endpoint_id=endpoint_id)
            yield session, endpoint
            trail.record(
                session,
                action=action,
                resource=_resource(self.tenant_id, endpoint_id),
                outcome="success",
                principal=self.principal,
                tenant_id=self.tenant_id,
                detail=detail,
            )


def _owned(tenant_id: str | None) -> ColumnElement[bool]:
    if tenant_id is None:
        return col(WebhookEndpoint.tenant_id).is_(None)
    return col(WebhookEndpoint.tenant_id) == tenant_id


def _resource(tenant_id: str | None, endpoint_id: str) -> str:
    owner = f"tenants/{tenant_id}" if tenant_id else "platform"
    return f"{owner}/webhooks/{endpoint_id}"


def list_endpoints(session: Session, *, tenant_id: str | None) -> list[WebhookEndpoint]:
    """An owner's endpoints (the platform's when `tenant_id` is None), oldest first."""
    return list(
        session.exec(
            select(WebhookEndpoint)
            .where(_owned(tenant_id))
            .order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))
        )
    )


def get_endpoint(session: Session, *, tenant_id: str | None, endpoint_id: str) -> WebhookEndpoint:
    """One of the owner's endpoints; another owner's is NotFound like a missing one."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFound("no such webhook endpoint")
    return endpoint


def delete_endpoint(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str | None,
    endpoint_id: str,
) -> None:
    """Remove an endpoint, its deliveries and its signing secret."""
    owner = Owner(principal, tenant_id)
    with owner.change(engine, endpoint_id, action="webhook.delete") as (session, endpoint):
        session.delete(endpoint)
    forget_secrets(vault, [endpoint_id])


def endpoint_ids(session: Session, *, tenant_id: str) -> list[str]:
    """The ids of a tenant's endpoints (to forget their secrets when the tenant goes)."""
    return list(session.exec(select(WebhookEndpoint.id).where(_owned(tenant_id))))


def forget_secrets(vault: VaultGateway, endpoint_ids: Sequence[str]) -> None:
    """Destroy the signing secrets of endpoints that are gone."""
    for endpoint_id in endpoint_ids:
        with _SECRETS_LOCK:
            _SECRETS.pop(endpoint_id, None)
        vault.kv.destroy(secret_path(endpoint_id))


# Signing secrets a worker read recently: a secret never changes for its endpoint, so a
# burst of deliveries costs one Vault read, not one each. Kept briefly, in memory only.
_SECRETS: dict[str, tuple[float, str]] = {}
_SECRETS_LOCK = threading.Lock()
SECRET_CACHE_S = 300.0
_SECRET_CACHE_MAX = 10_000


def signing_secret(vault: VaultGateway, endpoint_id: str) -> str | None:
    """An endpoint's signing secret from Vault (or read within the last minutes); None if gone."""
    now = time.monotonic()
    with _SECRETS_LOCK:
        cached = _SECRETS.get(endpoint_id)
    if cached is not None and now - cached[0] < SECRET_CACHE_S:
        return cached[1]
    entry = vault.kv.read(secret_path(endpoint_id))
    if entry is None or not isinstance(entry.data.get("secret"), str):
        return None
    secret = str(entry.data["secret"])
    with _SECRETS_LOCK:
        if len(_SECRETS) >= _SECRET_CACHE_MAX:
            _SECRETS.clear()
        _SECRETS[endpoint_id] = (now, secret)
    return secret


def enable_endpoint(
    engine: Engine, *, principal: Principal, tenant_id: str | None, endpoint_id: str
) -> WebhookEndpoint:
    """Turn a disabled endpoint back on (its failed deliveries can then be replayed)."""
    owner = Owner(principal, tenant_id)
    with owner.change(engine, endpoint_id, action="webhook.enable") as (session, endpoint):
        endpoint.enabled = True
        endpoint.disabled_reason = None
        endpoint.disabled_at = None
        session.add(endpoint)
    return endpoint


def list_deliveries(
    session: Session,
    *,
    tenant_id: str | None,
    endpoint_id: str,
    status: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[WebhookDelivery]:
    """An endpoint's deliveries, newest first, paged by the last id seen."""
    get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(col(WebhookDelivery.id).desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if before is not None:
        query = query.where(col(WebhookDelivery.id) < before)
    return list(session.exec(query))


def replay(
    engine: Engine,
    *,
    principal: Principal,
    tenant_id: str | None,
    endpoint_id: str,
    delivery_id: int,
) -> WebhookDelivery:
    """Send a delivery again now, with the same `webhook-id` (the receiver may have lost it)."""
    from broker.events.delivery import queue_attempt

    owner = Owner(principal, tenant_id)
    detail = {"delivery_id": delivery_id}
    with owner.change(engine, endpoint_id, action="webhook.replay", detail=detail) as (
        session,
        endpoint,
    ):
        if not endpoint.enabled:
            raise ValidationFailed("the endpoint is disabled; enable it first")
        delivery = session.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .with_for_update()
        ).first()
        if delivery is None:
            raise NotFound("no such delivery")
        delivery.status = "pending"
        delivery.next_attempt_at = utcnow()
        session.add(delivery)
        queue_attempt(session, delivery_id, expect=delivery.attempts, delay_s=None)
        return WebhookDelivery.model_validate(delivery.model_dump())
