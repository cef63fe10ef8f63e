from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from broker.settings.schemas import (
    HHMM,
    READ_ONLY_GROUPS,
    SETTINGS_GROUPS,
    HexColor,
    HttpsUrl,
    LanguageTag,
    SettingsPatch,
    SettingsView,
    TimeZoneName,
    UnknownSettingsGroupError,
    apply_merge_patch,
    default_group,
    validate_group,
)

EXPECTED_GROUPS = [
    "notification_settings",
    "feature_flags",
    "business_hours",
    "integrations_status",
    "branding",
    "compliance_settings",
    "rate_limits",
    "webhooks",
    "localization",
    "analytics",
    "ai_bot",
    "catalog",
    "orders",
    "messaging",
    "appointments",
    "integration_sync",
]


def errors_of(name: str, value: Any) -> list[ErrorDetails]:
    with pytest.raises(ValidationError) as exc_info:
        validate_group(name, value)
    return exc_info.value.errors()


def locs_of(name: str, value: Any) -> list[tuple[int | str, ...]]:
    return [tuple(error["loc"]) for error in errors_of(name, value)]


# ---------------------------------------------------------------------------
# Shared types
# ---------------------------------------------------------------------------

hhmm = TypeAdapter(HHMM)
time_zone = TypeAdapter(TimeZoneName)
hex_color = TypeAdapter(HexColor)
https_url = TypeAdapter(HttpsUrl)
language_tag = TypeAdapter(LanguageTag)


@pytest.mark.parametrize("value", ["00:00", "09:05", "12:30", "19:59", "23:59"])
def test_hhmm_accepts_valid_times(value: str) -> None:
    assert hhmm.validate_python(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "25:00",
        "24:00",
        "9:00",
        "09:60",
        "09:5",
        "0900",
        "09:00:00",
        " 09:00",
        "09:00\n",
        "0\u0669:00",  # ARABIC-INDIC DIGIT NINE
        "",
        900,
    ],
)
def test_hhmm_rejects_invalid_times(value: object) -> None:
    with pytest.raises(ValidationError):
        hhmm.validate_python(value)


@given(st.integers(0, 23), st.integers(0, 59))
def test_hhmm_accepts_every_zero_padded_minute(hour: int, minute: int) -> None:
    value = f"{hour:02d}:{minute:02d}"
    assert hhmm.validate_python(value) == value


@pytest.mark.parametrize(
    "value",
    ["UTC", "Africa/Nairobi", "America/New_York", "America/Argentina/Buenos_Aires", "Etc/GMT+3"],
)
def test_time_zone_accepts_iana_names(value: str) -> None:
    assert time_zone.validate_python(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "Mars/Olympus",
        "utc",  # keys are case-sensitive
        "America",  # a directory, not a zone
        "",
        "../etc/passwd",
        "/etc/localtime",
        "America/../UTC",
        "localtime",  # host dependent
        "right/UTC",
        "zone.tab",  # a data file inside the tz database
        "UTC ",
        "+03:00",
    ],
)
def test_time_zone_rejects_unknown_names(value: str) -> None:
    with pytest.raises(ValidationError):
        time_zone.validate_python(value)


def test_time_zone_error_is_clear() -> None:
    errors = errors_of("localization", {"timezone": "Mars/Olympus"})
    assert [(e["loc"], e["type"]) for e in errors] == [(("timezone",), "time_zone")]
    # Clear, but without the rejected value: it could be anything, a secret included.
    assert "Mars/Olympus" not in errors[0]["msg"]
    assert "IANA" in errors[0]["msg"]
    assert "IANA" in errors[0]["msg"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("#007bff", "#007bff"), ("#ABCDEF", "#abcdef"), ("#aBc123", "#abc123")],
)
def test_hex_color_is_normalised_to_lowercase(value: str, expected: str) -> None:
    assert hex_color.validate_python(value) == expected


