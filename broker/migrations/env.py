"""Alembic environment: migrations run online against the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlmodel import SQLModel

import broker.models  # noqa: F401  (registers every table on the metadata)
from broker.jobs.schema import owned_by_broker

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    """Run every pending migration in one transaction."""
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url must be set")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        # procrastinate's tables come from its own SQL (0005_job_queue), not
        # from the models: autogenerate must not offer to drop them.
        context.configure(
            connection=connection, target_metadata=target_metadata, include_name=owned_by_broker
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
