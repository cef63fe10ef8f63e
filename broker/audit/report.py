"""One timeline from two sources: Vault's audit log and the broker's own trail.

Vault records every secret access (which path, which token, allowed or not);
the broker's trail in PostgreSQL records what Vault cannot see: settings
changes, payment methods, denials that never reached Vault, and the caller's
real address. Both carry the broker's request id (`x-request-id` in Vault), so
they are merged on it: each Vault call learns the client address of the
request it served, and broker-only events take their place in time order.

Renderers: a fixed-width table for people, JSON lines and CSV for tools.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.audit import query
from broker.audit.vault_log import Filters, VaultAuditEntry, resource_tenant_and_provider
from broker.models import AuditEvent

Source = Literal["vault", "broker"]
Format = Literal["table", "jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("table", "jsonl", "csv")

# The broker trail's outcomes, in the timeline's vocabulary ("was it allowed?").
_TRAIL_OUTCOMES = {"success": "allowed", "denied": "denied", "failed": "failed"}
_CHUNK = 1000


@dataclass(frozen=True)
class TimelineRow:
    """One line of the merged timeline: a Vault call or a broker trail event.

    `from_addr` is the caller's own address when the broker recorded it
    (`client_addr`), otherwise the address Vault saw (`remote_address`, which
    for calls made through the broker is the broker itself).
    """

    time: datetime
    source: Source
    request_id: str | None
    actor: str | None
    tenant: str | None
    provider: str | None
    action: str | None
    path: str
    operation: str | None
    from_addr: str | None
    outcome: str
    error: str | None = None
    vault_request_id: str | None = None
    remote_address: str | None = None
    client_addr: str | None = None
    vault_identity: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        """True unless the row records a denial."""
        return self.outcome != "denied"

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready values (time in ISO 8601 UTC)."""
        return {
            "time": format_time(self.time),
            "source": self.source,
            "request_id": self.request_id,
            "actor": self.actor,
            "tenant": self.tenant,
            "provider": self.provider,
            "action": self.action,
            "operation": self.operation,
            "path": self.path,
            "from": self.from_addr,
            "outcome": self.outcome,
            "allowed": self.allowed,
            "error": self.error,
            "vault_request_id": self.vault_request_id,
            "remote_address": self.remote_address,
            "client_addr": self.client_addr,
            "vault_identity": self.vault_identity,
            "detail": dict(self.detail),
        }


FIELDS = (
    "time",
    "source",
    "request_id",
    "actor",
    "tenant",
    "provider",
    "action",
    "operation",
    "path",
    "from",
    "outcome",
    "allowed",
    "error",
    "vault_request_id",
    "remote_address",
    "client_addr",
    "vault_identity",
    "detail",
)
"""The columns of the JSON lines and CSV renderings, in order."""


def format_time(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds: `2026-01-31T12:00:00.123Z`."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the broker trail ---------------------------------------------------------------------


def read_trail(
    engine: Engine, filters: Filters | None = None, *, request_ids: Iterable[str] = ()
) -> list[AuditEvent]:
    """Broker trail events matching `filters`, or, with `request_ids`, those requests' events.

    The filters are the trail query's (`broker.audit.query`), the API's own semantics.
    """
    with Session(engine) as session:
        ids = sorted(set(request_ids))
        if not ids:
            events = query.search(session, (filters or Filters()).trail_query())
        else:
            events = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                statement = select(AuditEvent).where(col(AuditEvent.request_id).in_(chunk))
                events.extend(session.exec(statement).all())
    return sorted(events, key=lambda e: (_aware(e.at), e.id or 0))


def _trail_tenant_provider(event: AuditEvent) -> tuple[str | None, str | None]:
    tenant, provider = resource_tenant_and_provider(event.resource)
    detail_provider = event.detail.get("provider") if isinstance(event.detail, dict) else None
    return tenant or event.tenant_id, provider or (
        detail_provider if isinstance(detail_provider, str) else None
    )


def _aware(when: datetime) -> datetime:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)


# -- merging ------------------------------------------------------------------------------


def trail_row(event: AuditEvent) -> TimelineRow:
    """A broker trail event as a timeline row."""
    tenant, provider = _trail_tenant_provider(event)
    detail = dict(event.detail or {})
    reason = detail.get("reason")
    return TimelineRow(
        time=_aware(event.at),
        source="broker",
        request_id=event.request_id,
        actor=event.actor,
        tenant=tenant,
        provider=provider,
        action=event.action,
        path=event.resource,
        operation=None,
        from_addr=event.client_addr,
        outcome=_TRAIL_OUTCOMES.get(event.outcome, event.outcome),
        error=str(reason) if event.outcome != "success" and reason else None,
        client_addr=event.client_addr,
        detail=detail,
    )


