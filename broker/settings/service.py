"""Tenant settings: read, merge-patch with optimistic concurrency, and the seed's helpers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlmodel import Session, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.errors import Forbidden, NotFound, PreconditionFailed, ValidationFailed
from broker.models import SETTINGS_GROUP_COLUMNS, TenantSettings, utcnow
from broker.settings import rules
from broker.settings.schemas import (
    READ_ONLY_GROUPS,
    SETTINGS_GROUPS,
    SettingsView,
    apply_merge_patch,
    default_group,
    validate_group,
)

assert tuple(SETTINGS_GROUPS) == SETTINGS_GROUP_COLUMNS, "schemas and table columns disagree"


def default_settings_row(tenant_id: str, *, updated_by: str) -> TenantSettings:
    """A settings row with every group at its default."""
    row = TenantSettings(tenant_id=tenant_id, version=1, updated_by=updated_by)
    for name in SETTINGS_GROUPS:
        setattr(row, name, default_group(name))
    return row


def own_tenant(principal: Principal) -> str:
    """The tenant a user token acts in; a token without one cannot reach tenant settings."""
    if principal.tenant_id is None:
        raise Forbidden("this token names no tenant")
    return principal.tenant_id


def etag(row: TenantSettings) -> str:
    """The strong ETag of a settings row: its version."""
    return f'"{row.version}"'


def get_settings(session: Session, *, tenant_id: str) -> TenantSettings:
    """The tenant's settings row; NotFound for a missing (or foreign) tenant."""
    row = session.get(TenantSettings, tenant_id)
    if row is None:
        raise NotFound("no settings for this tenant")
    return row


def to_view(row: TenantSettings) -> SettingsView:
    """The API view: every group typed, no credential of any kind."""
    groups = {name: getattr(row, name) or {} for name in SETTINGS_GROUPS}
    return SettingsView(
        tenant_id=row.tenant_id,
        version=row.version,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
        **groups,
    )


def patch_settings(
    session: Session,
    *,
    principal: Principal,
    tenant_id: str,
    patch: dict[str, Any],
    if_match: str | None,
) -> TenantSettings:
    """Apply an RFC 7396 merge patch to one or more groups.

    The row is locked (SELECT ... FOR UPDATE) for the read-merge-write, so two
    concurrent PATCHes of different groups serialise and both survive; with
    If-Match the caller also learns when someone else got there first.
    """
    if not patch:
        raise ValidationFailed("the patch names no settings group")
    read_only = sorted(set(patch) & READ_ONLY_GROUPS)
    if read_only:
        raise ValidationFailed(f"{read_only[0]} is maintained by the broker and is read-only")
    row = session.exec(
        select(TenantSettings).where(TenantSettings.tenant_id == tenant_id).with_for_update()
    ).first()
    if row is None:
        raise NotFound("no settings for this tenant")
    if if_match is not None and not _matches(if_match, row):
        raise PreconditionFailed("the settings changed since they were read; reload and retry")

    changed = []
    for group, group_patch in patch.items():
        current = getattr(row, group) or default_group(group)
        merged = apply_merge_patch(current, group_patch)
        try:
            validated = validate_group(group, merged if merged is not None else {})
        except ValidationError as exc:
            raise ValidationFailed(_describe(group, exc), errors=_errors(group, exc)) from None
        if validated != current:
            setattr(row, group, validated)
            changed.append(group)

    if changed:
        row.version += 1
        row.updated_at = utcnow()
        row.updated_by = principal.actor
        session.add(row)
        session.flush()
    trail.record(
        session,
        action="settings.update",
        resource=f"tenants/{tenant_id}/settings",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={"groups": sorted(patch), "changed": changed, "version": row.version},
    )
    return row


def _matches(if_match: str, row: TenantSettings) -> bool:
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or etag(row) in tags


def _errors(group: str, exc: ValidationError) -> list[dict[str, str]]:
    # Never echo the rejected input: only where it is and what is wrong.
    return [
        {"field": ".".join([group, *(str(p) for p in err["loc"])]), "message": err["msg"]}
        for err in exc.errors()
    ]


def _describe(group: str, exc: ValidationError) -> str:
    first = _errors(group, exc)[0]
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
