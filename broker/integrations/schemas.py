"""Request and response bodies for integration credentials. Responses carry hints only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from broker.core.config import Settings
from broker.credential_health.age import age_of
from broker.integrations.oauth import SignupResult
from broker.integrations.providers import (
    MAX_VALUE_LENGTH,
    PROVIDERS,
    ConnectionResult,
    ProviderSpec,
)
from broker.models import IntegrationCredential, utcnow

FieldValue = Annotated[SecretStr, Field(max_length=500)]

# An enum in the document; still a plain string to the route, so an unknown provider is
# answered by the service's 404, which lists the known ones.
PROVIDER_DESCRIPTION = f"One of: {', '.join(PROVIDERS)}."
ProviderName = Annotated[
    str,
    Path(description=PROVIDER_DESCRIPTION, json_schema_extra={"enum": list(PROVIDERS)}),
]


class CredentialsWrite(BaseModel):
    """New credentials for one provider. Values are secrets until proven otherwise."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, FieldValue] = Field(
        description="The provider's fields, e.g. consumer_key and consumer_secret.",
        max_length=16,
    )
    skip_connection_test: bool = Field(
        default=False,
        description="Store without the live test. Recorded in the metadata and audit trail.",
    )

    def plain_fields(self) -> dict[str, object]:
        """The field values, revealed for validation and sealing."""
        return {name: value.get_secret_value() for name, value in self.fields.items()}


class CredentialsTest(BaseModel):
    """Candidate credentials to test; omit `fields` to test the stored ones."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, FieldValue] | None = Field(default=None, max_length=16)

    def plain_fields(self) -> dict[str, object] | None:
        """The field values, revealed for validation."""
        if self.fields is None:
            return None
        return {name: value.get_secret_value() for name, value in self.fields.items()}


class TestResult(BaseModel):
    """A connection test's outcome, safe to show: no secret, no provider body."""

    __test__ = False  # not a pytest test class

    ok: bool
    code: Literal["ok", "rejected", "unreachable", "timeout", "provider_error", "refused_address"]
    reason: str
    at: datetime | None = None

    @classmethod
    def of(cls, result: ConnectionResult) -> TestResult:
        """From the provider spec's result."""
        return cls(ok=result.ok, code=result.code, reason=result.reason)


_HEALTH_STATES = ("unknown", "healthy", "failing", "needs_reconnect")


class IntegrationView(BaseModel):
    """One provider as the tenant admin sees it: masked hints, never a secret."""

    provider: str
    title: str
    configured: bool
    hints: dict[str, str] = Field(
        description="Masked hints of the secret fields, e.g. ck_****abcd."
    )
    identifiers: dict[str, str] = Field(description="Non-secret identifiers, e.g. the store URL.")
    version: int
    updated_at: datetime | None
    updated_by: str | None
    connection_test_skipped: bool
    last_test: TestResult | None
    sync_pending: bool = Field(description="A write is being reconciled with Vault.")
    kind: Literal["static", "oauth"] = Field(
        default="static", description="Pasted credentials, or an OAuth connection."
    )
    needs_reconnect: bool = Field(
        default=False, description="The provider refused the OAuth grant; connect again."
    )
    token_expires_at: datetime | None = Field(
        default=None, description="When the current OAuth access token expires."
    )
    delivery: Literal["static", "dynamic"] = Field(
        default="static",
        description=(
            "How services receive them: the stored fields, or a key minted per lease "
            "(Twilio, OpenAI) while the stored root credential never leaves the broker."
        ),
    )
    health: Literal["unknown", "healthy", "failing", "needs_reconnect"] = Field(
        default="unknown", description="The latest scheduled (or requested) health check."
    )
    health_reason: str | None = None
    health_checked_at: datetime | None = None
    created_at: datetime | None = Field(
        default=None, description="When these credentials were first stored."
    )
    rotated_at: datetime | None = Field(
        default=None, description="When the secret last changed (a new version)."
    )
    age: Literal["ok", "due", "overdue", "expiring", "expired"] | None = Field(
        default=None,
        description=(
            "Rotation or expiry state now: due and overdue follow the provider's rotation "
            "period (a cryptoperiod, NIST SP 800-57); expiring and expired a token nothing "
            "renews. None when nothing is stored."
        ),
    )
    rotation_due_at: datetime | None = Field(
        default=None, description="When pasted credentials are due for rotation."
    )

    @classmethod
    def of(
        cls,
        spec: ProviderSpec,
        row: IntegrationCredential | None,
        *,
        settings: Settings | None = None,
    ) -> IntegrationView:
        """Build from the provider spec and its metadata row (None when never configured).

        With the settings (the rotation periods), the credential's age is filled in too.
        """
        if row is None:
            return cls(
                provider=spec.name,
                title=spec.title,
                configured=False,
                hints={},
                identifiers={},
                version=0,
                updated_at=None,
                updated_by=None,
                connection_test_skipped=False,
                last_test=None,
                sync_pending=False,
            )
        last_test = None
        if row.last_test_code is not None and row.last_test_ok is not None:
            last_test = TestResult(
                ok=row.last_test_ok,
                code=row.last_test_code,
                reason=row.last_test_reason or "",
                at=row.last_test_at,
            )
        configured = row.configured and spec.is_configured([*row.hints, *row.identifiers])
        aged = age_of(row, settings, utcnow()) if configured and settings is not None else None
        return cls(
            provider=spec.name,
            title=spec.title,
            configured=configured,
            hints={k: str(v) for k, v in row.hints.items()},
            identifiers={k: str(v) for k, v in row.identifiers.items()},
            version=row.kv_version,
            updated_at=row.updated_at,
            updated_by=row.updated_by,
            connection_test_skipped=row.connection_test_skipped,
            last_test=last_test,
            sync_pending=row.vault_sync_pending,
            kind="oauth" if row.credential_kind == "oauth" else "static",
            needs_reconnect=row.needs_reconnect,
            token_expires_at=row.token_expires_at,
            delivery="dynamic" if row.delivery_mode == "dynamic" else "static",
            health=row.health_state if row.health_state in _HEALTH_STATES else "unknown",
            health_reason=row.health_reason,
            health_checked_at=row.health_checked_at,
            created_at=row.first_stored_at,
            rotated_at=row.rotated_at,
            age=aged.state if aged else None,
            rotation_due_at=aged.rotation_due_at if aged else None,
        )


