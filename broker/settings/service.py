"""Tenant settings: read, merge-patch with optimistic concurrency, and the seed's helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import anyio
import anyio.to_thread
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy import Engine, Select
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import db
from broker.core.errors import (
    NotFound,
    PreconditionFailed,
    UpstreamUnavailable,
    ValidationFailed,
    error_location,
    unknown_field_message,
)
from broker.integrations.egress import EgressClient, EgressFailed, EgressRefused
from broker.models import SETTINGS_GROUP_COLUMNS, AuditEvent, TenantSettings, utcnow
from broker.settings import rules
from broker.settings.schemas import (
    READ_ONLY_GROUPS,
    SETTINGS_GROUPS,
    STORED,
    apply_merge_patch,
    default_group,
    group_field_names,
    group_model,
    group_urls,
    validate_group,
)

if tuple(SETTINGS_GROUPS) != SETTINGS_GROUP_COLUMNS:
    raise RuntimeError("the settings schemas and the table's columns disagree")


def default_settings_row(tenant_id: str, *, updated_by: str) -> TenantSettings:
    """A settings row with every group at its default."""
    row = TenantSettings(tenant_id=tenant_id, version=1, updated_by=updated_by)
    for name in SETTINGS_GROUPS:
        setattr(row, name, default_group(name))
    return row


def get_settings(session: Session, *, tenant_id: str) -> TenantSettings:
    """The tenant's settings row; NotFound for a missing (or foreign) tenant."""
    row = session.get(TenantSettings, tenant_id)
    if row is None:
        raise NotFound("no settings for this tenant")
    return row


# The row as `read_document` selects it: the groups as their stored JSON text.
_DOCUMENT_COLUMNS = ("tenant_id", "version", "updated_at", "updated_by", *SETTINGS_GROUPS)
_COLUMNS_AS_STORED = sql.SQL(", ").join(
    [sql.Identifier(name) for name in _DOCUMENT_COLUMNS[:4]]
    + [sql.SQL("{}::text").format(sql.Identifier(name)) for name in SETTINGS_GROUPS]
)
# Composed once: psycopg would compose the same statement again on every read.
_READ_DOCUMENT = (
    sql.SQL("SELECT {} FROM {} WHERE tenant_id = %s")
    .format(_COLUMNS_AS_STORED, sql.Identifier(TenantSettings.__tablename__))
    .as_bytes()
)


async def read_document(connection: AsyncConnection[Any], *, tenant_id: str) -> tuple[str, bytes]:
    """The tenant's settings as the JSON body of a read, and their ETag: one SELECT by key.

    A settings read is the broker's most frequent database call: plain columns
    on an asyncio read connection (`broker.core.db.read`), no ORM, no transaction.
    """
    cursor = await connection.execute(_READ_DOCUMENT, (tenant_id,))
    row = await cursor.fetchone()
    if row is None:
        raise NotFound("no settings for this tenant")
    return f'"{row[1]}"', _render(tuple(row))


@lru_cache(maxsize=512)
def _render(row: tuple[Any, ...]) -> bytes:
    """The JSON body for a stored row, remembered by the row's exact content.

    The key is everything the row holds (version, timestamps, every group's
    stored text), read afresh from the database on every request: a change by
    any worker or replica is a new key, so a remembered body is never stale.
    The body is the `SettingsView`'s JSON, put together from each group's own
    (`_render_group`): a write changes one group or two, and the rest are
    remembered, validated and serialised once.
    """
    fields = dict(zip(_DOCUMENT_COLUMNS, row, strict=True))
    head = to_json({name: fields[name] for name in _DOCUMENT_COLUMNS[:4]})
    groups = [
        b'"%s":%s' % (name.encode(), _render_group(name, fields[name])) for name in SETTINGS_GROUPS
    ]
    return head[:-1] + b"," + b",".join(groups) + b"}"


@lru_cache(maxsize=2048)
def _render_group(name: str, stored: str | None) -> bytes:
    """One group's JSON in the view, for its stored text (defaults where none is stored)."""
    value = json.loads(stored) if stored is not None else None
    return group_model(name).model_validate(value or {}, context=STORED).model_dump_json().encode()