def vault_row(entry: VaultAuditEntry, events: Sequence[AuditEvent] = ()) -> TimelineRow:
    """A Vault call as a timeline row, completed by its broker request's trail events."""
    client_addr = entry.client_addr or next((e.client_addr for e in events if e.client_addr), None)
    actor = entry.actor
    if entry.actor is None or entry.actor.startswith("vault:"):
        actor = next((e.actor for e in events if e.actor), None) or entry.actor
    tenant = entry.tenant or next((e.tenant_id for e in events if e.tenant_id), None)
    return TimelineRow(
        time=entry.time,
        source="vault",
        request_id=entry.broker_request_id,
        actor=actor,
        tenant=tenant,
        provider=entry.provider,
        action=entry.action,
        path=entry.path,
        operation=entry.operation,
        from_addr=client_addr or entry.remote_address,
        outcome=entry.outcome,
        error=entry.error,
        vault_request_id=entry.vault_request_id,
        remote_address=entry.remote_address,
        client_addr=client_addr,
        vault_identity=entry.vault_identity,
        detail={"policies": list(entry.policies)} if entry.policies else {},
    )


def merge(
    entries: Sequence[VaultAuditEntry],
    trail_events: Sequence[AuditEvent] = (),
    related_events: Sequence[AuditEvent] = (),
) -> list[TimelineRow]:
    """One timeline, sorted by time: every Vault call and every trail event.

    `related_events` are trail events of the same broker requests as `entries`
    (whether or not they pass the filters); they only complete the Vault rows.
    """
    by_request: dict[str, list[AuditEvent]] = {}
    for event in (*related_events, *trail_events):
        if event.request_id:
            bucket = by_request.setdefault(event.request_id, [])
            if all(event.id != seen.id for seen in bucket):
                bucket.append(event)
    rows = [
        vault_row(entry, by_request.get(entry.broker_request_id or "", ())) for entry in entries
    ]
    rows.extend(trail_row(event) for event in trail_events)
    rows.sort(key=lambda row: (row.time, row.source != "vault", row.vault_request_id or ""))
    return rows


def timeline(
    entries: Sequence[VaultAuditEntry], engine: Engine | None, filters: Filters | None = None
) -> list[TimelineRow]:
    """The merged timeline: `entries` (already filtered) plus, with an engine, the trail."""
    if engine is None:
        return merge(entries)
    filters = filters or Filters()
    trail_events = read_trail(engine, filters)
    request_ids = {e.broker_request_id for e in entries if e.broker_request_id}
    related = read_trail(engine, request_ids=request_ids) if request_ids else []
    return merge(entries, trail_events, related)


# -- rendering ----------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, int], ...] = (
    # (title, maximum width). Columns are as wide as their longest cell up to
    # the maximum, which only absurd values reach (tenant ids are at most 63
    # characters); a longer cell is cut in the middle. The last column is never cut.
    ("TIME", 24),
    ("SOURCE", 6),
    ("ACTOR", 64),
    ("TENANT", 63),
    ("ACTION / PATH", 140),
    ("FROM", 45),
    ("OUTCOME", 8),
    ("REQUEST", 0),
)


def _printable(text: str) -> str:
    # Headers and paths come from callers: never let them drive the terminal.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _cut(text: str, width: int) -> str:
    if width <= 0 or len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail :]


def _action_path(row: TimelineRow) -> str:
    if row.source == "vault":
        text = f"{row.operation or ''} {row.path}".strip()
        return f"{text} ({row.action})" if row.action else text
    action = row.action or ""
    method, _, route = action.partition(" ")
    if route.startswith("/") and row.path.startswith("/"):
        # A denial: "PUT /v1/.../{provider}" on resource "/v1/.../shopify".
        return f"{method} {row.path}"
    return action if row.path in action else f"{action} {row.path}".strip()


def _table_cells(row: TimelineRow) -> list[str]:
    return [
        format_time(row.time),
        row.source,
        row.actor or "-",
        row.tenant or "-",
        _action_path(row),
        row.from_addr or "-",
        row.outcome,
        row.request_id or "-",
    ]


def render_table(rows: Sequence[TimelineRow]) -> str:
    """A fixed-width table: time, source, actor, tenant, action/path, from, outcome, request."""
    cells = [[_printable(cell) for cell in _table_cells(row)] for row in rows]
    widths = []
    for index, (title, cap) in enumerate(_COLUMNS):
        longest = max([len(title), *(len(line[index]) for line in cells)])
        widths.append(min(longest, cap) if cap else longest)
    lines = []
    for line in [[title for title, _ in _COLUMNS], *cells]:
        parts = [
            _cut(cell, width).ljust(width) if index < len(widths) - 1 else cell
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def render_jsonl(rows: Sequence[TimelineRow]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(row.as_dict(), ensure_ascii=False) + "\n" for row in rows)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
    text = str(value)
    # A spreadsheet would run a cell starting with these as a formula.
    return "'" + text if text.startswith(_FORMULA_START) else text


def render_csv(rows: Sequence[TimelineRow]) -> str:
    """CSV with a header row; `detail` is a JSON object, empty values are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIELDS)
    for row in rows:
        data = row.as_dict()
        writer.writerow([_csv_cell(data[name]) for name in FIELDS])
    return buffer.getvalue()


def render(rows: Sequence[TimelineRow], fmt: str) -> str:
    """Render in one of FORMATS."""
    if fmt == "table":
        return render_table(rows)
    if fmt == "jsonl":
        return render_jsonl(rows)
    if fmt == "csv":
        return render_csv(rows)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
