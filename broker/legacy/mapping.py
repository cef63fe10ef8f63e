"""How legacy data maps onto the broker: tenant ids, metadata keys, Twilio columns.

Pure functions, no I/O: the migration plans with them, and so does its dry run.
"""

from __future__ import annotations

import hmac
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from broker.core.errors import ValidationFailed, error_location, unknown_field_message
from broker.core.identifiers import TENANT_ID
from broker.core.logging import is_plain_name
from broker.integrations.providers import PROVIDERS, Credentials
from broker.legacy.reports import UnmappedKey
from broker.legacy.source import LegacyRow
from broker.settings.schemas import (
    READ_ONLY_GROUPS,
    SETTINGS_GROUPS,
    apply_merge_patch,
    group_field_names,
    group_model,
    validate_group,
)
from broker.tenants.schemas import RESERVED_IDS

__all__ = [
    "FIELD_ALIASES",
    "GROUP_ALIASES",
    "PROVIDER",
    "Twilio",
    "changed_groups",
    "classify_twilio",
    "map_metadata",
    "normalise_tenant_id",
    "row_identity",
    "same_credentials",
]

PROVIDER = "twilio"

GROUP_ALIASES: dict[str, str] = {
    **{name: name for name in SETTINGS_GROUPS if name not in READ_ONLY_GROUPS},
    "notifications": "notification_settings",
    "features": "feature_flags",
    "compliance": "compliance_settings",
    "hours": "business_hours",
    "locale": "localization",
    "bot": "ai_bot",
}
"""Legacy metadata keys naming a whole settings group (or a dotted key's first part)."""

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "logo_url": ("branding", "logo_url"),
    "primary_color": ("branding", "primary_color"),
    "brand_color": ("branding", "primary_color"),
    "business_name": ("branding", "business_name"),
    "welcome_message": ("branding", "welcome_message"),
    "language": ("localization", "default_language"),
    "currency": ("localization", "currency"),
    "timezone": ("localization", "timezone"),
}
"""Flat legacy metadata keys that name one field of a settings group."""

Settings = Callable[[str], Mapping[str, Any]]
"""A tenant's current value of a settings group, by group name."""


# -- tenant ids ---------------------------------------------------------------------------


def normalise_tenant_id(legacy_id: str) -> str | None:
    """The broker tenant id for a legacy id, deterministically; None when there is none.

    A legacy id that already is a valid tenant id (after trimming and
    lowercasing) is kept. Otherwise accents are folded, every run of other
    characters becomes one '-', and the result is trimmed to 63 characters.
    Reserved ids get a `-legacy` suffix.
    """
    text = legacy_id.strip().lower()
    if not TENANT_ID.fullmatch(text):
        folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
        text = re.sub(r"[^a-z0-9]+", "-", folded).strip("-")[:63].strip("-")
    if not text:
        return None
    if text in RESERVED_IDS:
        text = f"{text}-legacy"
    return text


# -- metadata -----------------------------------------------------------------------------


def map_metadata(metadata: Any, current: Settings) -> tuple[dict[str, Any], list[UnmappedKey]]:
    """Split legacy metadata into settings merge patches (per group) and unmapped keys.

    Keys may name a group (`business_hours`, or an alias such as
    `notifications`), a field through a dotted path (`branding.logo_url`), or a
    known flat field (`logo_url`). Each key is validated, as the API would,
    against the group's current value (`current(group)`) merged with the keys
    accepted before it; a key that fails is reported and left out, so one bad
    key does not cost its neighbours.
    """
    if metadata is None:
        return {}, []
    if not isinstance(metadata, dict):
        return {}, [UnmappedKey("(metadata)", "the metadata is not a JSON object")]
    patches: dict[str, Any] = {}
    unmapped: list[UnmappedKey] = []
    for key in sorted(metadata, key=str):
        accepted = _map_key(key, metadata[key], patches, current)
        if isinstance(accepted, UnmappedKey):
            unmapped.append(accepted)
        else:
            group, patch = accepted
            patches[group] = patch
    return patches, unmapped


