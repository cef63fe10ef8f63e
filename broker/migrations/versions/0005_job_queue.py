"""The durable job queue: procrastinate's schema.

procrastinate has no Alembic support, so this revision applies the schema SQL
of the installed package. A later procrastinate whose schema changes needs a
revision of its own applying the package's migration files in between; that
is why pyproject.toml pins the minor version.

Revision ID: 0005_job_queue
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

from broker.jobs import schema

revision = "0005_job_queue"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema.create(op.get_bind())


def downgrade() -> None:
    schema.drop(op.get_bind())
