from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.settings.rules import (
    in_quiet_hours,
    is_feature_enabled,
    is_notification_enabled,
    is_open_at,
)
from broker.settings.schemas import (
    BusinessHours,
    FeatureFlags,
    NotificationSettings,
    default_group,
    validate_group,
)

NEW_YORK = ZoneInfo("America/New_York")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# ---------------------------------------------------------------------------
# is_notification_enabled
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "event", "expected"),
    [
        ("email", "order_received", True),
        ("email", "weekly_report", False),
        ("sms", "critical_alerts", True),
        ("sms", "payment_failed", True),
        ("in_app", "handoff_request", True),
        ("push", "order_received", False),
        ("email", "critical_alerts", False),
        ("email", "nonexistent", False),
        ("quiet_hours", "enabled", False),
        ("email", "model_config", False),
        ("email", "__class__", False),
    ],
)
def test_notification_defaults_and_unknowns(channel: str, event: str, expected: bool) -> None:
    settings = default_group("notification_settings")
    settings["quiet_hours"]["enabled"] = True
    assert is_notification_enabled(settings, channel, event) is expected


def test_notification_reads_stored_values_from_dict_and_model() -> None:
    stored = validate_group(
        "notification_settings", {"email": {"weekly_report": True, "order_received": False}}
    )
    model = NotificationSettings.model_validate(stored)
    for settings in (stored, model):
        assert is_notification_enabled(settings, "email", "weekly_report") is True
        assert is_notification_enabled(settings, "email", "order_received") is False


# ---------------------------------------------------------------------------
# is_feature_enabled
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ("ai_responses_enabled", True),
        ("auto_handoff_enabled", False),
        ("product_recommendations", True),
        ("appointment_reminders", True),
        ("abandoned_cart_recovery", False),
        ("multi_language_support", False),
        ("time_travel", False),
        ("model_fields", False),
        ("", False),
    ],
)
def test_feature_defaults_and_unknowns(feature: str, expected: bool) -> None:
    assert is_feature_enabled(default_group("feature_flags"), feature) is expected
    assert is_feature_enabled(FeatureFlags(), feature) is expected


def test_feature_reads_stored_value() -> None:
    flags = validate_group(
        "feature_flags", {"auto_handoff_enabled": True, "ai_responses_enabled": False}
    )
    assert is_feature_enabled(flags, "auto_handoff_enabled") is True
    assert is_feature_enabled(flags, "ai_responses_enabled") is False


# ---------------------------------------------------------------------------
# is_open_at
# ---------------------------------------------------------------------------


def hours(timezone_name: str = "UTC", **days: dict[str, Any]) -> dict[str, Any]:
    return validate_group("business_hours", {"timezone": timezone_name, **days})


@pytest.mark.parametrize(
    ("zone", "at", "expected"),
    [
        # The default group: UTC, 09:00-17:00 on weekdays.
        (None, utc(2024, 1, 1, 8, 59, 59), False),
        (None, utc(2024, 1, 1, 9, 0), True),  # open is inclusive
        (None, utc(2024, 1, 1, 16, 59, 59), True),
        (None, utc(2024, 1, 1, 17, 0), False),  # close is exclusive
        (None, utc(2024, 1, 6, 12, 0), False),  # Saturday closed by default
        (None, utc(2024, 1, 7, 12, 0), False),  # Sunday closed by default
        (None, utc(2024, 3, 8, 12, 0), True),  # Friday
        # Africa/Nairobi is UTC+3 all year.
        ("Africa/Nairobi", utc(2024, 1, 1, 5, 59), False),  # 08:59 local
        ("Africa/Nairobi", utc(2024, 1, 1, 6, 0), True),  # 09:00 local
        ("Africa/Nairobi", utc(2024, 1, 1, 13, 59), True),  # 16:59 local
        ("Africa/Nairobi", utc(2024, 1, 1, 14, 0), False),  # 17:00 local
        ("Africa/Nairobi", utc(2024, 1, 1, 16, 0), False),  # 16:00 UTC would be open in UTC
        # Friday before the March change: EST (UTC-5).
        ("America/New_York", utc(2024, 3, 8, 13, 30), False),  # 08:30 EST
        ("America/New_York", utc(2024, 3, 8, 21, 30), True),  # 16:30 EST
        # Monday after it: EDT (UTC-4); the same UTC times flip.
        ("America/New_York", utc(2024, 3, 11, 13, 30), True),  # 09:30 EDT
        ("America/New_York", utc(2024, 3, 11, 21, 30), False),  # 17:30 EDT
        # Friday before the November change (EDT) and Monday after (EST).
        ("America/New_York", utc(2024, 11, 1, 13, 30), True),  # 09:30 EDT
        ("America/New_York", utc(2024, 11, 4, 13, 30), False),  # 08:30 EST
        ("America/New_York", utc(2024, 11, 4, 14, 0), True),  # 09:00 EST
    ],
)
def test_hours_in_their_time_zone(zone: str | None, at: datetime, expected: bool) -> None:
    group = default_group("business_hours") if zone is None else hours(zone)
    assert is_open_at(group, at) is expected


