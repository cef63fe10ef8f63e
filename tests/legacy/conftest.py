"""A legacy `tenants` table in a real PostgreSQL, as the old application left it.

Each test gets its own schema (`legacy_<hex>.tenants`) in the session's
database, so the broker's own `tenants` table is never in the way; one fixture
also puts the table in a separate database.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from broker.devstack.postgres import create_database
from broker.legacy.source import LegacyColumns, LegacySource, LegacyTable
from tests.support.cli import broker_env

LEGACY_DDL = """
CREATE TABLE {table} (
    pk serial PRIMARY KEY,          -- the old app's surrogate key; ids may repeat
    {c.id} text,
    {c.name} text,
    {c.twilio_sid} text,
    {c.twilio_token} text,
    {c.metadata} jsonb
)
"""


def twilio_pair() -> tuple[str, str]:
    """A realistic, format-valid Twilio account SID and auth token."""
    return "AC" + secrets.token_hex(16), secrets.token_hex(16)


@dataclass
class LegacyDb:
    """The legacy table: where it is, and helpers to fill and inspect it."""

    url: str
    table: str
    engine: Engine
    columns: LegacyColumns = field(default_factory=LegacyColumns)
    opened: list[LegacySource] = field(default_factory=list)

    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows (keys: id, name, twilio_sid, twilio_token, metadata)."""
        c = self.columns
        payload = [
            {
                "id": row.get("id"),
                "name": row.get("name"),
                "twilio_sid": row.get("twilio_sid"),
                "twilio_token": row.get("twilio_token"),
                "metadata": None if row.get("metadata") is None else json.dumps(row["metadata"]),
            }
            for row in rows
        ]
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {self.table} ({c.id}, {c.name}, {c.twilio_sid},"  # noqa: S608 - own names
                    f" {c.twilio_token}, {c.metadata}) VALUES"
                    " (:id, :name, :twilio_sid, :twilio_token, CAST(:metadata AS jsonb))"
                ),
                payload,
            )

    def rows(self) -> list[dict[str, Any]]:
        """Every row, in insertion order, under the default column names."""
        c = self.columns
        with self.engine.connect() as conn:
            result = conn.execute(
                text(
                    f"SELECT {c.id} AS id, {c.name} AS name, {c.twilio_sid} AS twilio_sid,"  # noqa: S608 - own names
                    f" {c.twilio_token} AS twilio_token, {c.metadata} AS metadata"
                    f" FROM {self.table} ORDER BY pk"
                )
            )
            return [dict(r._mapping) for r in result]

    def set_twilio(
        self, legacy_id: str, *, sid: str | None = None, token: str | None = None
    ) -> None:
        """What the still-live old application does: change a tenant's Twilio columns."""
        c = self.columns
        values = {c.twilio_sid: sid, c.twilio_token: token}
        assignments = ", ".join(f"{name} = :{name}" for name, v in values.items() if v is not None)
        statement = f"UPDATE {self.table} SET {assignments} WHERE {c.id} = :legacy_id"  # noqa: S608 - own names
        self.execute(statement, legacy_id=legacy_id, **{k: v for k, v in values.items() if v})

    def cli_options(self) -> list[str]:
        """The `broker migrate legacy` options naming this table and its columns."""
        c = self.columns
        return [
            "--source-dsn",
            self.url.replace("postgresql+psycopg://", "postgresql://"),  # a plain libpq-style DSN
            "--table",
            self.table,
            *("--id-column", c.id, "--name-column", c.name),
            *("--sid-column", c.twilio_sid, "--token-column", c.twilio_token),
            *("--metadata-column", c.metadata),
        ]

    def execute(self, statement: str, **params: Any) -> None:
        """Run one statement against the legacy database."""
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def source(self, broker_engine: Engine) -> LegacySource:
        """The broker's reader for this table (closed when the test ends)."""
        source = LegacySource(
            self.url, broker_engine=broker_engine, table=LegacyTable(self.table, self.columns)
        )
        self.opened.append(source)
        return source


def _legacy_in(
    url: str, schema: str | None, table: str = "tenants", columns: LegacyColumns | None = None
) -> Iterator[LegacyDb]:
    engine = create_engine(url)
    columns = columns or LegacyColumns()
    table = f"{schema}.{table}" if schema else table
    with engine.begin() as conn:
        if schema:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(LEGACY_DDL.format(table=table, c=columns)))
    db = LegacyDb(url=url, table=table, engine=engine, columns=columns)
    try:
        yield db
    finally:
        for source in db.opened:
            source.close()
        with engine.begin() as conn:
            if schema:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            else:
                conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


@pytest.fixture
def legacy(database_url: str) -> Iterator[LegacyDb]:
    """A legacy table in its own schema of the broker's database."""
    yield from _legacy_in(database_url, f"legacy_{uuid.uuid4().hex[:10]}")


OLD_APP_COLUMNS = LegacyColumns(
    id="shop_code",
    name="display_name",
    twilio_sid="sms_account",
    twilio_token="sms_secret",
    metadata="extra",
)


@pytest.fixture
def legacy_elsewhere(database_url: str) -> Iterator[LegacyDb]:
    """A legacy `shops` table, with its own column names, in a database of its own."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    name = f"legacy_app_{uuid.uuid4().hex[:10]}"
    url = create_database(server, name)
    yield from _legacy_in(url, None, "shops", OLD_APP_COLUMNS)
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture
def prefix() -> str:
    """Keeps this test's tenant ids apart from every other test's."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cli_services: dict[str, str],
) -> Iterator[None]:
    """The broker's configuration for the CLI: the session's PostgreSQL and Vault."""
    with broker_env(monkeypatch, tmp_path, **cli_services):
        yield
