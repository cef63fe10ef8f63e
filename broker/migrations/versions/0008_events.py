"""Events: the outbox, webhook endpoints and deliveries, credential health and age.

Revision ID: 0008_events
Revises: 0006_oauth
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008_events"
down_revision = "0007_leases"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    _create_events()
    _create_webhooks()
    _create_health_checks()
    _add_health_and_age_columns()


def _create_events() -> None:
    """The outbox: every change, in commit order, for the feed and the webhooks."""
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, primary_key=True),
        # The writing transaction: the feed serves an event only once every older
        # transaction has ended, so a cursor never passes one that commits late.
        sa.Column(
            "txid",
            sa.BigInteger,
            nullable=False,
            server_default=sa.text("pg_current_xact_id()::text::bigint"),
        ),
        sa.Column("at", _TS, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=True),
        sa.Column("provider", sa.String(32), nullable=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("state", sa.String(32), nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("detail", postgresql.JSONB, nullable=False),
    )
    op.create_index("ix_events_txid_id", "events", ["txid", "id"])
    op.create_index("ix_events_tenant_id", "events", ["tenant_id", "txid", "id"])


def _create_webhooks() -> None:
    """Webhook endpoints, and one delivery per event and endpoint."""
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("description", sa.String(200), nullable=True),
        sa.Column("event_types", postgresql.JSONB, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("disabled_reason", sa.String(300), nullable=True),
        sa.Column("disabled_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    op.create_index("ix_webhook_endpoints_tenant_id", "webhook_endpoints", ["tenant_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column(
            "endpoint_id",
            sa.String(40),
            sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("webhook_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("last_attempt_at", _TS, nullable=True),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
    )
    op.create_index("ix_webhook_deliveries_event_id", "webhook_deliveries", ["event_id"])
    op.create_index("ix_webhook_deliveries_endpoint_id", "webhook_deliveries", ["endpoint_id"])


def _create_health_checks() -> None:
    """The history of stored credentials' health checks."""
    op.create_table(
        "credential_health_checks",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(300), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
    )
    op.create_index(
        "ix_credential_health_checks_tenant_id",
        "credential_health_checks",
        ["tenant_id", "provider", "at"],
    )


def _add_health_and_age_columns() -> None:
    """Each credential's health verdict and its age (first stored, last rotated)."""
    for column in (
        sa.Column("health_state", sa.String(20), nullable=False, server_default="unknown"),
        sa.Column("health_reason", sa.String(300), nullable=True),
        sa.Column("health_checked_at", _TS, nullable=True),
        sa.Column("health_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_stored_at", _TS, nullable=True),
        sa.Column("rotated_at", _TS, nullable=True),
        sa.Column("age_notice", sa.String(16), nullable=True),
    ):
        op.add_column("integration_credentials", column)
    # Existing credentials: their last change is the best known age.
    op.execute(
        "UPDATE integration_credentials SET first_stored_at = updated_at, rotated_at = updated_at"
        " WHERE configured"
    )


def downgrade() -> None:
    for name in (
        "age_notice",
        "rotated_at",
        "first_stored_at",
        "health_failures",
        "health_checked_at",
        "health_reason",
        "health_state",
    ):
        op.drop_column("integration_credentials", name)
    op.drop_table("credential_health_checks")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_table("events")