def _map_key(
    key: object, value: Any, patches: Mapping[str, Any], current: Settings
) -> tuple[str, Any] | UnmappedKey:
    """(group, the group's patch with this key merged in), or why the key is left out."""
    name = _safe_key(key)
    target = _target(key)
    if isinstance(target, str):
        return UnmappedKey(name, target)
    group, path = target
    if value is None:
        return UnmappedKey(name, "the value is null; nothing to migrate")
    if not path and not isinstance(value, dict):
        return UnmappedKey(name, f"{group} must be an object")
    key_patch: Any = value
    for segment in reversed(path):
        key_patch = {segment: key_patch}
    candidate = apply_merge_patch(patches.get(group, {}), key_patch)
    try:
        validate_group(group, apply_merge_patch(dict(current(group)), candidate))
    except ValidationError as exc:
        return UnmappedKey(name, f"not valid for {group}: {_describe(group, candidate, exc)}")
    return group, candidate


def changed_groups(patch: Mapping[str, Any], current: Settings) -> list[str]:
    """The groups whose validated value the patch would change."""
    changed = []
    for name, group_patch in patch.items():
        before = validate_group(name, dict(current(name)))
        if validate_group(name, apply_merge_patch(dict(current(name)), group_patch)) != before:
            changed.append(name)
    return sorted(changed)


def _target(key: object) -> tuple[str, tuple[str, ...]] | str:
    """(group, field path) for a metadata key, or the reason it maps to nothing."""
    if not isinstance(key, str) or not key.strip():
        return "empty key"
    parts = tuple(part.strip() for part in key.strip().split("."))
    head = parts[0]
    if head in READ_ONLY_GROUPS:
        return f"{head} is maintained by the broker and is not migrated"
    if len(parts) == 1:
        if head in GROUP_ALIASES:
            return GROUP_ALIASES[head], ()
        if head in FIELD_ALIASES:
            path = FIELD_ALIASES[head]
            return path[0], path[1:]
        return "no settings group for this key"
    if head not in GROUP_ALIASES:
        return "no settings group for this key"
    if not all(parts[1:]):
        return "malformed dotted key"
    return GROUP_ALIASES[head], parts[1:]


def _safe_key(key: object) -> str:
    # Key names are not values, but a pasted secret can end up as a key: only
    # echo names that read as plain names (short words, no credential or number).
    if isinstance(key, str) and is_plain_name(key):
        return key
    return "(a key that is not shown)"


def _describe(group: str, submitted: Any, exc: ValidationError) -> str:
    # The report, `legacy_migrations` and the trail keep this: a name the group does
    # not declare is given by its position, and the value is never repeated.
    first = exc.errors(include_input=False, include_url=False)[0]
    where = error_location(first["loc"], submitted, known=group_field_names(group))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = unknown_field_message(group_model(group), first["loc"][:-1])
    return f"{where}: {message}" if where else message


# -- Twilio columns -----------------------------------------------------------------------


def _clean(value: Any) -> str | None:
    """A stripped secret value; blank counts as missing."""
    if value is None:
        return None
    text = str(value.get_secret_value()).strip()
    return text or None


def same_credentials(a: Credentials, b: Credentials) -> bool:
    """Compare two sets of credentials by fingerprint, never by value."""
    return hmac.compare_digest(a.fingerprint(), b.fingerprint())


@dataclass(frozen=True)
class Twilio:
    """What a legacy row's Twilio columns hold: nothing, half a pair, a bad pair, or creds."""

    kind: Literal["absent", "incomplete", "invalid", "valid"]
    creds: Credentials | None = None
    reason: str | None = None


def classify_twilio(row: LegacyRow) -> Twilio:
    """Classify (and, when whole, validate) a legacy row's Twilio columns."""
    sid, token = _clean(row.twilio_sid), _clean(row.twilio_token)
    if sid is None and token is None:
        return Twilio("absent")
    if sid is None or token is None:
        missing = "auth token" if token is None else "account SID"
        return Twilio(
            "incomplete",
            reason=f"the legacy Twilio credentials have no {missing}; the credential was "
            "not migrated",
        )
    try:
        creds = PROVIDERS[PROVIDER].validate({"account_sid": sid, "auth_token": token})
    except ValidationFailed as exc:
        messages = [str(e.get("message")) for e in exc.extra.get("errors") or []]
        return Twilio("invalid", reason="invalid Twilio credentials: " + "; ".join(messages))
    return Twilio("valid", creds=creds)


def row_identity(row: LegacyRow) -> tuple[Any, ...]:
    """What must agree for two legacy rows of one tenant to count as the same row."""
    metadata = json.dumps(row.metadata, sort_keys=True, default=str)
    name = (row.name or "").strip()
    return (name, _clean(row.twilio_sid), _clean(row.twilio_token), metadata)
