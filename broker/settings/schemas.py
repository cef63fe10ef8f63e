"""Typed schemas for tenant settings.

Tenant settings are non-sensitive preferences stored as one JSON column per
*group*.  Each group has a pydantic model below; :data:`SETTINGS_GROUPS` maps the
public group name to its model.

Conventions shared by every model in this module:

* ``extra="forbid"`` so misspelt or unknown keys are rejected with an error whose
  ``loc`` names the offending key.
* Every field of a group has a default, so ``Group()`` is the default value of
  that group and a key removed by a merge patch falls back to its default.
* Booleans, integers and floats are *strict*: ``"yes"``/``1`` are not booleans and
  ``true``/``"365"`` are not integers.  Lax coercion would, for example, silently
  turn ``data_retention_days: true`` into a retention period of one day.
* Validated string types (URLs, colours, time zones) are stored as plain ``str``
  so that ``model_dump(mode="json")`` produces JSON-ready data.

Secrets never belong here; they live in the vault.
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from broker.core.errors import schema_names
from broker.integrations.egress import EgressPolicy, EgressRefused, screen_url

__all__ = [
    "group_field_names",
    "group_model",
    "HHMM",
    "READ_ONLY_GROUPS",
    "SETTINGS_GROUPS",
    "AIBotSettings",
    "AnalyticsSettings",
    "AppointmentSettings",
    "BrandingSettings",
    "BusinessHours",
    "CatalogSettings",
    "ComplianceSettings",
    "DayHours",
    "EmailNotifications",
    "FeatureFlags",
    "HexColor",
    "HttpsUrl",
    "InAppNotifications",
    "IntegrationProvider",
    "IntegrationStatus",
    "IntegrationSyncSettings",
    "IntegrationsStatus",
    "LanguageTag",
    "LocalizationSettings",
    "MessageTemplate",
    "MessagingSettings",
    "NotificationSettings",
    "OrderSettings",
    "QuietHours",
    "RateLimits",
    "SettingsPatch",
    "SettingsView",
    "SmsNotifications",
    "TimeZoneName",
    "UnknownSettingsGroupError",
    "WebhookEndpoint",
    "WebhookEvent",
    "WebhookSettings",
    "apply_merge_patch",
    "default_group",
    "group_urls",
    "validate_group",
]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_nul(item) for item in value)
    return False


class _Model(BaseModel):
    """Base for every settings model: unknown keys and NUL characters are rejected."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any, info: ValidationInfo) -> Any:
        # PostgreSQL cannot store NUL in JSONB: refuse it here (422), not at the
        # database (500). Nested models run this validator themselves. What was
        # read from the database (`STORED`) cannot hold one: not looked for again.
        if not (info.context or {}).get("stored") and _has_nul(value):
            raise ValueError("must not contain NUL characters")
        return value


def _int(ge: int, le: int) -> Any:
    """Field constraints for a strict bounded integer (``Annotated`` metadata)."""
    return Field(ge=ge, le=le, strict=True)


# ---------------------------------------------------------------------------
# Shared validated types
# ---------------------------------------------------------------------------

# ``[0-9]`` rather than ``\d``: pydantic's (Rust) regex engine treats ``\d`` as any
# Unicode digit, which would admit e.g. Arabic-Indic digits and break the
# lexicographic comparison of HH:MM strings used by the business-hours checks.
_HHMM_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"

HHMM = Annotated[str, StringConstraints(strict=True, pattern=_HHMM_PATTERN)]
"""A 24-hour ``HH:MM`` wall-clock time, ``00:00`` to ``23:59`` (zero padded)."""

# Shape of an IANA key; the authoritative check is that zoneinfo can load it.
_TZ_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*")
# Loadable from the system tz database but not usable as a tenant time zone:
# "localtime" depends on the host, "Factory" is a placeholder, and the "posix/"
# and "right/" trees are alternative copies ("right/" counts leap seconds).
_TZ_REJECTED_KEYS = frozenset({"localtime", "Factory", "posixrules"})
_TZ_REJECTED_PREFIXES = ("posix/", "right/")


