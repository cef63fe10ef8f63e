"""What bench modules use to set data up directly through the broker's services (no HTTP).

The principal they act as, an engine and a Vault gateway for a stack's settings, an
outbound client that may reach the fake providers on loopback, and stored OpenAI keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, make_engine
from broker.integrations import service as integrations
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import ProviderEndpoints
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders

# The platform admin every bench module acts as when it sets up data directly.
PRINCIPAL = Principal(subject="bench", kind="user", scopes=frozenset({Scope.PLATFORM_ADMIN}))


@contextmanager
def connected(
    settings: Settings, bounds: DatabaseBounds | None = None
) -> Iterator[tuple[Engine, VaultGateway]]:
    """An engine and a Vault gateway for `settings`, both closed on the way out."""
    assert settings.database_url is not None
    engine = make_engine(settings.database_url.get_secret_value(), bounds)
    vault = VaultGateway.from_settings(settings)
    try:
        yield engine, vault
    finally:
        vault.close()
        engine.dispose()


def loopback_egress() -> EgressClient:
    """An egress client that may reach plain HTTP on loopback, where the fakes listen."""
    return EgressClient(EgressPolicy(allow_http=True, allow_loopback=True))


@contextmanager
def fake_openai() -> Iterator[integrations.Outbound]:
    """Provider calls that reach a local fake OpenAI (closed on the way out)."""
    with FakeProviders() as fake:
        outbound = integrations.Outbound(loopback_egress(), ProviderEndpoints(openai=fake.base_url))
        try:
            yield outbound
        finally:
            outbound.client.close()


def store_openai(
    engine: Engine, vault: VaultGateway, outbound: integrations.Outbound, tenant: str
) -> None:
    """Store working OpenAI credentials for `tenant` through the broker's own write path."""
    integrations.save_credentials(
        engine,
        vault,
        outbound,
        principal=PRINCIPAL,
        tenant_id=tenant,
        provider="openai",
        fields=dict(VALID["openai"]),
        if_match=None,
        skip_connection_test=True,
    )
