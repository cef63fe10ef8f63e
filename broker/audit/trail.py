"""The broker's append-only audit trail in PostgreSQL.

Every settings write, every payment-method or payout access and every denied
request leaves one event: actor, tenant, action, resource, outcome, request id,
client address and time. It complements Vault's own audit log, which records
the secret accesses themselves; `broker audit` joins the two by request id.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal

import anyio
from psycopg.types.json import Jsonb
from sqlalchemy import Engine
from sqlmodel import Session

from broker.auth.principal import Principal
from broker.core import context
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError
from broker.core.identifiers import TENANT_ID
from broker.core.logging import is_plain_name, redact_text, route_template
from broker.models import AuditEvent, Tenant, utcnow

log = logging.getLogger(__name__)

Outcome = Literal["success", "denied", "failed"]

_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_MAX_IDENTIFIER = 63
_CARD_OR_PHONE_LENGTH = re.compile(r"[0-9]{11,}")
# A run of 16+ hex characters is a key or token shape (a Twilio auth token is 32).
_HEX_TOKEN = re.compile(r"[0-9a-f]{16,}")


def _fit(value: str, limit: int) -> str:
    """`value` without NUL characters, cut to `limit` characters (marked with an ellipsis).

    The trail records requests as they came, and a denied request may carry
    anything in its path: the event must still fit its columns, or recording
    the denial fails and the caller gets a 500 instead. PostgreSQL text holds no NUL.
    """
    value = value.replace("\x00", "\N{REPLACEMENT CHARACTER}")
    return value if len(value) <= limit else value[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def route_resource(scope: Mapping[str, Any]) -> str:
    """The resource of a request as its route template, with only validated identifiers filled in.

    Never the raw path: a refused request's path is caller input, and may hold a card
    number or a token. A path parameter is filled in only when it reads as a plain name
    (a tenant id, a provider); anything else, a hash or an opaque id included, stays `{name}`.
    """
    template = route_template(scope)
    if template is None:
        return "unmatched"
    params = scope.get("path_params") or {}

    def fill(match: re.Match[str]) -> str:
        value = params.get(match.group(1))
        if isinstance(value, str) and plain_identifier(value) is not None:
            return value
        return "{" + match.group(1) + "}"

    return _PARAMETER.sub(fill, template)


def plain_identifier(value: str) -> str | None:
    """`value` when it reads as a plain name the trail may keep (a tenant id), else None.

    For identifiers taken from a request before anything has validated them, such as the
    tenant of a refused fetch: a token pasted there must not reach the trail or the logs.
    A value with a tenant id's shape (lowercase letters, digits and hyphens, which a
    generated id may fill with a run of digits) is kept unless it holds a credential
    shape, a run of hex as long as a key, or a number long enough to be a card or a
    phone number.
    """
    if is_plain_name(value, max_length=_MAX_IDENTIFIER):
        return value
    if (
        TENANT_ID.fullmatch(value)
        and _CARD_OR_PHONE_LENGTH.search(value) is None
        and _HEX_TOKEN.search(value) is None
        and redact_text(value) == value
    ):
        return value
    return None


def _registered_or_plain(session: Session, value: str) -> str | None:
    """`value` when it names a registered tenant or reads as a plain name, else None."""
    if plain_identifier(value) is not None:
        return value
    if TENANT_ID.fullmatch(value) and session.get(Tenant, value) is not None:
        return value
    return None


def record(
    session: Session,
    *,
    action: str,
    resource: str,
    outcome: Outcome,
    principal: Principal | None = None,
    tenant_id: str | None = None,
    claimed_tenant: str | None = None,
    path_tenant: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's unit of work.

    `claimed_tenant` and `path_tenant` are tenant ids taken from a request nothing has
    validated. Either is kept when it names a registered tenant, whatever its digits, or
    else when it reads as a plain name (`plain_identifier`), and then fills a literal
    `{tenant_id}` in `resource`. A claimed tenant (the tenant of a refused fetch) is also
    the event's tenant; a path tenant only names the resource.
    """
    for named, is_the_events in ((claimed_tenant, True), (path_tenant, False)):
        kept = _registered_or_plain(session, named) if named is not None else None
        if kept is not None:
            resource = resource.replace("{tenant_id}", kept)
            if is_the_events:
                tenant_id = kept
    event = AuditEvent(
        **event_values(
            action=action,
            resource=resource,
            outcome=outcome,
            principal=principal,
            tenant_id=tenant_id,
            detail=detail,
        )
    )
    # Written with the caller's next flush or its commit: a unit of work that records
    # many events (a batch) sends them together rather than one round trip each.
    session.add(event)
    return event