def patch_settings(
    session: Session,
    *,
    principal: Principal,
    tenant_id: str,
    patch: dict[str, Any],
    if_match: str | None,
    egress: EgressClient | None = None,
) -> TenantSettings:
    """Apply an RFC 7396 merge patch to one or more groups, inside the caller's unit of work.

    For writers that hold a session already (the console's forms, the legacy
    migration); the API's PATCH takes `patch_document`, the same steps in plain
    SQL. The row is locked (SELECT ... FOR UPDATE) for the read-merge-write, so
    two concurrent PATCHes of different groups serialise and both survive; with
    If-Match the caller also learns when someone else got there first.

    With ``egress``, every URL the patch adds must resolve to public addresses only,
    under the policy the integrations' connection test uses.
    """
    _check_writable(patch)
    checked: set[str] = set()
    if egress is not None and _may_add_urls(patch):
        # Resolve before taking the row lock: a slow DNS answer must not hold it.
        stored = session.execute(_group_columns(tenant_id, list(patch))).first()
        stored_groups = dict(zip(patch, stored, strict=True)) if stored is not None else None
        _vet_urls(egress, _added_urls(stored_groups, patch), checked)
    row = _locked_row(session, tenant_id, if_match)
    vet = partial(_vet_group_urls, egress, checked) if egress is not None else None
    changed = _merge_into(row, principal, patch, vet)
    if changed:
        session.add(row)
        session.flush()
    trail.record(session, **_audit(principal, tenant_id, patch, changed, row.version))
    return row


def lock_settings(session: Session, tenant_ids: Sequence[str]) -> dict[str, TenantSettings]:
    """These tenants' settings rows, locked (in tenant order) until the unit of work ends."""
    if not tenant_ids:
        return {}
    rows = session.exec(
        select(TenantSettings)
        .where(col(TenantSettings.tenant_id).in_(tenant_ids))
        .order_by(col(TenantSettings.tenant_id))
        .with_for_update()
    )
    return {row.tenant_id: row for row in rows}


def patch_locked(
    session: Session, row: TenantSettings, *, principal: Principal, patch: dict[str, Any]
) -> list[str]:
    """`patch_settings` on a row the caller locked (`lock_settings`), without If-Match or
    egress checks; returns the groups it changed.

    Nothing is flushed: a writer patching many tenants in one unit of work (the
    legacy migration) sends every change and audit event together at its commit.
    """
    _check_writable(patch)
    changed = _merge_into(row, principal, patch, None)
    if changed:
        session.add(row)
    trail.record(session, **_audit(principal, row.tenant_id, patch, changed, row.version))
    return changed


_Vet = Callable[[str, Any, Any, dict[str, Any]], None]
"""Checks a group's validated value before it is kept (group, its patch, current, validated)."""


def _merge_into(
    row: TenantSettings, principal: Principal, patch: dict[str, Any], vet: _Vet | None
) -> list[str]:
    """Merge each group's patch into the row, validated; a new version when any changed."""
    changed = []
    for group, group_patch in patch.items():
        current = getattr(row, group) or default_group(group)
        validated = _merged(group, current, group_patch)
        if vet is not None:
            vet(group, group_patch, current, validated)
        if validated != current:
            setattr(row, group, validated)
            changed.append(group)
    if changed:
        row.version += 1
        row.updated_at = utcnow()
        row.updated_by = principal.actor
    return changed


def _vet_group_urls(
    egress: EgressClient,
    checked: set[str],
    group: str,
    group_patch: Any,
    current: Any,
    validated: dict[str, Any],
) -> None:
    """Refuse the URLs a group's merged value adds that resolve to non-public addresses."""
    _vet_urls(egress, _urls_added_by(group, group_patch, current, validated), checked)


def _audit(
    principal: Principal, tenant_id: str, patch: dict[str, Any], changed: list[str], version: int
) -> dict[str, Any]:
    """The audit event of a settings write."""
    return {
        "action": "settings.update",
        "resource": f"tenants/{tenant_id}/settings",
        "outcome": "success",
        "principal": principal,
        "tenant_id": tenant_id,
        "detail": {"groups": sorted(patch), "changed": changed, "version": version},
    }