def _check_time_zone(value: str) -> str:
    ok = (
        _TZ_KEY_RE.fullmatch(value) is not None
        and value not in _TZ_REJECTED_KEYS
        and not value.startswith(_TZ_REJECTED_PREFIXES)
    )
    if ok:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            ok = False
    if not ok:
        raise PydanticCustomError(
            "time_zone",
            # Never the value: a rejected input may be anything, a secret included.
            "unknown time zone; use an IANA name such as 'UTC' or 'Africa/Nairobi'",
        )
    return value


TimeZoneName = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=64),
    AfterValidator(_check_time_zone),
]
"""An IANA time zone name that :class:`zoneinfo.ZoneInfo` can load (case-sensitive)."""

_HEX_COLOR_RE = re.compile(r"#[0-9a-fA-F]{6}")


def _check_hex_color(value: str) -> str:
    if _HEX_COLOR_RE.fullmatch(value) is None:
        raise PydanticCustomError(
            "hex_color",
            "colour must be '#' followed by six hex digits, e.g. '#007bff'",
        )
    return value.lower()


HexColor = Annotated[str, StringConstraints(strict=True), AfterValidator(_check_hex_color)]
"""A ``#rrggbb`` colour; accepted in either case and normalised to lowercase."""

# Hostname characters we accept outside of an IPv6 literal.  Non-ASCII letters are
# allowed for internationalised domain names.
_HOST_RE = re.compile(r"[^\W_](?:[\w\-.]*[^\W_])?")
_IPV6_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]")


# The production policy, whatever the deployment's egress settings: the broker never
# calls these URLs itself, so there is no test or dev server to let through.
_URL_POLICY = EgressPolicy()


def _url_error(reason: str) -> PydanticCustomError:
    return PydanticCustomError("https_url", "invalid https URL: {reason}", {"reason": reason})


# Validation context for rows read back from the database: a URL stored before the
# public-host rule existed must not make the tenant's settings unreadable (it is
# refused when written again, and anything that calls it goes through the egress guard).
STORED = {"stored": True}


def _check_https_url(value: str, info: ValidationInfo) -> str:
    parts = _split_url(value)
    _check_host(parts)
    try:
        # Webhooks are called and logos fetched from inside someone's network: the egress
        # policy's DNS-free checks refuse loopback, private and metadata targets in every
        # spelling (2130706433, [::ffff:127.0.0.1], metadata.google.internal, ...).
        if not (info.context or {}).get("stored"):
            screen_url(value, _URL_POLICY)
    except EgressRefused as exc:
        raise _url_error(str(exc)) from None
    # Normalise only the scheme's case; keep the rest exactly as given.
    return "https" + value[len(parts.scheme) :]


def _split_url(value: str) -> SplitResult:
    """The parts of an https URL whose characters, port and scheme are acceptable."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        # urlsplit silently strips tabs/newlines, so reject them up front.
        raise _url_error("whitespace and control characters are not allowed")
    if "\\" in value:
        # Browsers treat "\" like "/", so it can change where the host ends.
        raise _url_error("backslashes are not allowed")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for an out-of-range or non-numeric port
    except ValueError as exc:
        raise _url_error(str(exc)) from None
    if port == 0:
        raise _url_error("port 0 is not allowed")
    if parts.scheme.lower() != "https":
        raise _url_error("scheme must be https")
    return parts


def _check_host(parts: SplitResult) -> None:
    """A host is present, well formed, and carries no credentials."""
    if "@" in parts.netloc:
        raise _url_error("credentials (user:password@) are not allowed")
    host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if parts.hostname is None or not host:
        raise _url_error("a host is required")
    if _HOST_RE.fullmatch(host) is None and _IPV6_HOST_RE.fullmatch(host) is None:
        raise _url_error("host is not a valid domain name or IP address")


HttpsUrl = Annotated[
    str,
    StringConstraints(strict=True, max_length=2048),
    AfterValidator(_check_https_url),
]
"""An absolute ``https://`` URL to a public host, with no user info, stored as ``str``."""

_LANGUAGE_TAG_RE = re.compile(
    r"(?P<language>[a-z]{2,3})(?:-(?P<script>[a-z]{4}))?(?:-(?P<region>[a-z]{2}|[0-9]{3}))?",
    re.IGNORECASE,
)


