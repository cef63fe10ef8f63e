"""OAuth connections: single-use connect states, and integrations that need a reconnect.

Revision ID: 0006_oauth
Revises: 0005_job_queue
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_oauth"
down_revision = "0005_job_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oauth_states",
        # Only a hash of the state is kept: a copy of this table cannot finish a connect.
        sa.Column("state_hash", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("shop", sa.String(255), nullable=False),
        sa.Column("return_url", sa.String(2000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_oauth_states_expires_at", "oauth_states", ["expires_at"])
    op.add_column(
        "integration_credentials",
        sa.Column("credential_kind", sa.String(16), nullable=False, server_default="static"),
    )
    op.add_column(
        "integration_credentials",
        sa.Column("needs_reconnect", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    # When an OAuth access token expires: what a background refresh looks for.
    op.add_column(
        "integration_credentials",
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_integration_credentials_token_expires_at",
        "integration_credentials",
        ["token_expires_at"],
        postgresql_where=sa.text("token_expires_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_integration_credentials_token_expires_at", "integration_credentials")
    op.drop_column("integration_credentials", "token_expires_at")
    op.drop_column("integration_credentials", "needs_reconnect")
    op.drop_column("integration_credentials", "credential_kind")
    op.drop_index("ix_oauth_states_expires_at", "oauth_states")
    op.drop_table("oauth_states")
