"""Integration credential metadata, key rotation progress, tenant deletion marker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("deleting_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "integration_credentials",
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("provider", sa.String(32), primary_key=True),
        sa.Column("configured", sa.Boolean, nullable=False),
        sa.Column("kv_version", sa.Integer, nullable=False),
        sa.Column("hints", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("identifiers", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("connection_test_skipped", sa.Boolean, nullable=False),
        sa.Column("last_test_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_test_ok", sa.Boolean, nullable=True),
        sa.Column("last_test_code", sa.String(32), nullable=True),
        sa.Column("last_test_reason", sa.String(300), nullable=True),
        sa.Column("vault_sync_pending", sa.Boolean, nullable=False),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "key_rotations",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("target_version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("rewrapped", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_by", sa.String(200), nullable=False),
    )
    op.create_index("ix_key_rotations_tenant_id", "key_rotations", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_key_rotations_tenant_id", "key_rotations")
    op.drop_table("key_rotations")
    op.drop_table("integration_credentials")
    op.drop_column("tenants", "deleting_at")
