"""The tenant-admin console's server-side sessions.

Revision ID: 0009_console
Revises: 0006_oauth
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009_console"
down_revision = "0008_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        # Only a hash of the cookie value is kept: a copy of this table signs nobody in.
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("claims", JSONB, nullable=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("oidc_state_hash", sa.String(64), nullable=True),
        sa.Column("oidc_nonce", sa.String(64), nullable=True),
        sa.Column("pkce_verifier", sa.String(128), nullable=True),
        sa.Column("next_path", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_index("ix_console_sessions_tenant_id", "console_sessions", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_tenant_id", "console_sessions")
    op.drop_index("ix_console_sessions_expires_at", "console_sessions")
    op.drop_table("console_sessions")