def _check_language_tag(value: str) -> str:
    match = _LANGUAGE_TAG_RE.fullmatch(value)
    if match is None:
        raise PydanticCustomError(
            "language_tag",
            "language must be a BCP 47 tag such as 'en', 'sw' or 'en-KE'",
        )
    # Canonical BCP 47 casing: language lower, Script title, REGION upper.
    tag = match["language"].lower()
    if match["script"]:
        tag += "-" + match["script"].title()
    if match["region"]:
        tag += "-" + match["region"].upper()
    return tag


LanguageTag = Annotated[str, StringConstraints(strict=True), AfterValidator(_check_language_tag)]
"""A simple BCP 47 tag: language, optional script, optional region (``en``, ``en-KE``)."""


# ---------------------------------------------------------------------------
# notification_settings
# ---------------------------------------------------------------------------


class EmailNotifications(_Model):
    order_received: StrictBool = True
    low_stock: StrictBool = True
    daily_summary: StrictBool = True
    weekly_report: StrictBool = False


class SmsNotifications(_Model):
    critical_alerts: StrictBool = True
    payment_failed: StrictBool = True


class InAppNotifications(_Model):
    new_message: StrictBool = True
    handoff_request: StrictBool = True


class QuietHours(_Model):
    """Window in which notifications are held back.

    ``start``/``end`` are local times in ``timezone``; the window is
    ``[start, end)`` and may wrap past midnight (``22:00``-``08:00``).  When
    ``start == end`` the window is empty.
    """

    enabled: StrictBool = False
    start: HHMM = "22:00"
    end: HHMM = "08:00"
    timezone: TimeZoneName = "UTC"


class NotificationSettings(_Model):
    email: EmailNotifications = Field(default_factory=EmailNotifications)
    sms: SmsNotifications = Field(default_factory=SmsNotifications)
    in_app: InAppNotifications = Field(default_factory=InAppNotifications)
    quiet_hours: QuietHours = Field(default_factory=QuietHours)


# ---------------------------------------------------------------------------
# feature_flags
# ---------------------------------------------------------------------------


class FeatureFlags(_Model):
    ai_responses_enabled: StrictBool = True
    auto_handoff_enabled: StrictBool = False
    product_recommendations: StrictBool = True
    appointment_reminders: StrictBool = True
    abandoned_cart_recovery: StrictBool = False
    multi_language_support: StrictBool = False


# ---------------------------------------------------------------------------
# business_hours
# ---------------------------------------------------------------------------


class DayHours(_Model):
    """Opening hours for one weekday, as the half-open local window ``[open, close)``.

    Overnight windows are deliberately NOT supported: unless ``closed`` is true,
    ``open`` must be strictly earlier than ``close`` on the same day.  Because
    ``24:00`` is not a valid ``HH:MM`` value, the latest possible closing time
    is ``23:59``.  (Allowing ``close <= open`` to mean "closes after midnight"
    would make the window belong to two calendar days; that is out of scope.)
    """

    open: HHMM = "09:00"
    close: HHMM = "17:00"
    closed: StrictBool = False

    @model_validator(mode="after")
    def _open_before_close(self) -> DayHours:
        # HH:MM strings are zero padded, so string order is time order.
        if not self.closed and self.open >= self.close:
            raise PydanticCustomError(
                "business_hours_window",
                "close ({close}) must be later than open ({open}) on the same day; "
                "overnight hours are not supported",
                {"open": self.open, "close": self.close},
            )
        return self


def _weekend() -> DayHours:
    return DayHours(closed=True)


class BusinessHours(_Model):
    timezone: TimeZoneName = "UTC"
    monday: DayHours = Field(default_factory=DayHours)
    tuesday: DayHours = Field(default_factory=DayHours)
    wednesday: DayHours = Field(default_factory=DayHours)
    thursday: DayHours = Field(default_factory=DayHours)
    friday: DayHours = Field(default_factory=DayHours)
    saturday: DayHours = Field(default_factory=_weekend)
    sunday: DayHours = Field(default_factory=_weekend)


# ---------------------------------------------------------------------------
# integrations_status (system-maintained, read-only through the API)
# ---------------------------------------------------------------------------

IntegrationProvider = Literal["twilio", "woocommerce", "shopify", "whatsapp", "openai"]