@pytest.mark.parametrize(
    "value", ["#12345", "#1234567", "123456", "#12345g", "#fff", "red", "#12 345", ""]
)
def test_hex_color_rejects_invalid(value: str) -> None:
    with pytest.raises(ValidationError) as exc_info:
        hex_color.validate_python(value)
    assert exc_info.value.errors()[0]["type"] == "hex_color"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com", "https://example.com"),
        ("https://example.com/logo.png?v=2#top", "https://example.com/logo.png?v=2#top"),
        ("https://cdn.example.co.ke:8443/a", "https://cdn.example.co.ke:8443/a"),
        ("https://[2606:4700:4700::1111]/x", "https://[2606:4700:4700::1111]/x"),
        ("https://93.184.216.34/x", "https://93.184.216.34/x"),
        ("HTTPS://example.com/Path", "https://example.com/Path"),
    ],
)
def test_https_url_accepts_and_is_plain_str(value: str, expected: str) -> None:
    result = https_url.validate_python(value)
    assert type(result) is str
    assert result == expected


@pytest.mark.parametrize(
    "value",
    [
        "http://x",
        "http://example.com/logo.png",
        "ftp://example.com",
        "https://user:pw@x",
        "https://user@example.com",
        "https://",
        "https:///path",
        "https://:443/",
        "https:example.com",
        "//example.com",
        "example.com",
        "javascript:alert(1)",
        "https://example.com:99999/",
        "https://example.com:0/",
        "https://example.com:abc/",
        "https://exa mple.com/",
        "https://example.com/\n",
        "https://evil.example\\@good.example/",
        "https://example.com/a\\b",
        "https://-bad-.example/",
        "https://" + "a" * 2048 + ".com",
    ],
)
def test_https_url_rejects_invalid(value: str) -> None:
    with pytest.raises(ValidationError):
        https_url.validate_python(value)


@pytest.mark.parametrize(
    "value",
    [
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://localhost:8443/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.5/hook",
        "https://172.16.3.4/hook",
        "https://192.168.1.1/logo.png",
        "https://100.100.100.200/latest/meta-data",
        "https://[fd00:ec2::254]/",
        "https://[fe80::1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://[::ffff:a9fe:a9fe]/",
        "https://2130706433/",
        "https://0x7f000001/",
        "https://017700000001/",
        "https://127.1/",
        "https://0/",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://metadata.goog/",
        "https://hooks.corp.internal/in",
        "https://printer.local/",
        "https://intranet/",
        "https://[2001:db8::1]/x",
        "https://203.0.113.7/x",
    ],
)
def test_https_url_rejects_non_public_targets(value: str) -> None:
    with pytest.raises(ValidationError) as exc_info:
        https_url.validate_python(value)
    error = exc_info.value.errors()[0]
    assert error["type"] == "https_url"
    # The message says what is wrong without repeating the address.
    assert value.split("/")[2] not in error["msg"]


def test_https_url_length_limit_is_2048() -> None:
    base = "https://example.com/"
    assert https_url.validate_python(base + "a" * (2048 - len(base)))
    with pytest.raises(ValidationError):
        https_url.validate_python(base + "a" * (2049 - len(base)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("en", "en"),
        ("sw", "sw"),
        ("en-KE", "en-KE"),
        ("en-ke", "en-KE"),
        ("zh-hant-TW", "zh-Hant-TW"),
        ("es-419", "es-419"),
    ],
)
def test_language_tag_accepts_and_canonicalises(value: str, expected: str) -> None:
    assert language_tag.validate_python(value) == expected


@pytest.mark.parametrize("value", ["", "e", "english", "en_KE", "en-", "en-KEN", "12"])
def test_language_tag_rejects_invalid(value: str) -> None:
    with pytest.raises(ValidationError):
        language_tag.validate_python(value)


# ---------------------------------------------------------------------------
# Registry and defaults
# ---------------------------------------------------------------------------


