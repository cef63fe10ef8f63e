"""Payment profiles (Stripe customer, payout summary) and tokenized payment methods.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payment_profiles",
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("stripe_customer_id", sa.String(100), nullable=True),
        sa.Column("payout_method", sa.String(32), nullable=True),
        sa.Column("payout_hint", sa.String(100), nullable=True),
        sa.Column("payout_version", sa.Integer, nullable=False),
        sa.Column("payout_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payout_updated_by", sa.String(200), nullable=True),
        sa.Column("payout_sync_pending", sa.Boolean, nullable=False),
    )
    op.create_table(
        "payment_methods",
        sa.Column(
            "tenant_id",
            sa.String(63),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("brand", sa.String(32), nullable=False),
        sa.Column("last4", sa.String(4), nullable=False),
        sa.Column("exp_month", sa.Integer, nullable=False),
        sa.Column("exp_year", sa.Integer, nullable=False),
        sa.Column("is_default", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    # At most one default card per tenant, enforced where races cannot slip past.
    op.create_index(
        "ux_payment_methods_one_default",
        "payment_methods",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("is_default"),
    )


def downgrade() -> None:
    op.drop_index("ux_payment_methods_one_default", "payment_methods")
    op.drop_table("payment_methods")
    op.drop_table("payment_profiles")