class ConnectRequest(BaseModel):
    """Start an OAuth connect for one account of the provider."""

    model_config = ConfigDict(extra="forbid")

    shop: str = Field(
        max_length=255,
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9-]*\.myshopify\.com$",
        description="The shop's myshopify.com domain.",
    )
    return_url: str | None = Field(
        default=None,
        max_length=2000,
        description="Where the browser ends up; one of the platform's configured return URLs.",
    )


GraphId = Annotated[str, Field(pattern=r"^[0-9]{5,20}$", description="A Graph object id.")]


class EmbeddedSignupRequest(BaseModel):
    """What the platform's page got from Meta's Embedded Signup, posted as it came."""

    model_config = ConfigDict(extra="forbid")

    code: SecretStr = Field(
        min_length=1,
        max_length=2000,
        description="`authResponse.code` of FB.login; valid 30 seconds, once.",
    )
    waba_id: GraphId
    phone_number_id: GraphId
    business_id: GraphId = Field(description="The customer's Meta business portfolio id.")

    def signup(self) -> SignupResult:
        """The service's view, the code revealed for the exchange."""
        return SignupResult(
            code=self.code.get_secret_value(),
            waba_id=self.waba_id,
            phone_number_id=self.phone_number_id,
            business_id=self.business_id,
        )


class ConnectView(BaseModel):
    """Where to send the admin's browser; the URL works once, until `expires_at`."""

    authorization_url: str
    expires_at: datetime


class MigrationView(BaseModel):
    """What migrating the pasted token to an expiring OAuth set did."""

    outcome: Literal["migrated", "already_expiring", "not_configured", "would_migrate"]
    version: int | None = Field(description="The KV version now current, when configured.")


class VersionView(BaseModel):
    """One kept KV version of a provider's credentials (no data)."""

    version: int
    created_time: datetime | None
    deletion_time: datetime | None
    destroyed: bool


def provider_fields_schema(spec: ProviderSpec) -> dict[str, Any]:
    """The JSON schema of one provider's `fields`: names, which are required, what they hold."""
    properties: dict[str, Any] = {}
    for field in spec.fields:
        text = field.description
        if field.expected:
            text = f"{text.rstrip('.')}. It {field.expected}."
        properties[field.name] = {
            "type": "string",
            "maxLength": MAX_VALUE_LENGTH,
            "description": text,
            # A secret goes in and never comes back: responses carry a masked hint.
            **({"writeOnly": True, "format": "password"} if field.secret else {}),
        }
    return {
        "title": f"{spec.title} fields",
        "description": f"The `fields` for the provider `{spec.name}` ({spec.title}).",
        "type": "object",
        "properties": properties,
        "required": [field.name for field in spec.fields if field.required],
        "additionalProperties": False,
    }


def provider_schema_name(spec: ProviderSpec) -> str:
    """The components/schemas name of a provider's fields, e.g. `WooCommerceFields`."""
    return "".join(part.capitalize() for part in spec.name.split("_")) + "Fields"


def document_provider_fields(document: dict[str, Any]) -> None:
    """Publish each provider's fields, and show `fields` as one of them, in OpenAPI.

    The provider is named by the path, not the body, so the body cannot carry a
    discriminator: `fields` is documented as any one of the per-provider schemas,
    each titled and described with its provider.
    """
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    refs = []
    for spec in PROVIDERS.values():
        name = provider_schema_name(spec)
        schemas[name] = provider_fields_schema(spec)
        refs.append({"$ref": f"#/components/schemas/{name}"})
    for body in ("CredentialsWrite", "CredentialsTest"):
        fields = schemas.get(body, {}).get("properties", {}).get("fields")
        if fields is None:
            continue
        description = (
            "The provider's fields: the schema named after the provider in the path "
            "(e.g. `TwilioFields` for `/integrations/twilio`)."
        )
        documented: dict[str, Any] = {"description": description, "anyOf": refs}
        if body == "CredentialsTest":  # optional: omit to test the stored credentials
            documented["anyOf"] = [*refs, {"type": "null"}]
        schemas[body]["properties"]["fields"] = documented
    for view in ("IntegrationView",):
        provider = schemas.get(view, {}).get("properties", {}).get("provider")
        if provider is not None:
            provider["enum"] = list(PROVIDERS)