def test_groups_are_exactly_the_public_names_in_order() -> None:
    assert list(SETTINGS_GROUPS) == EXPECTED_GROUPS
    assert frozenset({"integrations_status"}) == READ_ONLY_GROUPS


@pytest.mark.parametrize("name", EXPECTED_GROUPS)
def test_default_is_valid_json_and_round_trips(name: str) -> None:
    default = default_group(name)
    assert json.loads(json.dumps(default)) == default
    assert validate_group(name, default) == default
    assert validate_group(name, {}) == default


@pytest.mark.parametrize("name", EXPECTED_GROUPS)
def test_default_group_returns_independent_copies(name: str) -> None:
    first = default_group(name)
    first["injected"] = True
    assert "injected" not in default_group(name)


def test_unknown_group_is_a_key_error() -> None:
    with pytest.raises(UnknownSettingsGroupError):
        default_group("secrets")
    with pytest.raises(KeyError):
        validate_group("secrets", {})


@pytest.mark.parametrize(
    ("name", "path", "expected"),
    [
        ("notification_settings", ("email", "weekly_report"), False),
        ("notification_settings", ("sms", "critical_alerts"), True),
        ("notification_settings", ("quiet_hours", "start"), "22:00"),
        ("notification_settings", ("quiet_hours", "end"), "08:00"),
        ("feature_flags", ("ai_responses_enabled",), True),
        ("feature_flags", ("auto_handoff_enabled",), False),
        ("business_hours", ("monday", "closed"), False),
        ("business_hours", ("friday", "close"), "17:00"),
        ("business_hours", ("saturday", "closed"), True),
        ("business_hours", ("sunday", "closed"), True),
        ("integrations_status", ("shopify", "sync_status"), "never"),
        ("branding", ("primary_color",), "#007bff"),
        ("branding", ("business_name",), None),
        ("compliance_settings", ("data_retention_days",), 365),
        ("rate_limits", ("requests_per_minute",), 600),
        ("localization", ("currency",), "USD"),
        ("ai_bot", ("confidence_threshold",), 0.7),
        ("integration_sync", ("error_notification_threshold",), 3),
    ],
)
def test_documented_defaults(name: str, path: tuple[str, ...], expected: object) -> None:
    value: Any = default_group(name)
    for key in path:
        value = value[key]
    assert value == expected


