"""The tenant's own access report: who read its credentials, when, from where, allowed or not.

It is built from the two records the broker already keeps, joined by request id
as `broker audit` joins them:

- Vault's audit log: every read of the tenant's credential paths
  (`tenants/<id>/integrations/<provider>`), through the broker (its audited
  headers name the service or person and their address) or not (an operator's
  own Vault token, named by its display name);
- the broker's trail: fetches refused before they reached Vault (a service
  token that does not serve the tenant).

Only the tenant's own paths are reported: the tenant is taken from the path
read, never from the caller's headers. Producing the report is itself audited.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine
from sqlmodel import Session

from broker.audit import trail, vault_log
from broker.audit.query import TrailQuery, search
from broker.audit.report import format_time
from broker.audit.vault_log import resource_tenant_and_provider
from broker.auth.principal import Principal
from broker.core.config import Settings
from broker.core.db import unit_of_work

Via = Literal["broker", "vault"]
CSV_COLUMNS = ("time", "provider", "actor", "via", "action", "from_addr", "outcome", "request_id")


@dataclass(frozen=True)
class AccessRow:
    """One read (or refused read) of one provider's credentials."""

    time: datetime
    provider: str | None
    actor: str | None
    via: Via
    action: str | None
    from_addr: str | None
    outcome: str  # allowed | denied | failed | unknown
    request_id: str | None


@dataclass(frozen=True)
class AccessReport:
    """The rows, oldest first, and whether Vault's audit log could be read."""

    rows: list[AccessRow]
    vault_log_read: bool


def log_paths(settings: Settings) -> list[Path]:
    """The Vault audit log files the API reads (configured, or under the data directory)."""
    configured = [p for p in settings.vault_audit_log_paths if p.is_file()]
    return configured or vault_log.default_log_paths(settings.data_dir)


def _is_credential_read(entry: vault_log.VaultAuditEntry, tenant_id: str) -> bool:
    # Only the KV read: the Transit decrypt of the same request is the same access.
    kv = entry.path.split("/", 2)
    return (
        entry.tenant == tenant_id
        and entry.provider is not None
        and entry.operation == "read"
        and len(kv) == 3
        and kv[1] == "data"
        and entry.path.endswith(f"tenants/{tenant_id}/integrations/{entry.provider}")
    )


def build(
    engine: Engine,
    paths: Sequence[Path],
    *,
    tenant_id: str,
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> AccessReport:
    """The tenant's access report for `[since, until)`."""
    filters = vault_log.Filters(tenant=tenant_id, provider=provider, since=since, until=until)
    rows: list[AccessRow] = []
    vault_read = bool(paths)
    if paths:
        try:
            entries = vault_log.load(paths, filters)
        except OSError:
            entries, vault_read = [], False
        for entry in entries:
            if not _is_credential_read(entry, tenant_id):
                continue
            actor = entry.actor or entry.vault_identity
            # Calls through the broker carry its audited headers; others are named by token.
            through_broker = entry.broker_request_id is not None and not (
                actor or "vault:"
            ).startswith("vault:")
            rows.append(
                AccessRow(
                    time=entry.time,
                    provider=entry.provider,
                    actor=actor,
                    via="broker" if through_broker else "vault",
                    action=entry.action,
                    from_addr=entry.client_addr or entry.remote_address,
                    outcome=entry.outcome,
                    request_id=entry.broker_request_id,
                )
            )
    rows.extend(_refused_fetches(engine, tenant_id, provider, since, until))
    rows.sort(key=lambda row: (row.time, row.request_id or ""))
    return AccessReport(rows, vault_read)


def _refused_fetches(
    engine: Engine,
    tenant_id: str,
    provider: str | None,
    since: datetime | None,
    until: datetime | None,
) -> list[AccessRow]:
    """Fetches of the tenant's credentials the broker refused before Vault saw them."""
    refused = TrailQuery(
        tenant=tenant_id, provider=provider, action="credentials.fetch", since=since, until=until
    )
    with Session(engine) as session:
        events = [e for e in search(session, refused) if e.outcome != "success"]
    rows = []
    for event in events:
        _, event_provider = resource_tenant_and_provider(event.resource)
        rows.append(
            AccessRow(
                time=event.at,
                provider=event_provider,
                actor=event.actor,
                via="broker",
                action=event.action,
                from_addr=event.client_addr,
                outcome="denied" if event.outcome == "denied" else event.outcome,
                request_id=event.request_id,
            )
        )
    return rows


def record_reading(
    engine: Engine, principal: Principal, *, tenant_id: str, returned: int, fmt: str
) -> None:
    """Audit that the report was produced (who asked, for what, how many rows)."""
    with unit_of_work(engine) as session:
        trail.record(
            session,
            action="audit.access_report",
            resource=f"tenants/{tenant_id}/access-report",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"returned": returned, "format": fmt},
        )


def render_csv(rows: Sequence[AccessRow]) -> str:
    """The rows as CSV, one header line first; cells that a spreadsheet would run are quoted."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        values = asdict(row)
        values["time"] = format_time(row.time)
        writer.writerow([_cell(values[name]) for name in CSV_COLUMNS])
    return out.getvalue()


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    # A cell starting with these is a formula to spreadsheet software (CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
