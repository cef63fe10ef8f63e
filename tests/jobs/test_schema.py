"""Alembic creates and removes procrastinate's schema; autogenerate leaves it alone."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from broker.core.db import alembic_config, upgrade
from broker.devstack.postgres import create_database
from broker.jobs.schema import owned_by_broker

TABLES = {
    "procrastinate_jobs",
    "procrastinate_workers",
    "procrastinate_events",
    "procrastinate_periodic_defers",
}


@pytest.fixture
def empty_database(database_url: str) -> str:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    return create_database(server, f"jobs_{uuid.uuid4().hex[:10]}")


def _procrastinate_objects(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT proname FROM pg_proc WHERE proname LIKE :p"
                        " UNION ALL SELECT typname FROM pg_type WHERE typname LIKE :p"
                        " UNION ALL SELECT relname FROM pg_class WHERE relname LIKE :p"
                    ),
                    {"p": "procrastinate%"},
                ).scalars()
            )
    finally:
        engine.dispose()


def test_upgrade_creates_the_queue_and_downgrade_removes_all_of_it(empty_database: str) -> None:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        command.downgrade(alembic_config(empty_database), "0004")
        assert _procrastinate_objects(empty_database) == []
        upgrade(empty_database)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_autogenerate_never_proposes_dropping_the_queue(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_name": owned_by_broker})
            diffs = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    assert not [d for d in diffs if "procrastinate_" in repr(d)]