# ---------------------------------------------------------------------------
# Unknown keys and error locations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "loc"),
    [
        ("feature_flags", {"ai_response_enabled": True}, ("ai_response_enabled",)),
        (
            "notification_settings",
            {"email": {"order_recieved": False}},
            ("email", "order_recieved"),
        ),
        ("notification_settings", {"push": {}}, ("push",)),
        ("notification_settings", {"quiet_hours": {"tz": "UTC"}}, ("quiet_hours", "tz")),
        ("business_hours", {"monday": {"opens": "08:00"}}, ("monday", "opens")),
        ("business_hours", {"mon": {}}, ("mon",)),
        ("integrations_status", {"salesforce": {}}, ("salesforce",)),
        ("integrations_status", {"shopify": {"api_key": "x"}}, ("shopify", "api_key")),
        ("branding", {"logo": "https://x.example"}, ("logo",)),
        (
            "webhooks",
            {
                "endpoints": [
                    {"url": "https://x.example", "events": ["order.created"], "secret": "s"}
                ]
            },
            ("endpoints", 0, "secret"),
        ),
        (
            "messaging",
            {"templates": [{"name": "hi", "body": "x", "lang": "en"}]},
            ("templates", 0, "lang"),
        ),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(
    name: str, value: dict[str, Any], loc: tuple[int | str, ...]
) -> None:
    errors = errors_of(name, value)
    assert [(tuple(e["loc"]), e["type"]) for e in errors] == [(loc, "extra_forbidden")]


@pytest.mark.parametrize(
    ("name", "value", "loc"),
    [
        ("notification_settings", {"quiet_hours": {"start": "25:00"}}, ("quiet_hours", "start")),
        (
            "notification_settings",
            {"quiet_hours": {"timezone": "Mars/Olympus"}},
            ("quiet_hours", "timezone"),
        ),
        ("business_hours", {"tuesday": {"close": "9:00"}}, ("tuesday", "close")),
        ("business_hours", {"timezone": "Nairobi"}, ("timezone",)),
        ("branding", {"primary_color": "#12345"}, ("primary_color",)),
        ("branding", {"logo_url": "http://x"}, ("logo_url",)),
        ("compliance_settings", {"terms_url": "https://user:pw@x"}, ("terms_url",)),
        (
            "webhooks",
            {"endpoints": [{"url": "http://x", "events": ["order.created"]}]},
            ("endpoints", 0, "url"),
        ),
        ("integrations_status", {"twilio": {"product_count": -1}}, ("twilio", "product_count")),
    ],
)
def test_invalid_values_report_the_field_path(
    name: str, value: dict[str, Any], loc: tuple[int | str, ...]
) -> None:
    assert locs_of(name, value) == [loc]


def test_hex_color_is_normalised_in_the_stored_group() -> None:
    assert validate_group("branding", {"primary_color": "#FF00AA"})["primary_color"] == "#ff00aa"


# ---------------------------------------------------------------------------
# Bounds and strictness
# ---------------------------------------------------------------------------

BOUNDS = [
    ("compliance_settings", "data_retention_days", 1, 3650),
    ("analytics", "data_retention_days", 1, 3650),
    ("rate_limits", "requests_per_minute", 1, 10_000),
    ("rate_limits", "burst", 1, 1000),
    ("ai_bot", "max_response_chars", 50, 4000),
    ("catalog", "sync_interval_minutes", 5, 1440),
    ("orders", "payment_grace_period_hours", 0, 168),
    ("appointments", "buffer_minutes", 0, 240),
    ("appointments", "cancellation_notice_hours", 0, 720),
    ("integration_sync", "sync_frequency_minutes", 5, 1440),
    ("integration_sync", "error_notification_threshold", 1, 100),
]


@pytest.mark.parametrize(("name", "field", "low", "high"), BOUNDS)
def test_integer_bounds_are_inclusive(name: str, field: str, low: int, high: int) -> None:
    assert validate_group(name, {field: low})[field] == low
    assert validate_group(name, {field: high})[field] == high


@pytest.mark.parametrize(("name", "field", "low", "high"), BOUNDS)
def test_integer_out_of_bounds_rejected(name: str, field: str, low: int, high: int) -> None:
    assert locs_of(name, {field: low - 1}) == [(field,)]
    assert locs_of(name, {field: high + 1}) == [(field,)]


@pytest.mark.parametrize("value", [0, 3651, -1, True, "365", 365.0, None])
def test_data_retention_days_rejects(value: object) -> None:
    assert locs_of("compliance_settings", {"data_retention_days": value}) == [
        ("data_retention_days",)
    ]


@pytest.mark.parametrize("value", [1, "true", "yes", 0, None])
def test_booleans_are_strict(value: object) -> None:
    assert locs_of("feature_flags", {"ai_responses_enabled": value}) == [("ai_responses_enabled",)]


@pytest.mark.parametrize("value", [0, 0.0, 0.35, 1, 1.0])
def test_confidence_threshold_accepts_0_to_1(value: float) -> None:
    assert (
        validate_group("ai_bot", {"confidence_threshold": value})["confidence_threshold"] == value
    )


@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan"), float("inf"), "0.5", True])
def test_confidence_threshold_rejects(value: object) -> None:
    assert locs_of("ai_bot", {"confidence_threshold": value}) == [("confidence_threshold",)]


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("ai_bot", "response_tone", "sarcastic"),
        ("ai_bot", "fallback_behavior", "ignore"),
        ("catalog", "price_rounding", "nearest_0.5"),
        ("localization", "date_format", "DD-MM-YYYY"),
        ("localization", "currency", "usd"),
        ("localization", "currency", "US"),
        ("localization", "currency", "USDT"),
        ("localization", "default_language", "English"),
        ("branding", "business_name", ""),
        ("branding", "business_name", "x" * 101),
        ("branding", "welcome_message", "x" * 1001),
        ("branding", "footer_text", "x" * 201),
    ],
)
def test_enumerations_and_lengths(name: str, field: str, value: object) -> None:
    assert locs_of(name, {field: value}) == [(field,)]