def test_spring_forward_gap_uses_wall_clock() -> None:
    # On 2024-03-10 New York clocks jump from 02:00 EST to 03:00 EDT.
    business = hours("America/New_York", sunday={"open": "02:30", "close": "03:30"})
    assert is_open_at(business, utc(2024, 3, 10, 6, 59)) is False  # 01:59 EST
    assert is_open_at(business, utc(2024, 3, 10, 7, 0)) is True  # 03:00 EDT
    assert is_open_at(business, utc(2024, 3, 10, 7, 30)) is False  # 03:30 EDT


def test_local_weekday_decides_which_day_applies() -> None:
    # Sunday 21:30 UTC is Monday 00:30 in Nairobi.
    at = utc(2024, 3, 10, 21, 30)
    early_monday = hours("Africa/Nairobi", monday={"open": "00:00", "close": "01:00"})
    assert is_open_at(early_monday, at) is True
    assert is_open_at(hours("UTC", sunday={"open": "21:00", "close": "22:00"}), at) is True
    assert (
        is_open_at(hours("Africa/Nairobi", sunday={"open": "21:00", "close": "22:00"}), at) is False
    )

    # Saturday 02:00 UTC is Friday 21:00 in New York.
    late_friday = hours("America/New_York", friday={"open": "20:00", "close": "23:00"})
    assert is_open_at(late_friday, utc(2024, 1, 6, 2, 0)) is True
    assert (
        is_open_at(hours("UTC", friday={"open": "20:00", "close": "23:00"}), utc(2024, 1, 6, 2, 0))
        is False
    )


def test_input_time_zone_does_not_matter_only_the_instant() -> None:
    business = hours("Africa/Nairobi")
    instant = utc(2024, 1, 1, 6, 0)
    for tz in (NEW_YORK, timezone(timedelta(hours=5, minutes=30)), ZoneInfo("Asia/Tokyo")):
        assert is_open_at(business, instant.astimezone(tz)) is True
        assert is_open_at(business, (instant - timedelta(seconds=1)).astimezone(tz)) is False


def test_closed_day_is_never_open() -> None:
    business = hours(wednesday={"open": "00:00", "close": "23:59", "closed": True})
    for hour in range(24):
        assert is_open_at(business, utc(2024, 1, 3, hour, 30)) is False


def test_is_open_accepts_model() -> None:
    assert is_open_at(BusinessHours(timezone="Africa/Nairobi"), utc(2024, 1, 1, 6, 0)) is True


def test_is_open_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open_at(default_group("business_hours"), datetime(2024, 1, 1, 12, 0))


# ---------------------------------------------------------------------------
# in_quiet_hours
# ---------------------------------------------------------------------------