async def patch_document(
    engine: Engine,
    *,
    principal: Principal,
    tenant_id: str,
    patch: dict[str, Any],
    if_match: str | None,
    egress: EgressClient | None = None,
) -> tuple[str, bytes]:
    """`patch_settings` for the API, in plain SQL: the new ETag and the JSON body.

    No ORM, no worker thread and no lock held across steps: the row is read,
    merged and validated (new URLs resolved, with nothing held), then written by
    one statement that updates it only if its version is still the one read, and
    appends the audit event in the same statement (`_update_statement`). A
    concurrent PATCH that got there first is a lost race: read again and merge
    again, so both survive; with If-Match, the new version no longer matches (412).
    """
    _check_writable(patch)
    checked: set[str] = set()
    deadline = anyio.current_time() + db.bounds_of(engine).statement_timeout_s
    read = partial(_fetch_document, tenant_id=tenant_id)
    while True:
        row = await db.read(engine, read)
        if row is None:
            raise NotFound("no settings for this tenant")
        if if_match is not None and not _matches(if_match, row[1]):
            raise PreconditionFailed("the settings changed since they were read; reload and retry")
        changed = _changed_groups(row, patch)
        if egress is not None:
            await _vet_added_urls(egress, row, patch, changed, checked)
        written = await db.write(engine, _DocumentWrite(row, principal, patch, changed))
        if written is not None:
            return f'"{written[1]}"', _render(written)
        if anyio.current_time() > deadline:
            raise UpstreamUnavailable(
                "the settings are changing too fast; retry",
                retry_after=db.bounds_of(engine).retry_after_s,
            )