@pytest.mark.parametrize(
    ("field", "value"),
    [("business_name", "x" * 100), ("welcome_message", "x" * 1000), ("footer_text", "x" * 200)],
)
def test_branding_text_at_max_length_is_accepted(field: str, value: str) -> None:
    assert validate_group("branding", {field: value})[field] == value


# ---------------------------------------------------------------------------
# business_hours
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("open_", "close"), [("17:00", "09:00"), ("09:00", "09:00"), ("22:00", "02:00")]
)
def test_business_day_requires_open_before_close(open_: str, close: str) -> None:
    errors = errors_of("business_hours", {"wednesday": {"open": open_, "close": close}})
    assert [(e["loc"], e["type"]) for e in errors] == [(("wednesday",), "business_hours_window")]


def test_closed_day_may_have_any_valid_window() -> None:
    result = validate_group(
        "business_hours", {"sunday": {"open": "17:00", "close": "09:00", "closed": True}}
    )
    assert result["sunday"] == {"open": "17:00", "close": "09:00", "closed": True}


def test_closed_day_still_needs_valid_times() -> None:
    assert locs_of("business_hours", {"sunday": {"open": "24:00", "closed": True}}) == [
        ("sunday", "open")
    ]


def test_business_day_latest_window() -> None:
    result = validate_group("business_hours", {"friday": {"open": "00:00", "close": "23:59"}})
    assert result["friday"] == {"open": "00:00", "close": "23:59", "closed": False}


# ---------------------------------------------------------------------------
# integrations_status
# ---------------------------------------------------------------------------


def test_integration_status_round_trips_datetimes_as_iso_strings() -> None:
    synced = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    stored = validate_group(
        "integrations_status",
        {
            "shopify": {
                "enabled": True,
                "last_sync": synced,
                "sync_status": "success",
                "product_count": 42,
            }
        },
    )
    assert stored["shopify"]["last_sync"] == "2024-05-01T12:30:00Z"
    assert stored["twilio"] == default_group("integrations_status")["twilio"]
    assert validate_group("integrations_status", json.loads(json.dumps(stored))) == stored


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sync_status", "ok"),
        ("last_sync", datetime(2024, 5, 1, 12, 30)),  # naive: ambiguous
        ("last_sync", "2024-05-01T12:30:00"),
        ("last_test_reason", "x" * 201),
        ("product_count", -5),
    ],
)
def test_integration_status_rejects(field: str, value: object) -> None:
    assert locs_of("integrations_status", {"openai": {field: value}}) == [("openai", field)]


# ---------------------------------------------------------------------------
# webhooks and messaging
# ---------------------------------------------------------------------------


def _endpoint(**overrides: Any) -> dict[str, Any]:
    return {"url": "https://hooks.example.com/in", "events": ["order.created"], **overrides}


def test_webhook_endpoint_defaults_to_enabled() -> None:
    result = validate_group("webhooks", {"endpoints": [_endpoint()]})
    assert result == {
        "endpoints": [
            {"url": "https://hooks.example.com/in", "events": ["order.created"], "enabled": True}
        ]
    }


