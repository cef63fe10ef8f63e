"""Every SQLModel table, in one place, so Alembic and readers find them together."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

SETTINGS_GROUP_COLUMNS = (
    "notification_settings",
    "feature_flags",
    "business_hours",
    "integrations_status",
    "branding",
    "compliance_settings",
    "rate_limits",
    "webhooks",
    "localization",
    "analytics",
    "ai_bot",
    "catalog",
    "orders",
    "messaging",
    "appointments",
    "integration_sync",
)


def utcnow() -> datetime:
    """Aware UTC now; every timestamp the broker writes is aware."""
    return datetime.now(UTC)


def _ts(**kwargs: Any) -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), **kwargs))


def _group() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))


class Tenant(SQLModel, table=True):
    """A shop on the platform. Its id names its Vault paths and Transit key."""

    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=63)
    name: str = Field(max_length=200)
    created_at: datetime = _ts(nullable=False)
    created_by: str = Field(max_length=200)
    # Set when crypto-shredding starts; a tenant being deleted accepts no writes.
    deleting_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class TenantSettings(SQLModel, table=True):
    """Non-sensitive preferences, one JSONB column per settings group.

    `version` is the optimistic-concurrency counter behind the ETag.
    """

    __tablename__ = "tenant_settings"

    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    )
    version: int = Field(default=1)
    updated_at: datetime = _ts(nullable=False)
    updated_by: str | None = Field(default=None, max_length=200)

    notification_settings: dict[str, Any] = _group()
    feature_flags: dict[str, Any] = _group()
    business_hours: dict[str, Any] = _group()
    integrations_status: dict[str, Any] = _group()
    branding: dict[str, Any] = _group()
    compliance_settings: dict[str, Any] = _group()
    rate_limits: dict[str, Any] = _group()
    webhooks: dict[str, Any] = _group()
    localization: dict[str, Any] = _group()
    analytics: dict[str, Any] = _group()
    ai_bot: dict[str, Any] = _group()
    catalog: dict[str, Any] = _group()
    orders: dict[str, Any] = _group()
    messaging: dict[str, Any] = _group()
    appointments: dict[str, Any] = _group()
    integration_sync: dict[str, Any] = _group()


class AuditEvent(SQLModel, table=True):
    """One entry of the broker's append-only audit trail.

    A database trigger (see the migration) refuses UPDATE and DELETE, so the
    trail cannot be rewritten through the broker's own connection. Events keep
    no foreign key: they outlive the tenant they describe.
    """

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    at: datetime = _ts(nullable=False, index=True)
    actor: str = Field(max_length=200)
    actor_kind: str = Field(max_length=20)
    tenant_id: str | None = Field(default=None, max_length=63, index=True)
    action: str = Field(max_length=100)
    resource: str = Field(max_length=300)
    outcome: str = Field(max_length=20)
    request_id: str | None = Field(default=None, max_length=100, index=True)
    client_addr: str | None = Field(default=None, max_length=100)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))


class IntegrationCredential(SQLModel, table=True):
    """What PostgreSQL knows about one provider's credentials: never the secrets.

    The secrets live in Vault (KV v2 at `tenants/<id>/integrations/<provider>`,
    one Transit ciphertext). This row holds the non-secret identifiers (store
    URL, shop domain), the masked hints, the KV version it describes, who
    changed it, and the last connection test.

    `vault_sync_pending` is the write-ahead marker: it is committed *before*
    Vault is written and cleared in the same transaction that records the new
    version. A row left pending (crash, database loss) is reconciled from
    Vault, whose KV data carries the same hints, before anyone trusts it.
    """

    __tablename__ = "integration_credentials"

    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    )
    provider: str = Field(primary_key=True, max_length=32)
    configured: bool = Field(default=False)
    kv_version: int = Field(default=0)
    hints: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    identifiers: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False)
    )
    updated_at: datetime = _ts(nullable=False)
    updated_by: str | None = Field(default=None, max_length=200)
    connection_test_skipped: bool = Field(default=False)
    last_test_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_test_ok: bool | None = None
    last_test_code: str | None = Field(default=None, max_length=32)
    last_test_reason: str | None = Field(default=None, max_length=300)
    vault_sync_pending: bool = Field(default=False)
    pending_since: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # "static" (pasted by an admin) or "oauth" (connected through the provider's consent).
    credential_kind: str = Field(default="static", max_length=16)
    # The provider refused the refresh token (invalid_grant): only a new connect helps.
    needs_reconnect: bool = Field(default=False)
    # When the OAuth access token in Vault expires (None for static credentials).
    token_expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # How services receive it: "static" (the stored fields) or "dynamic" (a key minted per
    # lease from them, see broker/leases). Sealed with the credentials in Vault too, where
    # a fetch reads it: the root credential is never delivered on a stale view.
    delivery_mode: str = Field(default="static", max_length=16)
    # Scheduled health (broker/credential_health): healthy | failing | needs_reconnect,
    # or unknown before the first check.
    health_state: str = Field(default="unknown", max_length=20)
    health_reason: str | None = Field(default=None, max_length=300)
    health_checked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # Failed checks in a row; the state flips to failing only after a retry fails too.
    health_failures: int = Field(default=0)
    # Age (issue 16): when a credential was first stored, and when its secret last changed.
    first_stored_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    rotated_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # The last age reminder announced for this version: due | overdue | expiring | expired.
    age_notice: str | None = Field(default=None, max_length=16)


class OAuthState(SQLModel, table=True):
    """One pending OAuth connect: single-use, short-lived, bound to tenant, admin and shop.

    Only the SHA-256 of the `state` parameter is stored.
    """

    __tablename__ = "oauth_states"

    state_hash: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    )
    provider: str = Field(max_length=32)
    actor: str = Field(max_length=200)
    shop: str = Field(max_length=255)
    return_url: str = Field(max_length=2000)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    used_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class DynamicLease(SQLModel, table=True):
    """One key minted for a service from a tenant's root credential: never a secret.

    The row is registered (`minting`) and committed before the provider is asked, so a
    key minted and then lost (a crash, a timeout) is still found by its name and
    revoked. `due_at` is when revocation is due: the lease's end, or sooner on demand.
    The minted secret is sealed in Vault (`tenants/<id>/leases/<lease id>`).
    """

    __tablename__ = "leases"

    id: str = Field(primary_key=True, max_length=32)
    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    )
    provider: str = Field(max_length=32)
    subject: str = Field(max_length=200)
    """The service the key was minted for (its token's subject)."""
    provider_key_id: str | None = Field(default=None, max_length=200)
    root_version: int
    """The KV version of the root credential that minted it (and will revoke it)."""
    root_account: str | None = Field(default=None, max_length=64)
    """SHA-256 of the account the key lives in (Twilio account, OpenAI project): only a
    root credential of that account may revoke it."""
    state: str = Field(default="minting", max_length=16)  # minting | active | revoked
    issued_at: datetime = _ts(nullable=False)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    due_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoke_reason: str | None = Field(default=None, max_length=32)
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoked_by: str | None = Field(default=None, max_length=200)
    revoke_attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_error: str | None = Field(default=None, max_length=32)
    """The class of the last failed revocation (timeout, rate_limited...), never a body."""


class KeyRotation(SQLModel, table=True):
    """Progress of one tenant key rotation, so an interrupted rotation resumes."""

    __tablename__ = "key_rotations"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    tenant_id: str = Field(
        sa_column=Column(
            String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    target_version: int
    status: str = Field(max_length=20)  # running | done
    rewrapped: int = Field(default=0)
    started_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    started_by: str = Field(max_length=200)


class PaymentProfile(SQLModel, table=True):
    """A tenant's billing identity and payout summary: references and hints only.

    `stripe_customer_id` is a reference; the platform key that could act on it
    lives only in Vault (`platform/stripe`). Payout details are sealed in Vault
    (`tenants/<id>/payout`); here are only the method and a masked hint, with
    the same pending-mark protocol as integration credentials.
    """

    __tablename__ = "payment_profiles"

    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    )
    stripe_customer_id: str | None = Field(default=None, max_length=100)
    payout_method: str | None = Field(default=None, max_length=32)
    payout_hint: str | None = Field(default=None, max_length=100)
    payout_version: int = Field(default=0)
    payout_updated_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    payout_updated_by: str | None = Field(default=None, max_length=200)
    payout_sync_pending: bool = Field(default=False)


class PaymentMethod(SQLModel, table=True):
    """A tokenized card reference from Stripe: never a card number, CVC or PIN."""

    __tablename__ = "payment_methods"

    tenant_id: str = Field(
        sa_column=Column(String(63), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    )
    id: str = Field(primary_key=True, max_length=100)
    brand: str = Field(max_length=32)
    last4: str = Field(max_length=4)
    exp_month: int
    exp_year: int
    is_default: bool = Field(default=False)
    created_at: datetime = _ts(nullable=False)
    created_by: str = Field(max_length=200)


class LegacyMigration(SQLModel, table=True):
    """Progress of migrating one legacy tenant row (see `broker.legacy`).

    One row per legacy id and source table, so an interrupted run resumes and a
    rerun changes nothing. Nothing secret-derived is kept here, not even a
    fingerprint: verification re-reads Vault and compares against the source.
    `unmapped_keys` holds metadata key names and reasons, never values.
    """

    __tablename__ = "legacy_migrations"

    source: str = Field(primary_key=True, max_length=200)
    legacy_id: str = Field(sa_column=Column(String, primary_key=True))
    tenant_id: str | None = Field(default=None, max_length=63, index=True)
    # pending | migrated | skipped | conflict | failed | verified | finalized
    status: str = Field(max_length=20)
    # stored | unchanged | absent | incomplete | invalid | conflict
    credential: str | None = Field(default=None, max_length=20)
    kv_version: int | None = None
    connection_test: str | None = Field(default=None, max_length=20)
    settings_applied: bool = Field(default=False)
    settings_groups: list[str] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False)
    )
    unmapped_keys: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False)
    )
    attempts: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=500)
    run_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    verified_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    finalized_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class ConsoleSession(SQLModel, table=True):
    """One browser's console session: a server-side reference, never a bearer token.

    The cookie holds a random value; only its SHA-256 is kept here, so a copy of this
    table signs nobody in. A `pending` row belongs to a browser that has not signed in
    yet (it carries the sign-in form's CSRF token and, for OpenID Connect, the state,
    nonce and PKCE verifier of the one login under way); `active` rows hold the claims
    of the token that signed the user in, from which each request rebuilds the
    principal, and end at that token's expiry at the latest.
    """

    __tablename__ = "console_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=16)  # pending | active
    csrf_token: str = Field(max_length=64)
    claims: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    tenant_id: str | None = Field(
        default=None,
        sa_column=Column(
            String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True, index=True
        ),
    )
    oidc_state_hash: str | None = Field(default=None, max_length=64)
    oidc_nonce: str | None = Field(default=None, max_length=64)
    pkce_verifier: str | None = Field(default=None, max_length=128)
    next_path: str | None = Field(default=None, max_length=300)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True)
    )


