"""The legacy application's tenants table, reached through its own DSN.

The old application kept `twilio_sid` and `twilio_token` in plain columns next
to a free-form `metadata` JSON column. This module is the only code the broker
ships that reads that table, so it is also where the retired columns are
enforced: once `broker migrate legacy --finalize` has moved a tenant's
credentials into Vault and nulled its columns, asking for them again raises
`LegacyColumnsRetired` instead of quietly returning the nulls.

Table and column names are configurable; identifiers are always quoted by
SQLAlchemy, never pasted into SQL text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlmodel import col, select

from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, UpstreamUnavailable, ValidationFailed
from broker.models import LegacyMigration

__all__ = [
    "LegacyColumns",
    "LegacyColumnsRetired",
    "LegacyKey",
    "LegacyRow",
    "LegacySource",
    "LegacyTable",
]


class LegacyColumnsRetired(BrokerError, DeprecationWarning):
    """The legacy Twilio columns of a finalized tenant were retired; read Vault instead.

    Also a DeprecationWarning, so callers that already handle deprecations of
    the old schema catch it too.
    """

    status = 410
    title = "Legacy columns retired"


@dataclass(frozen=True)
class LegacyColumns:
    """Column names of the legacy tenants table."""

    id: str = "id"
    name: str = "name"
    twilio_sid: str = "twilio_sid"
    twilio_token: str = "twilio_token"  # noqa: S105 - a column name, not a secret
    metadata: str = "metadata"

    def all(self) -> tuple[str, ...]:
        """Every configured column name."""
        return (self.id, self.name, self.twilio_sid, self.twilio_token, self.metadata)


@dataclass(frozen=True)
class LegacyTable:
    """Where the legacy tenants live: a table name, optionally `schema.table`."""

    name: str = "tenants"
    columns: LegacyColumns = field(default_factory=LegacyColumns)

    @property
    def schema(self) -> str | None:
        """The schema part of a qualified name, if any."""
        return self.name.split(".", 1)[0] if "." in self.name else None

    @property
    def table(self) -> str:
        """The table part of the name."""
        return self.name.split(".", 1)[1] if "." in self.name else self.name


@dataclass(frozen=True)
class LegacyKey:
    """A legacy tenant id: the value as stored (for queries) and as text (for records)."""

    raw: Any
    text: str


@dataclass(frozen=True)
class LegacyRow:
    """One row of the legacy table. The Twilio values stay masked in every repr."""

    key: LegacyKey
    name: str | None
    twilio_sid: SecretStr | None = field(repr=False)
    twilio_token: SecretStr | None = field(repr=False)
    metadata: Any = field(repr=False)
    secrets_read: bool = True


def _driver_url(dsn: str) -> str:
    """A SQLAlchemy URL using psycopg 3, also for plain libpq-style `postgresql://` DSNs."""
    try:
        url = make_url(dsn)
    except ArgumentError:
        # The message would quote the DSN, which may carry a password.
        raise ValidationFailed("the legacy source DSN is not a valid database URL") from None
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


class LegacySource:
    """Reads (and, on finalize, retires) the legacy tenants table.

    `label` names the source in the progress table (`legacy_migrations.source`);
    it defaults to the table name as given, so the same legacy ids in two
    different tables are tracked apart.
    """

    def __init__(
        self,
        dsn: str,
        *,
        broker_engine: Engine,
        table: LegacyTable | None = None,
        label: str | None = None,
    ) -> None:
        self.table = table or LegacyTable()
        self.label = (label or self.table.name)[:200]
        self._broker = broker_engine
        self._engine = create_engine(
            _driver_url(dsn), pool_pre_ping=True, connect_args={"connect_timeout": 5}
        )
        cols = self.table.columns
        self._t = sa.table(
            self.table.table, *(sa.column(name) for name in cols.all()), schema=self.table.schema
        )
        self._id = self._t.c[cols.id]
        self._name = self._t.c[cols.name]
        self._sid = self._t.c[cols.twilio_sid]
        self._token = self._t.c[cols.twilio_token]
        self._metadata = self._t.c[cols.metadata]

    def __repr__(self) -> str:  # never the DSN: it may carry a password
        return f"LegacySource(table={self.table.name!r}, label={self.label!r})"

    def close(self) -> None:
        """Release the pooled connections to the legacy database."""
        self._engine.dispose()

    # -- reads ----------------------------------------------------------------------------

    def check(self) -> None:
        """Fail early, naming what is missing, when the table or a column does not exist."""
        with self._connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(self.table.table, schema=self.table.schema):
                raise ValidationFailed(f"legacy table {self.table.name!r} does not exist")
            present = {
                c["name"] for c in inspector.get_columns(self.table.table, self.table.schema)
            }
        missing = [name for name in self.table.columns.all() if name not in present]
        if missing:
            raise ValidationFailed(
                f"legacy table {self.table.name!r} has no column(s) {', '.join(missing)}"
            )

    def keys(self) -> list[LegacyKey]:
        """Every distinct non-null legacy id, in order (no secret column is read)."""
        query = sa.select(self._id).where(self._id.is_not(None)).distinct().order_by(self._id)
        with self._connect() as conn:
            return [LegacyKey(raw=value, text=str(value)) for (value,) in conn.execute(query)]

    def count_without_id(self) -> int:
        """How many rows have no id at all (they cannot be migrated)."""
        query = sa.select(sa.func.count()).select_from(self._t).where(self._id.is_(None))
        with self._connect() as conn:
            return int(conn.execute(query).scalar_one())

    def rows(self, keys: Sequence[LegacyKey], *, secrets: bool = True) -> list[LegacyRow]:
        """Every row with one of `keys` (duplicates included), in id order.

        With `secrets=True` the Twilio columns are read too; that raises
        LegacyColumnsRetired when any of the tenants was finalized.
        """
        if not keys:
            return []
        if secrets:
            self.refuse_retired(keys)
        columns = [self._id, self._name, self._metadata]
        if secrets:
            columns += [self._sid, self._token]
        query = (
            sa.select(*columns)
            .where(self._id.in_(sa.bindparam("ids", expanding=True)))
            .order_by(self._id)
        )
        with self._connect() as conn:
            result = conn.execute(query, {"ids": [k.raw for k in keys]})
            return [self._row(record, secrets=secrets) for record in result]

    def refuse_retired(self, keys: Iterable[LegacyKey]) -> None:
        """Raise LegacyColumnsRetired when any of `keys` belongs to a finalized tenant."""
        texts = [k.text for k in keys]
        with unit_of_work(self._broker) as session:
            retired = session.exec(
                select(LegacyMigration.legacy_id, LegacyMigration.tenant_id)
                .where(LegacyMigration.source == self.label)
                .where(col(LegacyMigration.legacy_id).in_(texts))
                .where(LegacyMigration.status == "finalized")
                .order_by(col(LegacyMigration.legacy_id))
            ).all()
        if retired:
            named = ", ".join(f"{legacy!r} (tenant {tenant})" for legacy, tenant in retired[:5])
            more = f" and {len(retired) - 5} more" if len(retired) > 5 else ""
            raise LegacyColumnsRetired(
                f"the legacy columns {self.table.columns.twilio_sid} and "
                f"{self.table.columns.twilio_token} of {named}{more} are deprecated and were "
                "retired by `broker migrate legacy --finalize`; the credentials live in the "
                "broker now (GET /v1/credentials/<tenant>/twilio)"
            )

    # -- finalize -------------------------------------------------------------------------

    def retire(self, keys: Sequence[LegacyKey]) -> int:
        """Null the Twilio columns of these tenants; returns how many rows changed."""
        if not keys:
            return 0
        statement = (
            sa.update(self._t)
            .where(self._id.in_(sa.bindparam("ids", expanding=True)))
            .where(sa.or_(self._sid.is_not(None), self._token.is_not(None)))
            .values({self._sid: None, self._token: None})
        )
        with self._connect() as conn:
            result = conn.execute(statement, {"ids": [k.raw for k in keys]})
            conn.commit()
            return int(result.rowcount)

    # -- internals ------------------------------------------------------------------------

    def _row(self, record: Any, *, secrets: bool) -> LegacyRow:
        mapping = record._mapping
        raw_id = mapping[self._id]
        name = mapping[self._name]
        return LegacyRow(
            key=LegacyKey(raw=raw_id, text=str(raw_id)),
            name=None if name is None else str(name),
            twilio_sid=_secret(mapping[self._sid]) if secrets else None,
            twilio_token=_secret(mapping[self._token]) if secrets else None,
            metadata=_decode(mapping[self._metadata]),
            secrets_read=secrets,
        )

    @contextmanager
    def _connect(self) -> Iterator[sa.Connection]:
        """A connection whose errors become broker errors (no SQL, no DSN in messages)."""
        try:
            with self._engine.connect() as conn:
                yield conn
        except OperationalError:
            raise UpstreamUnavailable("the legacy database is unavailable") from None
        except DBAPIError as exc:
            kind = type(exc.orig).__name__ if exc.orig is not None else "error"
            raise BrokerError(f"the legacy database refused a query ({kind})") from None


def _secret(value: object) -> SecretStr | None:
    return None if value is None else SecretStr(str(value))


def _decode(value: object) -> Any:
    """JSON/JSONB arrive decoded; a text column holding JSON is decoded here if it can be."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except ValueError:
            return value  # left as text; the migration reports it as unmappable
    return value