def _changed_groups(row: tuple[Any, ...], patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The groups the patch changes, merged into the row's values and validated."""
    changed = {}
    for group, current in _groups(row, patch).items():
        validated = _merged(group, current, patch[group])
        if validated != current:
            changed[group] = validated
    return changed


async def _vet_added_urls(
    egress: EgressClient,
    row: tuple[Any, ...],
    patch: dict[str, Any],
    changed: dict[str, dict[str, Any]],
    checked: set[str],
) -> None:
    """Resolve the URLs the changed groups add (a blocking lookup: on a worker thread)."""
    stored = _groups(row, changed)
    added = [
        url
        for group, validated in changed.items()
        for url in _urls_added_by(group, patch[group], stored[group], validated)
        if url[1] not in checked
    ]
    if added:
        await anyio.to_thread.run_sync(_vet_urls, egress, added, checked)


@dataclass
class _DocumentWrite:
    """Write the changed groups and the audit event if the row is still at the version
    read: the row as now stored, or None when another write got there first.

    `db.write` sends the statement again when its reused connection turns out dead,
    and the first attempt may have committed before the connection died: a resent
    write that finds the row moved on then looks for its own audit event, so a write
    that landed is never reported as lost (nor, with If-Match, as a 412).
    """

    row: tuple[Any, ...]
    principal: Principal
    patch: dict[str, Any]
    changed: dict[str, dict[str, Any]]
    sent: bool = False

    async def __call__(self, connection: AsyncConnection[Any]) -> tuple[Any, ...] | None:
        tenant_id, version = self.row[0], self.row[1]
        new_version = version + 1 if self.changed else version
        audit = _audit(self.principal, tenant_id, self.patch, list(self.changed), new_version)
        event = trail.event_values(**audit)
        if not self.changed:
            await connection.execute(_INSERT_EVENT, trail.sql_values(event))
            return self.row
        resent, self.sent = self.sent, True
        values = [utcnow(), self.principal.actor, *map(Jsonb, self.changed.values())]
        cursor = await connection.execute(
            _update_statement(tuple(self.changed)),
            [*values, tenant_id, version, *trail.sql_values(event)],
        )
        written = await cursor.fetchone()
        if written is not None:
            return tuple(written)
        return await _landed_before(connection, tenant_id, event, new_version) if resent else None


async def _landed_before(
    connection: AsyncConnection[Any], tenant_id: str, event: dict[str, Any], version: int
) -> tuple[Any, ...] | None:
    """The row as now stored, if this request's own event for `version` is in the trail
    (its first attempt committed); None if not, or if the request has no id to tell by."""
    if event["request_id"] is None:
        return None
    cursor = await connection.execute(
        _OWN_EVENT, (event["request_id"], event["action"], event["resource"], str(version))
    )
    if await cursor.fetchone() is None:
        return None
    return await _fetch_document(connection, tenant_id=tenant_id)


_OWN_EVENT = (
    sql.SQL(
        "SELECT 1 FROM {} WHERE request_id = %s AND action = %s AND resource = %s"
        " AND detail->>'version' = %s"
    )
    .format(sql.Identifier(AuditEvent.__tablename__))
    .as_bytes()
)


def _groups(row: tuple[Any, ...], patch: dict[str, Any]) -> dict[str, Any]:
    """The patched groups of a row as `_READ_DOCUMENT` selects it, parsed (defaults for none)."""
    stored = dict(zip(_DOCUMENT_COLUMNS, row, strict=True))
    return {
        group: json.loads(stored[group]) if stored[group] else default_group(group)
        for group in patch
    }


async def _fetch_document(
    connection: AsyncConnection[Any], *, tenant_id: str
) -> tuple[Any, ...] | None:
    cursor = await connection.execute(_READ_DOCUMENT, (tenant_id,))
    row = await cursor.fetchone()
    return tuple(row) if row is not None else None


_EVENT_INTO = sql.SQL("INSERT INTO {} ({})").format(
    sql.Identifier(AuditEvent.__tablename__),
    sql.SQL(", ").join(map(sql.Identifier, trail.EVENT_COLUMNS)),
)
_EVENT_VALUES = sql.SQL(", ").join(sql.Placeholder() * len(trail.EVENT_COLUMNS))
_INSERT_EVENT = sql.SQL("{} VALUES ({})").format(_EVENT_INTO, _EVENT_VALUES).as_bytes()


@lru_cache(maxsize=128)
def _update_statement(groups: tuple[str, ...]) -> bytes:
    """The row's update and its audit event in one statement, returning the row as read.

    Parameters: updated_at, updated_by, each group's value, the tenant id and the
    version read, then the event's `trail.EVENT_COLUMNS`. One statement is atomic
    on its own, and the event is appended only for the row it updated: never a
    change without its event, nor an event without its change. A row no longer at
    the version read is not updated, and the statement returns no row.
    """
    assignments = [sql.SQL("{} = %s").format(sql.Identifier(group)) for group in groups]
    return (
        sql.SQL(
            "WITH updated AS (UPDATE {} SET version = version + 1, updated_at = %s,"
            " updated_by = %s, {} WHERE tenant_id = %s AND version = %s RETURNING {}),"
            " audited AS ({} SELECT {} FROM updated)"
            " SELECT * FROM updated"
        )
        .format(
            sql.Identifier(TenantSettings.__tablename__),
            sql.SQL(", ").join(assignments),
            _COLUMNS_AS_STORED,
            _EVENT_INTO,
            _EVENT_VALUES,
        )
        .as_bytes()
    )


def _check_writable(patch: dict[str, Any]) -> None:
    if not patch:
        raise ValidationFailed("the patch names no settings group")
    read_only = sorted(set(patch) & READ_ONLY_GROUPS)
    if read_only:
        raise ValidationFailed(f"{read_only[0]} is maintained by the broker and is read-only")


def _locked_row(session: Session, tenant_id: str, if_match: str | None) -> TenantSettings:
    """The settings row, locked until the unit of work ends; If-Match checked against it."""
    query = select(TenantSettings).where(TenantSettings.tenant_id == tenant_id).with_for_update()
    row = session.exec(query).first()
    if row is None:
        raise NotFound("no settings for this tenant")
    if if_match is not None and not _matches(if_match, row.version):
        raise PreconditionFailed("the settings changed since they were read; reload and retry")
    return row


def _merged(group: str, current: Any, group_patch: Any) -> dict[str, Any]:
    """One group's patch merged into its current value, validated (ValidationFailed if not)."""
    merged = apply_merge_patch(current, group_patch)
    try:
        return validate_group(group, merged if merged is not None else {})
    except ValidationError as exc:
        errors = _errors(group, group_patch, exc)
        raise ValidationFailed(_describe(errors), errors=errors) from None


def _urls_added_by(
    group: str, group_patch: Any, current: Any, validated: dict[str, Any]
) -> list[tuple[str, str]]:
    """The URLs a group's merged value holds that its current value did not."""
    return _new_urls(group, current, validated) if _may_add_urls(group_patch) else []


def _may_add_urls(patch: Any) -> bool:
    """Whether the patch holds anything that could be a new URL (an https URL has "://").

    A merge patch adds a URL only by naming it: a removed key falls back to a
    default, and no default holds a URL. Without one, the unlocked read that
    resolves new URLs before the lock is skipped, and so is the locked pass.
    """
    if isinstance(patch, str):
        return "://" in patch
    if isinstance(patch, dict):
        return any(_may_add_urls(value) for value in patch.values())
    if isinstance(patch, list):
        return any(_may_add_urls(item) for item in patch)
    return False


def _group_columns(tenant_id: str, groups: list[str]) -> Select[Any]:
    """The stored values of `groups` (execute(), not exec(): a row even for one group)."""
    columns = [getattr(TenantSettings, group) for group in groups]
    query: Select[Any] = select(*columns).where(TenantSettings.tenant_id == tenant_id)
    return query


def _added_urls(stored: dict[str, Any] | None, patch: dict[str, Any]) -> list[tuple[str, str]]:
    """The URLs the patch would add, judged against an unlocked read of the groups."""
    if stored is None:
        return []
    added: list[tuple[str, str]] = []
    for group, current in stored.items():
        current = current or default_group(group)
        merged = apply_merge_patch(current, patch[group])
        try:
            validated = validate_group(group, merged if merged is not None else {})
        except ValidationError:
            continue  # reported, with its location, by the locked pass
        added.extend(_new_urls(group, current, validated))
    return added


def _new_urls(group: str, current: Any, validated: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        before = {url for _, url in group_urls(group, current)}
    except ValidationError:
        before = set()  # stored before a rule tightened: every URL counts as new
    return [(loc, url) for loc, url in group_urls(group, validated) if url not in before]


def _vet_urls(egress: EgressClient, urls: list[tuple[str, str]], checked: set[str]) -> None:
    """Refuse any URL that is, or resolves to, a non-public address."""
    for loc, url in urls:
        if url in checked:
            continue
        try:
            egress.check_url(url)
        except EgressRefused as exc:
            # The egress messages never contain the URL itself.
            message = f"invalid https URL: {exc}"
            raise ValidationFailed(
                f"{loc}: {message}", errors=[{"field": loc, "message": message}]
            ) from None
        except EgressFailed:
            raise UpstreamUnavailable(
                f"could not check {loc} now (name resolution timed out)"
            ) from None
        checked.add(url)


def _matches(if_match: str, version: int) -> bool:
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or f'"{version}"' in tags


def _errors(group: str, submitted: Any, exc: ValidationError) -> list[dict[str, str]]:
    # Never echo the rejected input: only where it is and what is wrong. Nor a name the
    # schema does not declare (it may be a pasted secret): that is given by its position.
    known = group_field_names(group)
    errors = []
    for err in exc.errors(include_input=False, include_url=False):
        place = error_location(err["loc"], submitted, known=known)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = unknown_field_message(group_model(group), err["loc"][:-1])
        errors.append({"field": ".".join(filter(None, [group, place])), "message": message})
    return errors


def _describe(errors: list[dict[str, str]]) -> str:
    first = errors[0]
    return f"{first['field']}: {first['message']}"


# -- the seed's helper methods ------------------------------------------------------


def is_notification_enabled(session: Session, *, tenant_id: str, channel: str, event: str) -> bool:
    """Whether the tenant wants `event` notifications on `channel`."""
    row = get_settings(session, tenant_id=tenant_id)
    return rules.is_notification_enabled(row.notification_settings, channel, event)


def is_feature_enabled(session: Session, *, tenant_id: str, feature: str) -> bool:
    """Whether a feature flag is on for the tenant (unknown flags are off)."""
    row = get_settings(session, tenant_id=tenant_id)
    return rules.is_feature_enabled(row.feature_flags, feature)


def is_open_at(session: Session, *, tenant_id: str, at: datetime) -> bool:
    """Whether the tenant's business is open at `at`, in the tenant's time zone."""
    row = get_settings(session, tenant_id=tenant_id)
    return rules.is_open_at(row.business_hours, at)


def in_quiet_hours(session: Session, *, tenant_id: str, at: datetime) -> bool:
    """Whether `at` falls in the tenant's quiet hours."""
    row = get_settings(session, tenant_id=tenant_id)
    return rules.in_quiet_hours(row.notification_settings, at)
