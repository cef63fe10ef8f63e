"""The SDK's typed credentials and the server's provider specs describe the same fields."""

from __future__ import annotations

import dataclasses

import pytest

from broker.client.sdk import ProviderCredentials
from broker.integrations.providers import PROVIDERS

# Fields only a dynamic lease delivers: keys the broker mints per service (Twilio's API
# key pair, broker/integrations/dynamic.py), never stored from a tenant's form.
MINTED_ONLY = {"twilio": {"api_key_sid", "api_key_secret"}}
LEASE_FIELDS = {"version", "expires_at"}


def _sdk_classes() -> dict[str, type[ProviderCredentials]]:
    found: dict[str, type[ProviderCredentials]] = {}
    pending = list(ProviderCredentials.__subclasses__())
    while pending:
        cls = pending.pop()
        found[cls.provider] = cls
        pending.extend(cls.__subclasses__())
    return found


def _sdk_fields(cls: type[ProviderCredentials]) -> dict[str, dataclasses.Field[object]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in LEASE_FIELDS}


def test_the_sdk_has_one_typed_class_per_server_provider() -> None:
    assert sorted(_sdk_classes()) == sorted(PROVIDERS)


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_the_sdk_fields_are_the_server_fields(provider: str) -> None:
    sdk = _sdk_fields(_sdk_classes()[provider])
    server = {spec.name: spec for spec in PROVIDERS[provider].fields}
    assert set(sdk) == set(server) | MINTED_ONLY.get(provider, set())
    for name, spec in server.items():
        field = sdk[name]
        # A secret on the server is masked in the SDK's repr, and only a secret is.
        assert bool(field.metadata.get("secret")) is spec.secret, name
        # What the SDK demands of a lease, the server demands of every save.
        sdk_requires = field.default is dataclasses.MISSING
        assert spec.required or not sdk_requires, name
