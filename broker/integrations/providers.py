"""One small spec per integration provider: its fields, which are secret, how to mask
them, and how to test a set of credentials against the provider's API.

Secret fields end up encrypted in Vault and are only ever shown as a masked hint;
identifier fields (a store URL, a shop domain) are stored in PostgreSQL and shown as-is.
No message produced here ever contains a field's value.

Credentials are of the "static" kind (pasted by an admin, validated by these fields) or,
for a provider whose spec has an `OAuthSpec`, of the "oauth" kind: connected through
the provider's consent and refreshed by the broker (broker/integrations/oauth.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.core.errors import NotFound, UpstreamUnavailable, ValidationFailed
from broker.integrations.egress import (
    EgressClient,
    EgressFailed,
    EgressRefused,
    EgressResponse,
    HostNotResolved,
)

__all__ = [
    "PROVIDERS",
    "ConnectionResult",
    "Credentials",
    "FieldSpec",
    "OAuthSpec",
    "ProviderEndpoints",
    "ProviderSpec",
    "get_provider",
    "mask_hint",
]

MAX_VALUE_LENGTH = 500
"""No field value may be longer than this (the seed's ``max_length=500``)."""

# Longest first, so that "shpat_" wins over any shorter prefix.
_KNOWN_PREFIXES = ("shpat_", "shpca_", "shppa_", "org-", "ck_", "cs_", "sk-", "AC")
# Below this length the last four characters say too much about the secret.
_MIN_LENGTH_FOR_TAIL = 16

ConnectionCode = Literal[
    "ok", "rejected", "unreachable", "timeout", "provider_error", "refused_address"
]


def mask_hint(value: str, *, keep_prefix: bool = True) -> str:
    """A masked hint for a secret: known prefix, ``****``, then the last 4 characters."""
    prefix = ""
    if keep_prefix:
        prefix = next((p for p in _KNOWN_PREFIXES if value.startswith(p)), "")
    if len(value) < _MIN_LENGTH_FOR_TAIL:
        return f"{prefix}****"
    return f"{prefix}****{value[-4:]}"


# ------------------------------------------------------------------------ fields


def _check_store_url(value: str) -> str:
    """Normalise a WooCommerce store URL; ValueError with a value-free message if bad.

    Only the shape is checked here; whether http is allowed and which addresses may be
    called is the egress policy's decision (:meth:`ProviderSpec.check_target`).
    """
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in value):
        raise ValueError("must not contain spaces, control characters or backslashes")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise ValueError("must be a valid absolute http:// or https:// URL") from None
    if parts.scheme not in ("http", "https") or not value.lower().startswith(f"{parts.scheme}://"):
        raise ValueError("must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain a user name or password")
    if "?" in value or "#" in value:
        raise ValueError("must not contain a query string or fragment")
    if not parts.hostname:
        raise ValueError("must include a host name")
    if port == 0:
        raise ValueError("must not use port 0")
    # The scheme is lowercased; the path keeps its case (WordPress may live in /Shop).
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class FieldSpec:
    """One credential field: whether it is secret, required, and what it looks like."""

    name: str
    secret: bool
    required: bool
    description: str
    pattern: re.Pattern[str] | None = field(default=None, repr=False)
    expected: str = ""
    """What a valid value looks like, for error messages (never the value itself)."""
    lowercase: bool = False
    keep_prefix: bool = True
    """Whether the masked hint keeps a known prefix such as ``ck_``."""
    normalise: Callable[[str], str] | None = field(default=None, repr=False, compare=False)
    """Extra check/normalisation; raises ValueError with a value-free message."""

    def clean(self, raw: object) -> str:
        """The normalised value; ValueError whose message names the field, not the value."""
        if not isinstance(raw, str):
            raise ValueError(f"{self.name} must be a string")
        value = raw.strip()
        if len(value) > MAX_VALUE_LENGTH:
            raise ValueError(f"{self.name} must be at most {MAX_VALUE_LENGTH} characters")
        if self.lowercase:
            value = value.lower()
        if self.normalise is not None:
            try:
                value = self.normalise(value)
            except ValueError as exc:
                raise ValueError(f"{self.name} {exc}") from None
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ValueError(f"{self.name} {self.expected}")
        return value

    def hint(self, value: str) -> str:
        """How the value may be shown: masked for secrets, as-is for identifiers."""
        return mask_hint(value, keep_prefix=self.keep_prefix) if self.secret else value


