"""Migrations upgrade an empty database, and the audit trail is append-only in the database."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from broker.core.db import alembic_config, upgrade
from broker.devstack.postgres import create_database
from broker.models import SETTINGS_GROUP_COLUMNS


@pytest.fixture
def empty_database(database_url: str) -> str:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    return create_database(server, f"empty_{uuid.uuid4().hex[:10]}")


def test_upgrade_an_empty_database_then_down_and_up_again(empty_database: str) -> None:
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "tenant_settings", "audit_events", "alembic_version"} <= tables
        columns = {c["name"] for c in inspect(engine).get_columns("tenant_settings")}
        assert set(SETTINGS_GROUP_COLUMNS) <= columns
        command.downgrade(alembic_config(empty_database), "base")
        assert "tenants" not in set(inspect(engine).get_table_names())
        upgrade(empty_database)
        assert "tenants" in set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_audit_events_cannot_be_rewritten(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit_events (at, actor, actor_kind, action, resource, outcome,"
                    " detail) VALUES (now(), 'user:t', 'user', 'test', 'x', 'success', '{}')"
                )
            )
        for statement in (
            "UPDATE audit_events SET outcome = 'denied'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