class IntegrationStatus(_Model):
    enabled: StrictBool = False
    last_sync: AwareDatetime | None = None
    sync_status: Literal["never", "success", "failed", "running"] = "never"
    product_count: Annotated[int, Field(ge=0, strict=True)] | None = None
    last_test_at: AwareDatetime | None = None
    last_test_ok: StrictBool | None = None
    last_test_reason: Annotated[str, StringConstraints(max_length=200)] | None = None
    # An OAuth connection whose grant the provider refused: the tenant must reconnect.
    needs_reconnect: StrictBool = False
    # When a connection the broker cannot refresh (a Meta business token) stops working;
    # None: it never expires, or the broker renews it (Shopify), or it is pasted.
    connection_expires_at: AwareDatetime | None = None
    # Scheduled health checks (issue 16): the latest verdict, its reason and time.
    health: Literal["unknown", "healthy", "failing", "needs_reconnect"] = "unknown"
    health_reason: Annotated[str, StringConstraints(max_length=200)] | None = None
    health_checked_at: AwareDatetime | None = None
    # How services receive the credentials: as stored, or a key minted per lease (issue 15).
    delivery: Literal["static", "dynamic"] = "static"
    # Age (issue 16): first stored, last rotated, and the rotation or expiry state the
    # hourly age sweep last announced ("ok" until it announces one; None: nothing stored).
    created_at: AwareDatetime | None = None
    rotated_at: AwareDatetime | None = None
    age: Literal["ok", "due", "overdue", "expiring", "expired"] | None = None


class IntegrationsStatus(_Model):
    """Status per provider.

    Modelled with one field per allowed provider (rather than a free-form
    mapping) so that an unknown provider is rejected like any other unknown key;
    a provider that was never configured simply has the default status.
    """

    twilio: IntegrationStatus = Field(default_factory=IntegrationStatus)
    woocommerce: IntegrationStatus = Field(default_factory=IntegrationStatus)
    shopify: IntegrationStatus = Field(default_factory=IntegrationStatus)
    whatsapp: IntegrationStatus = Field(default_factory=IntegrationStatus)
    openai: IntegrationStatus = Field(default_factory=IntegrationStatus)


# ---------------------------------------------------------------------------
# branding
# ---------------------------------------------------------------------------


class BrandingSettings(_Model):
    business_name: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    logo_url: HttpsUrl | None = None
    primary_color: HexColor = "#007bff"
    welcome_message: Annotated[str, StringConstraints(max_length=1000)] = ""
    footer_text: Annotated[str, StringConstraints(max_length=200)] = ""


# ---------------------------------------------------------------------------
# compliance_settings
# ---------------------------------------------------------------------------


class ComplianceSettings(_Model):
    gdpr_enabled: StrictBool = True
    data_retention_days: Annotated[int, _int(1, 3650)] = 365
    consent_required: StrictBool = True
    privacy_policy_url: HttpsUrl | None = None
    terms_url: HttpsUrl | None = None


# ---------------------------------------------------------------------------
# additional groups
# ---------------------------------------------------------------------------


class RateLimits(_Model):
    requests_per_minute: Annotated[int, _int(1, 10_000)] = 600
    burst: Annotated[int, _int(1, 1000)] = 100


WebhookEvent = Literal[
    "order.created",
    "order.updated",
    "message.received",
    "payment.failed",
    "handoff.requested",
]


class WebhookEndpoint(_Model):
    """A webhook target.  Signing secrets are stored in the vault, never here."""

    url: HttpsUrl
    events: Annotated[list[WebhookEvent], Field(min_length=1)]
    enabled: StrictBool = True

    @field_validator("events")
    @classmethod
    def _unique_events(cls, events: list[str]) -> list[str]:
        if len(set(events)) != len(events):
            raise PydanticCustomError("duplicate_event", "events must not contain duplicates")
        return events


class WebhookSettings(_Model):
    endpoints: Annotated[list[WebhookEndpoint], Field(max_length=20)] = Field(default_factory=list)


class LocalizationSettings(_Model):
    default_language: LanguageTag = "en"
    currency: Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Z]{3}$")] = "USD"
    date_format: Literal["YYYY-MM-DD", "DD/MM/YYYY", "MM/DD/YYYY"] = "YYYY-MM-DD"
    timezone: TimeZoneName = "UTC"


class AnalyticsSettings(_Model):
    data_retention_days: Annotated[int, _int(1, 3650)] = 365
    anonymize_customers: StrictBool = False
    share_usage: StrictBool = False