class Event(SQLModel, table=True):
    """One credential or tenant event, in the outbox (see `broker.events`).

    Written in the transaction of the change it describes, so an event exists
    exactly when its change committed. It never carries a secret: ids, provider,
    version, state, actor, time. `txid` is the writing transaction's id; the
    change feed orders by it so a reader never skips an event whose transaction
    committed late. No foreign key: events outlive the tenant they describe.
    """

    __tablename__ = "events"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    txid: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger, nullable=False, server_default=text("pg_current_xact_id()::text::bigint")
        ),
    )
    at: datetime = _ts(nullable=False)
    type: str = Field(max_length=64)
    tenant_id: str | None = Field(default=None, max_length=63, index=True)
    provider: str | None = Field(default=None, max_length=32)
    version: int | None = None
    state: str | None = Field(default=None, max_length=32)
    actor: str = Field(max_length=200)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))


class WebhookEndpoint(SQLModel, table=True):
    """A receiver of signed event deliveries: a tenant's own, or the platform's (no tenant).

    Its signing secret lives in Vault (KV `webhooks/<id>`), never here.
    """

    __tablename__ = "webhook_endpoints"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str | None = Field(
        default=None,
        sa_column=Column(
            String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True, index=True
        ),
    )
    url: str = Field(max_length=2000)
    description: str | None = Field(default=None, max_length=200)
    # Event types delivered; empty means every type.
    event_types: list[str] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    enabled: bool = Field(default=True)
    disabled_reason: str | None = Field(default=None, max_length=300)
    disabled_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = _ts(nullable=False)
    created_by: str = Field(max_length=200)


class WebhookDelivery(SQLModel, table=True):
    """One event sent to one endpoint: its attempts and outcome.

    `webhook_id` is the Standard Webhooks message id: the same on every attempt
    and on a replay, so the receiver can drop duplicates.
    """

    __tablename__ = "webhook_deliveries"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    event_id: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    endpoint_id: str = Field(
        sa_column=Column(
            String(40),
            ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    webhook_id: str = Field(max_length=64)
    # pending | delivered | failed (retries exhausted, or the endpoint is disabled)
    status: str = Field(default="pending", max_length=20)
    attempts: int = Field(default=0)
    created_at: datetime = _ts(nullable=False)
    last_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    next_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=300)
    delivered_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class HealthCheck(SQLModel, table=True):
    """One scheduled (or requested) check of stored credentials: the health history."""

    __tablename__ = "credential_health_checks"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    tenant_id: str = Field(
        sa_column=Column(
            String(63), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    provider: str = Field(max_length=32)
    at: datetime = _ts(nullable=False)
    ok: bool
    code: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=300)
    # The state after this check.
    state: str = Field(max_length=20)