@pytest.mark.parametrize(
    ("endpoint", "loc"),
    [
        (_endpoint(events=[]), ("endpoints", 0, "events")),
        (_endpoint(events=["order.deleted"]), ("endpoints", 0, "events", 0)),
        (_endpoint(events=["order.created", "order.created"]), ("endpoints", 0, "events")),
        ({"events": ["order.created"]}, ("endpoints", 0, "url")),
        ({"url": "https://hooks.example.com"}, ("endpoints", 0, "events")),
    ],
)
def test_webhook_endpoint_validation(endpoint: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    assert locs_of("webhooks", {"endpoints": [endpoint]}) == [loc]


def test_webhook_endpoint_count_is_capped_at_20() -> None:
    validate_group("webhooks", {"endpoints": [_endpoint()] * 20})
    assert locs_of("webhooks", {"endpoints": [_endpoint()] * 21}) == [("endpoints",)]


@pytest.mark.parametrize("name", ["welcome", "order-shipped", "a1_b2", "x" * 64])
def test_template_name_accepts_slugs(name: str) -> None:
    validate_group("messaging", {"templates": [{"name": name, "body": "hi"}]})


@pytest.mark.parametrize("name", ["", "Welcome", "two words", "-lead", "trail-", "a--b", "x" * 65])
def test_template_name_rejects_non_slugs(name: str) -> None:
    errors = locs_of("messaging", {"templates": [{"name": name, "body": "hi"}]})
    assert errors == [("templates", 0, "name")]


@pytest.mark.parametrize(
    ("value", "loc"),
    [
        ({"templates": [{"name": "a", "body": ""}]}, ("templates", 0, "body")),
        ({"templates": [{"name": "a", "body": "x" * 1025}]}, ("templates", 0, "body")),
        ({"templates": [{"name": "a", "body": "x"}, {"name": "a", "body": "y"}]}, ("templates",)),
        ({"templates": [{"name": f"t{i}", "body": "x"} for i in range(101)]}, ("templates",)),
        ({"quick_replies": [""]}, ("quick_replies", 0)),
        ({"quick_replies": ["ok", "x" * 201]}, ("quick_replies", 1)),
        ({"quick_replies": ["ok"] * 51}, ("quick_replies",)),
    ],
)
def test_messaging_limits(value: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    assert locs_of("messaging", value) == [loc]


# ---------------------------------------------------------------------------
# JSON merge patch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        # The examples from RFC 7396 appendix A.
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7396_examples(target: Any, patch: Any, expected: Any) -> None:
    assert apply_merge_patch(target, patch) == expected


def test_merge_patch_does_not_mutate_inputs() -> None:
    current = default_group("notification_settings")
    patch = {"email": {"low_stock": False}, "quiet_hours": None}
    current_before, patch_before = copy.deepcopy(current), copy.deepcopy(patch)
    result = apply_merge_patch(current, patch)
    assert current == current_before
    assert patch == patch_before
    result["email"]["order_received"] = False
    assert current["email"]["order_received"] is True


def test_nested_patch_only_changes_named_keys() -> None:
    current = validate_group(
        "notification_settings",
        {"email": {"weekly_report": True}, "sms": {"payment_failed": False}},
    )
    merged = apply_merge_patch(current, {"email": {"low_stock": False}})
    result = validate_group("notification_settings", merged)
    assert result["email"] == {
        "order_received": True,
        "low_stock": False,
        "daily_summary": True,
        "weekly_report": True,
    }
    assert result["sms"]["payment_failed"] is False


def test_null_resets_key_to_default_after_validation() -> None:
    current = validate_group(
        "notification_settings",
        {"email": {"weekly_report": True}, "quiet_hours": {"enabled": True, "start": "21:00"}},
    )
    merged = apply_merge_patch(current, {"email": {"weekly_report": None}, "quiet_hours": None})
    assert validate_group("notification_settings", merged) == default_group("notification_settings")


def test_null_list_field_resets_to_empty_default() -> None:
    current = validate_group("messaging", {"quick_replies": ["Thanks!"]})
    merged = apply_merge_patch(current, {"quick_replies": None})
    assert validate_group("messaging", merged)["quick_replies"] == []


def test_patch_replacing_group_with_non_object_fails_validation() -> None:
    merged = apply_merge_patch(default_group("feature_flags"), ["ai_responses_enabled"])
    with pytest.raises(ValidationError):
        validate_group("feature_flags", merged)


def test_patch_that_breaks_a_cross_field_rule_is_rejected() -> None:
    current = default_group("business_hours")
    merged = apply_merge_patch(current, {"monday": {"open": "18:00"}})
    assert locs_of("business_hours", merged) == [("monday",)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


@given(json_objects, json_objects)
def test_merge_patch_is_idempotent(target: dict[str, Any], patch: dict[str, Any]) -> None:
    once = apply_merge_patch(target, patch)
    assert apply_merge_patch(once, patch) == once


@given(json_objects)
def test_merge_patch_onto_empty_object_drops_nulls(patch: dict[str, Any]) -> None:
    assert apply_merge_patch({}, patch) == _without_nulls(patch)


# ---------------------------------------------------------------------------
# SettingsPatch / SettingsView
# ---------------------------------------------------------------------------


def test_settings_patch_has_every_writable_group() -> None:
    writable = [name for name in EXPECTED_GROUPS if name not in READ_ONLY_GROUPS]
    assert list(SettingsPatch.model_fields) == writable


@pytest.mark.parametrize("name", ["integrations_status", "secrets", "brandng"])
def test_settings_patch_rejects_read_only_and_unknown_groups(name: str) -> None:
    with pytest.raises(ValidationError) as exc_info:
        SettingsPatch.model_validate({name: {}})
    assert [(e["loc"], e["type"]) for e in exc_info.value.errors()] == [
        ((name,), "extra_forbidden")
    ]


def test_settings_patch_distinguishes_null_group_from_omitted() -> None:
    patch = SettingsPatch.model_validate(
        {"branding": None, "feature_flags": {"ai_responses_enabled": False}}
    )
    assert patch.model_dump(exclude_unset=True) == {
        "branding": None,
        "feature_flags": {"ai_responses_enabled": False},
    }


def test_settings_patch_group_must_be_an_object() -> None:
    with pytest.raises(ValidationError) as exc_info:
        SettingsPatch.model_validate({"branding": ["x"]})
    assert exc_info.value.errors()[0]["loc"] == ("branding",)


def test_settings_view_types_every_group_and_fills_missing_ones() -> None:
    updated_at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    view = SettingsView.model_validate(
        {
            "tenant_id": "t-1",
            "version": 3,
            "updated_at": updated_at,
            "updated_by": None,
            "branding": {"primary_color": "#FFFFFF"},
        }
    )
    dumped = view.model_dump(mode="json")
    assert list(dumped) == ["tenant_id", "version", "updated_at", "updated_by", *EXPECTED_GROUPS]
    for name in EXPECTED_GROUPS:
        assert isinstance(getattr(view, name), SETTINGS_GROUPS[name])
        if name != "branding":
            assert dumped[name] == default_group(name)
    assert dumped["branding"]["primary_color"] == "#ffffff"
    assert dumped["updated_at"] == "2024-01-02T03:04:05Z"


def test_settings_view_rejects_invalid_stored_group() -> None:
    with pytest.raises(ValidationError) as exc_info:
        SettingsView.model_validate(
            {
                "tenant_id": "t-1",
                "version": 1,
                "updated_at": datetime.now(UTC),
                "updated_by": "u-1",
                "rate_limits": {"burst": 0},
            }
        )
    assert [e["loc"] for e in exc_info.value.errors()] == [("rate_limits", "burst")]


@pytest.mark.parametrize("name", EXPECTED_GROUPS)
def test_every_model_forbids_extra_keys(name: str) -> None:
    def walk(model: type[BaseModel]) -> None:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for field in model.model_fields.values():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)

    walk(SETTINGS_GROUPS[name])