class AIBotSettings(_Model):
    response_tone: Literal["friendly", "professional", "concise", "playful"] = "friendly"
    fallback_behavior: Literal["handoff", "apologize", "collect_contact"] = "handoff"
    confidence_threshold: Annotated[
        float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)
    ] = 0.7
    max_response_chars: Annotated[int, _int(50, 4000)] = 1000


class CatalogSettings(_Model):
    auto_sync: StrictBool = True
    sync_interval_minutes: Annotated[int, _int(5, 1440)] = 60
    price_rounding: Literal["none", "nearest_0.05", "nearest_0.10", "nearest_1"] = "none"


class OrderSettings(_Model):
    auto_confirm: StrictBool = False
    payment_grace_period_hours: Annotated[int, _int(0, 168)] = 24


_SLUG_PATTERN = r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$"


class MessageTemplate(_Model):
    name: Annotated[
        str, StringConstraints(strict=True, min_length=1, max_length=64, pattern=_SLUG_PATTERN)
    ]
    body: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=1024)]


class MessagingSettings(_Model):
    templates: Annotated[list[MessageTemplate], Field(max_length=100)] = Field(default_factory=list)
    quick_replies: Annotated[
        list[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=200)]],
        Field(max_length=50),
    ] = Field(default_factory=list)

    @field_validator("templates")
    @classmethod
    def _unique_template_names(cls, templates: list[MessageTemplate]) -> list[MessageTemplate]:
        seen: set[str] = set()
        for position, template in enumerate(templates, start=1):
            if template.name in seen:
                raise PydanticCustomError(
                    "duplicate_template",
                    "template {position} repeats the name of an earlier template",
                    {"position": position},
                )
            seen.add(template.name)
        return templates


class AppointmentSettings(_Model):
    buffer_minutes: Annotated[int, _int(0, 240)] = 15
    cancellation_notice_hours: Annotated[int, _int(0, 720)] = 24
    reminders_enabled: StrictBool = True


class IntegrationSyncSettings(_Model):
    sync_frequency_minutes: Annotated[int, _int(5, 1440)] = 60
    error_notification_threshold: Annotated[int, _int(1, 100)] = 3


# ---------------------------------------------------------------------------
# Registry and helpers
# ---------------------------------------------------------------------------

SETTINGS_GROUPS: dict[str, type[BaseModel]] = {
    "notification_settings": NotificationSettings,
    "feature_flags": FeatureFlags,
    "business_hours": BusinessHours,
    "integrations_status": IntegrationsStatus,
    "branding": BrandingSettings,
    "compliance_settings": ComplianceSettings,
    "rate_limits": RateLimits,
    "webhooks": WebhookSettings,
    "localization": LocalizationSettings,
    "analytics": AnalyticsSettings,
    "ai_bot": AIBotSettings,
    "catalog": CatalogSettings,
    "orders": OrderSettings,
    "messaging": MessagingSettings,
    "appointments": AppointmentSettings,
    "integration_sync": IntegrationSyncSettings,
}
"""Public group name -> model, in display order."""

READ_ONLY_GROUPS: frozenset[str] = frozenset({"integrations_status"})
"""Groups maintained by the system; they are not accepted in a :class:`SettingsPatch`."""


class UnknownSettingsGroupError(KeyError):
    """Raised for a group name that is not in :data:`SETTINGS_GROUPS`."""


def _group_model(name: str) -> type[BaseModel]:
    try:
        return SETTINGS_GROUPS[name]
    except KeyError:
        raise UnknownSettingsGroupError(name) from None


def default_group(name: str) -> dict[str, Any]:
    """Return the default value of group ``name`` as a JSON-ready dict."""
    return _group_model(name)().model_dump(mode="json")


