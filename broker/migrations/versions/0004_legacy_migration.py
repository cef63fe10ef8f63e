"""Progress of the legacy tenant migration (`broker migrate legacy`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATUSES = ("pending", "migrated", "skipped", "conflict", "failed", "verified", "finalized")


def upgrade() -> None:
    op.create_table(
        "legacy_migrations",
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("legacy_id", sa.String, primary_key=True),
        sa.Column("tenant_id", sa.String(63), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("credential", sa.String(20), nullable=True),
        sa.Column("kv_version", sa.Integer, nullable=True),
        sa.Column("connection_test", sa.String(20), nullable=True),
        sa.Column("settings_applied", sa.Boolean, nullable=False),
        sa.Column("settings_groups", postgresql.JSONB, nullable=False, server_default="[]"),
        sa.Column("unmapped_keys", postgresql.JSONB, nullable=False, server_default="[]"),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name="ck_legacy_migrations_status",
        ),
    )
    # No foreign key to tenants: the record of what was migrated outlives a
    # deleted tenant, like the audit trail does.
    op.create_index("ix_legacy_migrations_tenant_id", "legacy_migrations", ["tenant_id"])
    op.create_index("ix_legacy_migrations_status", "legacy_migrations", ["source", "status"])


def downgrade() -> None:
    op.drop_index("ix_legacy_migrations_status", "legacy_migrations")
    op.drop_index("ix_legacy_migrations_tenant_id", "legacy_migrations")
    op.drop_table("legacy_migrations")