def quiet(
    start: str = "22:00", end: str = "08:00", tz: str = "UTC", *, enabled: bool = True
) -> dict[str, Any]:
    return validate_group(
        "notification_settings",
        {"quiet_hours": {"enabled": enabled, "start": start, "end": end, "timezone": tz}},
    )


@pytest.mark.parametrize(
    ("hour", "minute", "second", "expected"),
    [
        (21, 59, 59, False),
        (22, 0, 0, True),  # start is inclusive
        (23, 59, 59, True),
        (0, 0, 0, True),  # wraps past midnight
        (3, 0, 0, True),
        (7, 59, 59, True),
        (8, 0, 0, False),  # end is exclusive
        (12, 0, 0, False),
    ],
)
def test_quiet_hours_wrap_midnight(hour: int, minute: int, second: int, expected: bool) -> None:
    assert in_quiet_hours(quiet(), utc(2024, 1, 2, hour, minute, second)) is expected


@pytest.mark.parametrize(
    ("hour", "minute", "expected"),
    [(12, 59, False), (13, 0, True), (13, 59, True), (14, 0, False), (23, 0, False), (2, 0, False)],
)
def test_quiet_hours_same_day_window(hour: int, minute: int, expected: bool) -> None:
    assert in_quiet_hours(quiet("13:00", "14:00"), utc(2024, 1, 2, hour, minute)) is expected


@pytest.mark.parametrize("hour", [0, 7, 8, 12, 22, 23])
def test_quiet_hours_equal_start_and_end_is_empty(hour: int) -> None:
    assert in_quiet_hours(quiet("08:00", "08:00"), utc(2024, 1, 2, hour, 0)) is False


def test_quiet_hours_disabled_never_matches() -> None:
    assert in_quiet_hours(quiet(enabled=False), utc(2024, 1, 2, 23, 0)) is False
    assert in_quiet_hours(default_group("notification_settings"), utc(2024, 1, 2, 23, 0)) is False


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2024, 1, 2, 18, 59), False),  # 21:59 EAT
        (utc(2024, 1, 2, 19, 0), True),  # 22:00 EAT
        (utc(2024, 1, 2, 22, 0), True),  # 01:00 EAT next day
        (utc(2024, 1, 3, 4, 59), True),  # 07:59 EAT
        (utc(2024, 1, 3, 5, 0), False),  # 08:00 EAT
    ],
)
def test_quiet_hours_in_nairobi(at: datetime, expected: bool) -> None:
    assert in_quiet_hours(quiet(tz="Africa/Nairobi"), at) is expected


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2024, 3, 8, 12, 59), True),  # 07:59 EST
        (utc(2024, 3, 8, 13, 0), False),  # 08:00 EST
        (utc(2024, 3, 11, 11, 59), True),  # 07:59 EDT
        (utc(2024, 3, 11, 12, 0), False),  # 08:00 EDT
        (utc(2024, 11, 3, 5, 30), True),  # 01:30 EDT, first pass
        (utc(2024, 11, 3, 6, 30), True),  # 01:30 EST, repeated hour
    ],
)
def test_quiet_hours_in_new_york_across_dst(at: datetime, expected: bool) -> None:
    assert in_quiet_hours(quiet(tz="America/New_York"), at) is expected


def test_quiet_hours_accepts_model() -> None:
    settings = NotificationSettings.model_validate(quiet())
    assert in_quiet_hours(settings, utc(2024, 1, 2, 23, 0)) is True


@pytest.mark.parametrize("enabled", [True, False])
def test_quiet_hours_rejects_naive_datetime(enabled: bool) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        in_quiet_hours(quiet(enabled=enabled), datetime(2024, 1, 2, 23, 0))


hhmm_values = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))


@given(
    hhmm_values,
    hhmm_values,
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_swapping_start_and_end_gives_the_complement(start: str, end: str, at: datetime) -> None:
    if start == end:
        assert in_quiet_hours(quiet(start, end), at) is False
    else:
        assert in_quiet_hours(quiet(start, end), at) is not in_quiet_hours(quiet(end, start), at)
