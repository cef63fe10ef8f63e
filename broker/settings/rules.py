"""Pure decision helpers over tenant settings groups.

Each function accepts either the group's model or its stored dict (as produced
by :func:`broker.settings.schemas.validate_group`); dicts are validated with the
group model first, so missing keys take their defaults and invalid data raises
:class:`pydantic.ValidationError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from broker.settings.schemas import (
    BusinessHours,
    DayHours,
    FeatureFlags,
    NotificationSettings,
)

__all__ = [
    "NOTIFICATION_CHANNELS",
    "in_quiet_hours",
    "is_feature_enabled",
    "is_open_at",
    "is_notification_enabled",
]

NOTIFICATION_CHANNELS = ("email", "sms", "in_app")
"""Channels with per-event switches in ``notification_settings``."""

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _notifications(value: NotificationSettings | Mapping[str, Any]) -> NotificationSettings:
    if isinstance(value, NotificationSettings):
        return value
    return NotificationSettings.model_validate(value)


def _parse_hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def _to_local(at: datetime, timezone: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return at.astimezone(ZoneInfo(timezone))


def is_notification_enabled(
    notification_settings: NotificationSettings | Mapping[str, Any],
    channel: str,
    event: str,
) -> bool:
    """Whether ``event`` notifications are switched on for ``channel``.

    Unknown channels or events are treated as disabled.  Quiet hours are not
    considered here; see :func:`in_quiet_hours`.
    """
    if channel not in NOTIFICATION_CHANNELS:
        return False
    events = getattr(_notifications(notification_settings), channel)
    if event not in type(events).model_fields:
        return False
    return getattr(events, event) is True


def is_feature_enabled(feature_flags: FeatureFlags | Mapping[str, Any], feature: str) -> bool:
    """Whether feature flag ``feature`` is on; unknown features are off."""
    flags = (
        feature_flags
        if isinstance(feature_flags, FeatureFlags)
        else FeatureFlags.model_validate(feature_flags)
    )
    if feature not in FeatureFlags.model_fields:
        return False
    return getattr(flags, feature) is True


def is_open_at(business_hours: BusinessHours | Mapping[str, Any], at: datetime) -> bool:
    """Whether the business is open at instant ``at``.

    ``at`` must be timezone-aware (naive datetimes raise :class:`ValueError`).  It
    is converted to the business time zone, and the local weekday's window
    ``[open, close)`` is checked.
    """
    hours = (
        business_hours
        if isinstance(business_hours, BusinessHours)
        else BusinessHours.model_validate(business_hours)
    )
    local = _to_local(at, hours.timezone)
    day: DayHours = getattr(hours, _WEEKDAYS[local.weekday()])
    if day.closed:
        return False
    return _parse_hhmm(day.open) <= local.time() < _parse_hhmm(day.close)


def in_quiet_hours(
    notification_settings: NotificationSettings | Mapping[str, Any], at: datetime
) -> bool:
    """Whether instant ``at`` falls inside the tenant's quiet hours.

    The window ``[start, end)`` is evaluated in the quiet-hours time zone and wraps
    past midnight when ``start > end`` (e.g. ``22:00``-``08:00``); ``start == end``
    is an empty window.  Disabled quiet hours never match.  ``at`` must be
    timezone-aware (naive datetimes raise :class:`ValueError`).
    """
    quiet = _notifications(notification_settings).quiet_hours
    local = _to_local(at, quiet.timezone).time()
    if not quiet.enabled:
        return False
    start, end = _parse_hhmm(quiet.start), _parse_hhmm(quiet.end)
    if start < end:
        return start <= local < end
    if start > end:
        return local >= start or local < end
    return False