def apply_merge_patch(current: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch and return the result.

    A dict patch is merged key by key (recursively); a ``None`` value removes the
    key; any non-dict patch replaces the target outright.  Neither argument is
    modified.  Validate the result with :func:`validate_group`, which fills
    removed keys back in with their defaults.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[Any, Any] = copy.deepcopy(current) if isinstance(current, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def _is_url_field(metadata: list[Any], annotation: Any) -> bool:
    """Whether a field is an :data:`HttpsUrl` (alone or inside ``| None``)."""
    if any(isinstance(m, AfterValidator) and m.func is _check_https_url for m in metadata):
        return True
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return _is_url_field(extra, inner)
    return any(_is_url_field([], arg) for arg in get_args(annotation))


def _urls_in(value: Any, loc: tuple[str | int, ...]) -> list[tuple[str, str]]:
    if isinstance(value, list):
        return [url for i, item in enumerate(value) for url in _urls_in(item, (*loc, i))]
    if not isinstance(value, BaseModel):
        return []
    found: list[tuple[str, str]] = []
    for name, info in type(value).model_fields.items():
        item = getattr(value, name)
        if isinstance(item, str) and _is_url_field(info.metadata, info.annotation):
            found.append((".".join(str(part) for part in (*loc, name)), item))
        else:
            found.extend(_urls_in(item, (*loc, name)))
    return found


def group_urls(name: str, value: Any) -> list[tuple[str, str]]:
    """Every :data:`HttpsUrl` in a valid group value, as ``(dotted location, url)``."""
    return _urls_in(_group_model(name).model_validate(value), (name,))


def validate_group(name: str, value: Any) -> dict[str, Any]:
    """Validate ``value`` against group ``name``'s model and return the JSON-ready dict.

    Raises :class:`pydantic.ValidationError` (``loc`` relative to the group) for
    invalid data and :class:`UnknownSettingsGroupError` for an unknown group.
    """
    return _group_model(name).model_validate(value).model_dump(mode="json")


def group_model(name: str) -> type[BaseModel]:
    """The model of settings group ``name``."""
    return _group_model(name)


def group_field_names(name: str) -> frozenset[str]:
    """Every field name group ``name``'s schema declares, at any depth."""
    return schema_names(_group_model(name).model_json_schema())


_GroupPatch = dict[str, Any] | None


class SettingsPatch(_Model):
    """Body of ``PATCH`` on tenant settings: a JSON merge patch per writable group.

    Each field holds the raw merge patch for that group; the merged result is
    validated by :func:`validate_group`.  Read-only groups (``integrations_status``)
    are not fields, so sending them is rejected as an unknown key.

    Use ``model_dump(exclude_unset=True)`` to find the groups to change: a group
    sent as ``null`` is then present with value ``None``, which (per RFC 7396)
    removes the whole group, i.e. resets it to its defaults, while omitted groups
    are left untouched.
    """

    notification_settings: _GroupPatch = None
    feature_flags: _GroupPatch = None
    business_hours: _GroupPatch = None
    branding: _GroupPatch = None
    compliance_settings: _GroupPatch = None
    rate_limits: _GroupPatch = None
    webhooks: _GroupPatch = None
    localization: _GroupPatch = None
    analytics: _GroupPatch = None
    ai_bot: _GroupPatch = None
    catalog: _GroupPatch = None
    orders: _GroupPatch = None
    messaging: _GroupPatch = None
    appointments: _GroupPatch = None
    integration_sync: _GroupPatch = None


class SettingsView(_Model):
    """All settings of one tenant (the ``GET`` response).

    A group missing from storage (e.g. one added after the row was written) is
    filled with its defaults.
    """

    tenant_id: str
    version: int
    updated_at: datetime
    updated_by: str | None = None
    notification_settings: NotificationSettings = Field(default_factory=NotificationSettings)
    feature_flags: FeatureFlags = Field(default_factory=FeatureFlags)
    business_hours: BusinessHours = Field(default_factory=BusinessHours)
    integrations_status: IntegrationsStatus = Field(default_factory=IntegrationsStatus)
    branding: BrandingSettings = Field(default_factory=BrandingSettings)
    compliance_settings: ComplianceSettings = Field(default_factory=ComplianceSettings)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    localization: LocalizationSettings = Field(default_factory=LocalizationSettings)
    analytics: AnalyticsSettings = Field(default_factory=AnalyticsSettings)
    ai_bot: AIBotSettings = Field(default_factory=AIBotSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    orders: OrderSettings = Field(default_factory=OrderSettings)
    messaging: MessagingSettings = Field(default_factory=MessagingSettings)
    appointments: AppointmentSettings = Field(default_factory=AppointmentSettings)
    integration_sync: IntegrationSyncSettings = Field(default_factory=IntegrationSyncSettings)
