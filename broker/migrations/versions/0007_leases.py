"""Dynamic credentials: the lease registry, and each integration's delivery mode.

Revision ID: 0007_leases
Revises: 0006_oauth
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_leases"
down_revision = "0006_oauth"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "integration_credentials",
        sa.Column("delivery_mode", sa.String(16), nullable=False, server_default="static"),
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("provider_key_id", sa.String(200), nullable=True),
        sa.Column("root_version", sa.Integer, nullable=False),
        sa.Column("root_account", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoke_reason", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(200), nullable=True),
        sa.Column("revoke_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(32), nullable=True),
    )
    # What the sweep looks for: leases not yet revoked, by when they are due.
    op.create_index(
        "ix_leases_due",
        "leases",
        ["due_at"],
        postgresql_where=sa.text("state <> 'revoked'"),
    )
    # A service's live leases (reuse and the cap), and a tenant's or a service's leases.
    op.create_index("ix_leases_owner", "leases", ["tenant_id", "provider", "subject", "state"])
    op.create_index("ix_leases_subject", "leases", ["subject"])


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_column("integration_credentials", "delivery_mode")