def _ascii(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


def _webhook_secret(description: str) -> FieldSpec:
    return FieldSpec(
        name="webhook_secret",
        secret=True,
        required=False,
        description=description,
        pattern=_ascii(r"[\x21-\x7e]{16,256}"),
        expected="must be 16 to 256 printable characters without spaces",
        keep_prefix=False,
    )


# ------------------------------------------------------------------- credentials


class Credentials:
    """All field values of one provider.  ``repr``/``str`` show field names only."""

    __slots__ = ("_values", "provider")

    def __init__(self, provider: str, values: Mapping[str, str]) -> None:
        spec = get_provider(provider)
        known = {f.name for f in spec.fields}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown field {name!r} for provider {provider!r}")
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} must be a string")
        self.provider = provider
        self._values: dict[str, str] = dict(values)

    def reveal(self, name: str) -> str | None:
        """The plain value of one field, or None when it is not set."""
        return self._values.get(name)

    def names(self) -> frozenset[str]:
        """The names of the fields that are set."""
        return frozenset(self._values)

    def _split(self, *, secret: bool) -> dict[str, str]:
        spec = get_provider(self.provider)
        return {
            f.name: self._values[f.name]
            for f in spec.fields
            if f.secret is secret and f.name in self._values
        }

    def secret_values(self) -> dict[str, str]:
        """Only the secret fields, in plain text (to be encrypted)."""
        return self._split(secret=True)

    def identifiers(self) -> dict[str, str]:
        """Only the non-secret identifier fields (store URL, shop domain)."""
        return self._split(secret=False)

    def fingerprint(self, *, key: bytes | None = None) -> str:
        """SHA-256 hex over a canonical JSON of provider and values (HMAC when keyed).

        Lets callers tell whether a save changes anything without comparing secrets.
        Pass a ``key`` before storing a fingerprint next to low-entropy values.
        """
        canonical = json.dumps(
            {"provider": self.provider, "values": self._values},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode()
        if key is not None:
            return hmac.new(key, canonical, hashlib.sha256).hexdigest()
        return hashlib.sha256(canonical).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return self.provider == other.provider and hmac.compare_digest(
            self.fingerprint(), other.fingerprint()
        )

    def __hash__(self) -> int:
        return hash((self.provider, self.fingerprint()))

    def __repr__(self) -> str:
        return f"Credentials(provider={self.provider!r}, fields={sorted(self._values)!r})"

    __str__ = __repr__


# -------------------------------------------------------------- connection tests


@dataclass(frozen=True)
class ConnectionResult:
    """The outcome of testing credentials against the provider; ``reason`` is safe to show."""

    ok: bool
    code: ConnectionCode
    reason: str
    status_code: int | None = None


@dataclass(frozen=True)
class ProviderEndpoints:
    """Base URLs of the provider APIs; configurable so tests can point at local servers."""

    twilio: str = "https://api.twilio.com"
    openai: str = "https://api.openai.com"
    graph: str = "https://graph.facebook.com"
    graph_version: str = "v21.0"
    shopify_api_version: str = "2024-10"
    shopify_base: str | None = None
    """When set, replaces ``https://{shop_domain}`` (tests); the domain is still validated."""


@dataclass(frozen=True)
class _Probe:
    """One GET request that proves the credentials work."""

    url: str
    headers: Mapping[str, str] | None = None
    auth: tuple[str, str] | None = field(default=None, repr=False)


def _value(creds: Credentials, name: str) -> str:
    value = creds.reveal(name)
    if value is None:  # validate() ran first, so only optional fields can be missing
        raise ValueError(f"{name} is not set")
    return value


def _base(url: str) -> str:
    return url.rstrip("/")


def _twilio_probe(endpoints: ProviderEndpoints, creds: Credentials) -> _Probe:
    sid = _value(creds, "account_sid")
    return _Probe(
        url=f"{_base(endpoints.twilio)}/2010-04-01/Accounts/{sid}.json",
        auth=(sid, _value(creds, "auth_token")),
    )


def _woocommerce_target(endpoints: ProviderEndpoints, creds: Credentials) -> str:
    return _value(creds, "store_url")


def _woocommerce_probe(endpoints: ProviderEndpoints, creds: Credentials) -> _Probe:
    return _Probe(
        url=f"{_woocommerce_target(endpoints, creds)}/wp-json/wc/v3/products?per_page=1",
        auth=(_value(creds, "consumer_key"), _value(creds, "consumer_secret")),
    )


def _shopify_target(endpoints: ProviderEndpoints, creds: Credentials) -> str:
    return endpoints.shopify_base or f"https://{_value(creds, 'shop_domain')}"


def _shopify_probe(endpoints: ProviderEndpoints, creds: Credentials) -> _Probe:
    base = _shopify_target(endpoints, creds)
    return _Probe(
        url=f"{_base(base)}/admin/api/{endpoints.shopify_api_version}/shop.json",
        headers={"X-Shopify-Access-Token": _value(creds, "access_token")},
    )


def _whatsapp_probe(endpoints: ProviderEndpoints, creds: Credentials) -> _Probe:
    business_id = _value(creds, "business_id")
    return _Probe(
        url=f"{_base(endpoints.graph)}/{endpoints.graph_version}/{business_id}",
        headers={"Authorization": f"Bearer {_value(creds, 'access_token')}"},
    )


def _openai_probe(endpoints: ProviderEndpoints, creds: Credentials) -> _Probe:
    headers = {"Authorization": f"Bearer {_value(creds, 'api_key')}"}
    project_id = creds.reveal("project_id")
    if _value(creds, "api_key").startswith("sk-admin-") and project_id is not None:
        # An Admin key works on admin endpoints only (the root of dynamic OpenAI keys):
        # reading the project it will create service accounts in proves it.
        return _Probe(
            url=f"{_base(endpoints.openai)}/v1/organization/projects/{project_id}",
            headers=headers,
        )
    org_id = creds.reveal("org_id")
    if org_id is not None:
        headers["OpenAI-Organization"] = org_id
    return _Probe(url=f"{_base(endpoints.openai)}/v1/models", headers=headers)


def _auth_rejected(response: EgressResponse) -> bool:
    return response.status_code in (401, 403)


def _account_rejected(response: EgressResponse) -> bool:
    """401/403, or 404: the account id in the path does not exist for these credentials."""
    return response.status_code in (401, 403, 404)


# Graph API error codes meaning "bad token" (190) or "no such object / no access" (100).
_GRAPH_REJECTION_CODES = frozenset({100, 190})


def _graph_rejected(response: EgressResponse) -> bool:
    """Graph also answers a bad token or an unknown object id with a 400 and an error code."""
    if _account_rejected(response):
        return True
    if response.status_code != 400:
        return False
    try:
        error = response.json().get("error")
        return isinstance(error, dict) and error.get("code") in _GRAPH_REJECTION_CODES
    except (EgressFailed, AttributeError):
        return False


def _is_dict_with(key: str, kind: type) -> Callable[[Any], bool]:
    return lambda body: isinstance(body, dict) and isinstance(body.get(key), kind)


def _is_list(body: Any) -> bool:
    return isinstance(body, list)


# ---------------------------------------------------------------------- providers


@dataclass(frozen=True)
class TokenMapping:
    """Which keys of a token endpoint's JSON answer hold what the broker stores."""

    access_token: str = "access_token"  # noqa: S105 - a JSON key's name
    refresh_token: str = "refresh_token"  # noqa: S105 - a JSON key's name
    expires_in: str = "expires_in"
    refresh_expires_in: str = "refresh_token_expires_in"
    scope: str = "scope"


@dataclass(frozen=True)
class OAuthSpec:
    """The "oauth" credential kind: how a tenant connects through the provider's consent.

    URLs are templates over ``{base}``, the account's own API base (``https://{shop}``
    for Shopify). The token set is stored beside the identifier field ``account_field``;
    the connection is tested with the provider's usual probe, given the access token.
    """

    base_url: Callable[[ProviderEndpoints, str], str] = field(repr=False, compare=False)
    """The account's API base URL from the account name (tests point it at a local server)."""
    authorize_path: str
    token_path: str
    scopes: tuple[str, ...]
    account_field: str
    """The identifier field naming the account (the shop domain)."""
    account_pattern: re.Pattern[str] = field(repr=False)
    scope_separator: str = ","
    token_params: Mapping[str, str] = field(default_factory=dict)
    """Extra parameters of the code exchange and token exchange (Shopify: ``expiring=1``)."""
    token_exchange: Mapping[str, str] = field(default_factory=dict)
    """How a pasted long-lived token is exchanged for an expiring set (RFC 8693 parameters,
    the pasted token going in ``subject_token``); empty when the provider has no such
    migration."""
    mapping: TokenMapping = field(default_factory=TokenMapping)
    client_path: str = ""
    """KV path (under the platform's secrets) of the app's client_id and client_secret."""
    callback_signature: Literal["shopify_hmac"] = "shopify_hmac"
    flow: Literal["redirect", "embedded_signup"] = "redirect"
    """"redirect": the broker hands out the consent URL and receives the callback.
    "embedded_signup" (Meta): the platform's page runs the consent and posts the code."""
    refreshable: bool = True
    """False when the provider documents no refresh for the token (Meta business tokens):
    past its expiry, the integration needs a reconnect."""

    def authorize_url(self, endpoints: ProviderEndpoints, account: str) -> str:
        """Where the admin's browser goes to consent."""
        return self.base_url(endpoints, account).rstrip("/") + self.authorize_path

    def token_url(self, endpoints: ProviderEndpoints, account: str) -> str:
        """The token endpoint for code exchange, refresh and token exchange."""
        return self.base_url(endpoints, account).rstrip("/") + self.token_path


@dataclass(frozen=True)
class ProviderSpec:
    """Everything the broker knows about one provider's credentials."""

    name: str
    title: str
    fields: tuple[FieldSpec, ...]
    probe: Callable[[ProviderEndpoints, Credentials], _Probe] = field(repr=False, compare=False)
    rejects: Callable[[EgressResponse], bool] = field(repr=False, compare=False)
    """Whether a response means "these credentials are wrong"."""
    expects: Callable[[Any], bool] = field(repr=False, compare=False)
    """Whether a 2xx JSON body looks like this provider's answer."""
    not_found_hint: str = ""
    target: tuple[str, Callable[[ProviderEndpoints, Credentials], str]] | None = field(
        default=None, repr=False, compare=False
    )
    """The field that names where the broker and the SDK will call, and that base URL."""
    oauth: OAuthSpec | None = field(default=None, repr=False, compare=False)
    """Set when the provider can also be connected through OAuth (the "oauth" kind)."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The credential kinds this provider accepts: "static", and "oauth" if it has one."""
        return ("static", "oauth") if self.oauth is not None else ("static",)

    def field_spec(self, name: str) -> FieldSpec | None:
        """The spec of one field, or None for an unknown name."""
        return next((f for f in self.fields if f.name == name), None)

    def validate(self, raw: Mapping[str, object]) -> Credentials:
        """Check and normalise every field; ValidationFailed lists every problem.

        A field given as None or as an empty/blank string counts as not given.
        """
        if not isinstance(raw, Mapping):
            raise ValidationFailed(
                f"invalid {self.title} credentials",
                errors=[{"field": "fields", "message": "fields must be an object"}],
            )
        errors: list[dict[str, str]] = []
        for name in raw:
            if not isinstance(name, str) or self.field_spec(name) is None:
                # An unknown name may be a secret pasted as a key: give the allowed names,
                # never the name itself.
                allowed = ", ".join(spec.name for spec in self.fields)
                errors.append(
                    {
                        "field": "fields",
                        "message": f"unknown field for {self.title}; the allowed fields are "
                        + allowed,
                    }
                )
        values: dict[str, str] = {}
        for spec in self.fields:
            raw_value = raw.get(spec.name)
            if raw_value is None or (isinstance(raw_value, str) and not raw_value.strip()):
                if spec.required:
                    errors.append(
                        {"field": f"fields.{spec.name}", "message": f"{spec.name} is required"}
                    )
                continue
            try:
                values[spec.name] = spec.clean(raw_value)
            except ValueError as exc:
                errors.append({"field": f"fields.{spec.name}", "message": str(exc)})
        if errors:
            raise ValidationFailed(f"invalid {self.title} credentials", errors=errors)
        return Credentials(self.name, values)

    def merge(self, stored: Credentials, patch: Mapping[str, object]) -> Credentials:
        """Stored values overlaid with ``patch`` and re-validated; None or "" removes a field."""
        if stored.provider != self.name:
            raise ValueError(f"credentials of {stored.provider!r} given to {self.name!r}")
        merged: dict[str, object] = {name: stored.reveal(name) for name in stored.names()}
        merged.update(patch)
        return self.validate(merged)

    def hints(self, creds: Credentials) -> dict[str, str]:
        """Masked hints for secret fields and identifiers as-is, in field order."""
        return {
            f.name: f.hint(value)
            for f in self.fields
            if (value := creds.reveal(f.name)) is not None
        }

    def is_configured(self, present: Iterable[str]) -> bool:
        """True when every required field is among ``present``."""
        have = set(present)
        return all(f.name in have for f in self.fields if f.required)

    def check_target(
        self, client: EgressClient, endpoints: ProviderEndpoints, creds: Credentials
    ) -> None:
        """ValidationFailed unless the URL the credentials name is a permitted egress target.

        The connection test's own check (the same policy, one resolution, every address
        public), run on every save: a skipped test must not let a store URL on
        169.254.169.254 or 10.0.0.1 into storage, where the SDK would later call it.
        """
        if self.target is None:
            return
        name, base_url = self.target
        try:
            client.check_url(base_url(endpoints, creds))
        except HostNotResolved:
            raise ValidationFailed(
                f"invalid {self.title} credentials",
                errors=[
                    {
                        "field": f"fields.{name}",
                        "message": f"the host in {name} could not be resolved (is it spelled "
                        "right, and does it exist?)",
                    }
                ],
            ) from None
        except EgressRefused as exc:
            # The egress messages never contain the URL, so they are safe to show.
            raise ValidationFailed(
                f"invalid {self.title} credentials",
                errors=[
                    {
                        "field": f"fields.{name}",
                        "message": f"{name} points to an address the broker may not call ({exc})",
                    }
                ],
            ) from None
        except EgressFailed:
            raise UpstreamUnavailable(
                f"could not check the {self.title} {name} now (name resolution timed out)"
            ) from None

    def connection_test(
        self, client: EgressClient, endpoints: ProviderEndpoints, creds: Credentials
    ) -> ConnectionResult:
        """Call the provider's API with ``creds``; provider failures become a result."""
        if creds.provider != self.name:
            raise ValueError(f"credentials of {creds.provider!r} given to {self.name!r}")
        # Re-validate: the values go into URLs and headers, and the caller may have
        # built the Credentials from storage rather than from validate().
        creds = self.validate({name: creds.reveal(name) for name in creds.names()})
        probe = self.probe(endpoints, creds)
        try:
            response = client.get(probe.url, headers=probe.headers, auth=probe.auth)
        except HostNotResolved:
            return ConnectionResult(
                False, "unreachable", f"the {self.title} host could not be resolved"
            )
        except EgressRefused as exc:
            # The egress messages never contain the path, query, userinfo or headers.
            return ConnectionResult(
                False,
                "refused_address",
                f"the URL points to an address the broker may not call ({exc})",
            )
        except EgressFailed as exc:
            if "timed out" in str(exc):
                return ConnectionResult(False, "timeout", f"{self.title} did not answer in time")
            return ConnectionResult(False, "unreachable", f"could not reach {self.title} ({exc})")
        return self._judge(response)

    def _judge(self, response: EgressResponse) -> ConnectionResult:
        status = response.status_code
        title = self.title
        if self.rejects(response):
            return ConnectionResult(False, "rejected", f"{title} rejected the credentials", status)
        if 200 <= status < 300:
            try:
                looks_right = self.expects(response.json())
            except EgressFailed:
                looks_right = False
            if looks_right:
                return ConnectionResult(True, "ok", f"{title} accepted the credentials", status)
            return ConnectionResult(
                False,
                "provider_error",
                f"{title} answered with HTTP {status} but not with the expected data",
                status,
            )
        if 300 <= status < 400:
            return ConnectionResult(
                False,
                "provider_error",
                f"{title} answered with a redirect; redirects are not followed",
                status,
            )
        if status == 429:
            return ConnectionResult(
                False,
                "provider_error",
                f"{title} is limiting requests (HTTP 429); try again later",
                status,
            )
        if status == 404 and self.not_found_hint:
            return ConnectionResult(
                False,
                "provider_error",
                f"{title} answered with HTTP 404; {self.not_found_hint}",
                status,
            )
        return ConnectionResult(
            False, "provider_error", f"{title} answered with HTTP {status}", status
        )


_TWILIO = ProviderSpec(
    name="twilio",
    title="Twilio",
    fields=(
        FieldSpec(
            name="account_sid",
            secret=True,
            required=True,
            description="Account SID (AC followed by 32 hex characters)",
            pattern=_ascii(r"AC[0-9a-f]{32}"),
            expected="must be 'AC' followed by 32 lowercase hexadecimal characters",
        ),
        FieldSpec(
            name="auth_token",
            secret=True,
            required=True,
            description="Auth token (32 hex characters)",
            pattern=_ascii(r"[0-9a-f]{32}"),
            expected="must be 32 lowercase hexadecimal characters",
            keep_prefix=False,
        ),
        _webhook_secret("Secret used to verify Twilio webhooks"),
    ),
    probe=_twilio_probe,
    rejects=_account_rejected,
    expects=_is_dict_with("sid", str),
)

_WOOCOMMERCE = ProviderSpec(
    name="woocommerce",
    title="WooCommerce",
    fields=(
        FieldSpec(
            name="store_url",
            secret=False,
            required=True,
            description="Base URL of the WordPress site running WooCommerce",
            normalise=_check_store_url,
        ),
        FieldSpec(
            name="consumer_key",
            secret=True,
            required=True,
            description="REST API consumer key (ck_...)",
            pattern=_ascii(r"ck_[0-9a-f]{40}"),
            expected="must be 'ck_' followed by 40 lowercase hexadecimal characters",
        ),
        FieldSpec(
            name="consumer_secret",
            secret=True,
            required=True,
            description="REST API consumer secret (cs_...)",
            pattern=_ascii(r"cs_[0-9a-f]{40}"),
            expected="must be 'cs_' followed by 40 lowercase hexadecimal characters",
        ),
        _webhook_secret("Secret used to verify WooCommerce webhooks"),
    ),
    probe=_woocommerce_probe,
    target=("store_url", _woocommerce_target),
    rejects=_auth_rejected,
    expects=_is_list,
    not_found_hint="check the store URL and that the WooCommerce REST API is enabled",
)

SHOP_DOMAIN = _ascii(r"[a-zA-Z0-9][a-zA-Z0-9-]*\.myshopify\.com")
"""What Shopify's docs accept as a shop in a callback (also the connect request's input)."""

_SHOPIFY_OAUTH = OAuthSpec(
    base_url=lambda endpoints, shop: endpoints.shopify_base or f"https://{shop}",
    authorize_path="/admin/oauth/authorize",
    token_path="/admin/oauth/access_token",  # noqa: S106 - an endpoint path
    scopes=("read_products", "read_orders"),
    account_field="shop_domain",
    account_pattern=SHOP_DOMAIN,
    # Expiring offline tokens: one hour, with a rotating 90-day refresh token.
    token_params={"expiring": "1"},
    token_exchange={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:shopify:params:oauth:token-type:offline-access-token",
        "requested_token_type": "urn:shopify:params:oauth:token-type:offline-access-token",
    },
    client_path="platform/shopify",
)

_SHOPIFY = ProviderSpec(
    name="shopify",
    title="Shopify",
    fields=(
        FieldSpec(
            name="shop_domain",
            secret=False,
            required=True,
            description="The shop's myshopify.com domain, without https://",
            # One DNS label before .myshopify.com.  A URL (https://...) is refused rather
            # than guessed at: the domain is what the tenant copies from the admin.
            pattern=_ascii(r"[a-z0-9][a-z0-9-]{0,62}\.myshopify\.com"),
            expected="must be a domain like example.myshopify.com, without https:// or a path",
            lowercase=True,
        ),
        FieldSpec(
            name="access_token",
            secret=True,
            required=True,
            description="Admin API access token (shpat_...)",
            pattern=_ascii(r"shp(?:at|ca|pa)_[0-9a-fA-F]{32}"),
            expected="must be 'shpat_', 'shpca_' or 'shppa_' followed by 32 hexadecimal characters",
        ),
        _webhook_secret("Secret used to verify Shopify webhooks"),
    ),
    probe=_shopify_probe,
    target=("shop_domain", _shopify_target),
    rejects=_auth_rejected,
    expects=_is_dict_with("shop", dict),
    not_found_hint="check the shop domain",
    oauth=_SHOPIFY_OAUTH,
)

WHATSAPP_ID = _ascii(r"[0-9]{5,20}")
"""A Graph object id: the WABA, its phone number, the Meta business."""

_WHATSAPP_OAUTH = OAuthSpec(
    base_url=lambda endpoints, _: f"{_base(endpoints.graph)}/{endpoints.graph_version}",
    authorize_path="",
    # Graph's code exchange: a GET with client_id, client_secret and code, no redirect_uri.
    token_path="/oauth/access_token",  # noqa: S106 - an endpoint path
    scopes=("whatsapp_business_management", "whatsapp_business_messaging"),
    account_field="business_id",
    account_pattern=WHATSAPP_ID,
    client_path="platform/meta",
    flow="embedded_signup",
    # Business tokens never expire, or last 60 days; no refresh is documented for them.
    refreshable=False,
)

_WHATSAPP = ProviderSpec(
    name="whatsapp",
    title="WhatsApp",
    fields=(
        FieldSpec(
            name="business_id",
            secret=True,
            required=True,
            description="WhatsApp Business Account id (digits)",
            pattern=_ascii(r"[0-9]{5,20}"),
            expected="must be 5 to 20 digits",
            keep_prefix=False,
        ),
        FieldSpec(
            name="access_token",
            secret=True,
            required=True,
            description="Graph API access token",
            pattern=_ascii(r"[A-Za-z0-9_|.-]{20,500}"),
            expected="must be 20 to 500 letters, digits, '_', '-', '|' or '.'",
            keep_prefix=False,
        ),
    ),
    probe=_whatsapp_probe,
    rejects=_graph_rejected,
    expects=_is_dict_with("id", str),
    oauth=_WHATSAPP_OAUTH,
)

_OPENAI = ProviderSpec(
    name="openai",
    title="OpenAI",
    fields=(
        FieldSpec(
            name="api_key",
            secret=True,
            required=True,
            description="API key (sk-...)",
            pattern=_ascii(r"sk-[A-Za-z0-9_-]{20,200}"),
            expected="must be 'sk-' followed by 20 to 200 letters, digits, '_' or '-'",
        ),
        FieldSpec(
            name="org_id",
            secret=True,
            required=False,
            description="Organization id (org-...)",
            pattern=_ascii(r"org-[A-Za-z0-9]{8,64}"),
            expected="must be 'org-' followed by 8 to 64 letters or digits",
        ),
        FieldSpec(
            name="project_id",
            secret=True,
            required=False,
            description=(
                "Project id (proj_...): with an Admin key (sk-admin-...), where dynamic "
                "service-account keys are created"
            ),
            pattern=_ascii(r"proj_[A-Za-z0-9]{8,64}"),
            expected="must be 'proj_' followed by 8 to 64 letters or digits",
        ),
    ),
    probe=_openai_probe,
    rejects=_auth_rejected,
    expects=lambda body: _is_dict_with("data", list)(body) or _is_dict_with("id", str)(body),
)

PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec for spec in (_TWILIO, _WOOCOMMERCE, _SHOPIFY, _WHATSAPP, _OPENAI)
}


def get_provider(name: str) -> ProviderSpec:
    """The spec of a provider; NotFound for any other name."""
    spec = PROVIDERS.get(name) if isinstance(name, str) else None
    if spec is None:
        # The name is not repeated (it may be anything); the known ones are.
        raise NotFound(f"unknown provider; the providers are {', '.join(PROVIDERS)}")
    return spec