def event_values(
    *,
    action: str,
    resource: str,
    outcome: Outcome,
    principal: Principal | None = None,
    tenant_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The columns of the event `record` appends; for writers in plain SQL, `sql_values`."""
    ctx = context.current()
    if tenant_id is None and principal is not None:
        tenant_id = principal.tenant_id
    return {
        "at": utcnow(),
        "actor": _fit(
            principal.actor if principal else (ctx.actor if ctx and ctx.actor else "anonymous"),
            200,
        ),
        "actor_kind": principal.kind if principal else "anonymous",
        "tenant_id": _fit(tenant_id, 63) if tenant_id is not None else None,
        "action": _fit(action, 100),
        "resource": _fit(resource, 300),
        "outcome": outcome,
        "request_id": ctx.request_id if ctx else None,
        "client_addr": ctx.client_addr if ctx else None,
        "detail": detail or {},
    }


# The columns of `event_values`, in `sql_values`' order; the id comes from the table's sequence.
EVENT_COLUMNS = (
    "at",
    "actor",
    "actor_kind",
    "tenant_id",
    "action",
    "resource",
    "outcome",
    "request_id",
    "client_addr",
    "detail",
)


def sql_values(event: dict[str, Any]) -> list[Any]:
    """An event's values (`event_values`) for an INSERT of `EVENT_COLUMNS` through psycopg."""
    return [*(event[name] for name in EVENT_COLUMNS[:-1]), Jsonb(event["detail"])]


def _loggable(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event's fields for the log, when the trail cannot take it: no principal object,
    and a claimed tenant only if it reads as a plain name (the log cannot tell registered)."""
    fields = {k: v for k, v in event.items() if k != "principal"}
    for name in ("claimed_tenant", "path_tenant"):
        if fields.get(name) is not None:
            fields[name] = plain_identifier(str(fields[name]))
    return fields


def record_separately(engine: Engine, **event: Any) -> None:
    """Append one event in its own transaction, for requests whose own work rolled back.

    A denial must be recorded even though the request fails; if the database
    itself is down, the denial is logged instead and the request still fails
    closed.
    """
    try:
        with unit_of_work(engine) as session:
            record(session, **event)
    except BrokerError:
        log.warning(
            "audit trail unavailable; event logged instead",
            extra={"fields": _loggable(event)},
        )


# Events being written on threads of their own, at most; past it (a stalled
# database) an event is logged instead, as when the database is down.
_BACKGROUND = threading.BoundedSemaphore(8)


def record_in_background(engine: Engine, **event: Any) -> threading.Event:
    """Append one event on a thread of its own; the returned event is set once it is done."""
    done = threading.Event()
    if not _BACKGROUND.acquire(blocking=False):
        log.warning(
            "audit trail busy; event logged instead",
            extra={"fields": _loggable(event)},
        )
        done.set()
        return done
    # The request's id and client address travel with the event.
    request_context = contextvars.copy_context()

    def write() -> None:
        try:
            request_context.run(record_separately, engine, **event)
        finally:
            _BACKGROUND.release()
            done.set()

    threading.Thread(target=write, name="audit-trail", daemon=True).start()
    return done


async def settle(done: threading.Event, *, within_s: float) -> None:
    """Wait for a background record, at most `within_s`; past that it carries on alone.

    Polled, not awaited on a worker thread: the shared threads may be the very
    thing a stalled database has filled.
    """
    with anyio.move_on_after(within_s):
        while not done.is_set():
            await anyio.sleep(0.005)
