"""Helpers the legacy migration tests share: the CLI as `broker` registers it, and
plain functions that read what the migration left in Vault and PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import typer
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, select

from broker.integrations.service import read_credentials
from broker.legacy.cli import migrate_app
from broker.models import LegacyMigration, Tenant
from broker.vault.gateway import VaultGateway
from tests.support.cli import invoke
from tests.support.tokens import bearer, token

T = TypeVar("T")

# Registered the way broker.cli registers it.
root = typer.Typer()
root.add_typer(migrate_app, name="migrate")


@root.command()
def _other() -> None:
    """A sibling command, so `migrate` is a real sub-group as in the `broker` app."""


def run_cli(*args: str) -> Any:
    """`broker migrate legacy ARGS`, captured."""
    return invoke(root, ["migrate", "legacy", *args])


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    """`broker migrate legacy ARGS --json`: the exit code and the report."""
    result = run_cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def parallel(fn: Callable[[str], T], items: list[str]) -> list[T]:
    """`fn` over `items` on four threads, in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(fn, items))


def kv_version(vault: VaultGateway, tenant_id: str) -> int:
    """The current KV version of the tenant's Twilio credentials (0: none)."""
    meta = vault.kv.metadata(f"tenants/{tenant_id}/integrations/twilio")
    return int(meta["current_version"]) if meta else 0


def decrypted(vault: VaultGateway, tenant_id: str) -> tuple[str | None, str | None]:
    """The tenant's Twilio (account SID, auth token) as Vault returns them."""
    creds, _ = read_credentials(vault, tenant_id=tenant_id, provider="twilio")
    return creds.reveal("account_sid"), creds.reveal("auth_token")


def progress(engine: Engine, source: str) -> dict[str, LegacyMigration]:
    """The progress rows of a source, by legacy id."""
    with Session(engine) as session:
        rows = session.exec(select(LegacyMigration).where(LegacyMigration.source == source))
        return {row.legacy_id: row for row in rows}


def tenant_exists(engine: Engine, tenant_id: str) -> bool:
    """Whether the broker has this tenant."""
    with Session(engine) as session:
        return session.get(Tenant, tenant_id) is not None


def settings_of(client: TestClient, tenant_id: str) -> dict[str, Any]:
    """The tenant's settings, read through the API."""
    response = client.get(
        "/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id=tenant_id))
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_tenant(report: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    """A JSON report's tenants, by tenant id (those without one left out)."""
    return {t["tenant_id"]: t for t in report["tenants"] if t["tenant_id"]}


_HEX_RUN = re.compile(r"[0-9a-f]{32,}")


def plaintext_in_postgres(engine: Engine, secrets: set[str]) -> set[str]:
    """Which of `secrets` (32 lowercase hex each) appear anywhere in the database."""
    found: set[str] = set()
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_type = 'BASE TABLE'"
                " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
        ).all()
        for schema, table in tables:
            # Names from the catalogue, quoted: no input reaches this statement.
            query = text(f'SELECT t::text FROM "{schema}"."{table}" t')  # noqa: S608
            for (row,) in conn.execute(query):
                for run in _HEX_RUN.findall(row):
                    found.update(run[i : i + 32] for i in range(len(run) - 31))
    return found & secrets


def save_twilio(client: TestClient, tenant_id: str, fields: dict[str, str]) -> None:
    """Store Twilio credentials for a tenant through the API (no live test)."""
    response = client.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": fields, "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant_id)),
    )
    assert response.status_code == 200, response.text
