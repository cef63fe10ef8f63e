"""Settings and apps on the real services: the session's, or a Vault of a test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.vault.bootstrap import bootstrap, create_policy_token
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.support.slowproxy import SlowProxy
from tests.support.tokens import AUDIENCE, ISSUER, TEST_SIGNING_KEY


@dataclass(frozen=True)
class VaultEndpoint:
    """A real Vault/OpenBao the tests may use, with a privileged token."""

    addr: str
    root_token: str
    audit_log: Path | None


def bootstrap_vault(endpoint: VaultEndpoint) -> None:
    admin = VaultGateway(addrs=[endpoint.addr], token=endpoint.root_token)
    try:
        bootstrap(admin)
    finally:
        admin.close()


def make_settings(
    vault_endpoint: VaultEndpoint, token: str, database_url: str, **overrides: Any
) -> Settings:
    """Test settings: real Vault and database, the test signing key."""
    values: dict[str, Any] = {
        "env": "test",
        "database_url": database_url,
        "vault_addrs": [vault_endpoint.addr],
        "vault_token": token,
        "jwt_hs256_secret": TEST_SIGNING_KEY,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "retry_after_s": 2,
        # The suite sends far more from one address than any real caller;
        # the rate-limit tests build their own apps with tight limits.
        "rate_limit_fetch": "100000/minute",
        "rate_limit_write": "100000/minute",
        "rate_limit_auth_failures": "100000/hour",
        "rate_limit_denials": "100000/minute",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def provider_overrides(fake: FakeProviders) -> dict[str, Any]:
    """Settings that point connection tests at the fake providers on loopback."""
    return {
        "egress_allow_http": True,
        "egress_allow_loopback": True,
        "egress_timeout_s": 2.0,
        "twilio_base_url": fake.base_url,
        "openai_base_url": fake.base_url,
        "graph_base_url": fake.base_url,
        "shopify_base_url": fake.base_url,
    }


OAUTH_SETTINGS: dict[str, Any] = {
    "oauth_redirect_base_url": "https://broker.platform.test",
    "oauth_return_urls": ["https://app.platform.test/settings/integrations"],
}


def app_on(
    bao: Any, database_url: str, engine: Engine, providers: FakeProviders | None = None
) -> TestClient:
    """A client for an app whose Vault is `bao`, with a broker-policy token, on the shared DB."""
    admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
    try:
        broker_token = create_policy_token(admin, "broker")
    finally:
        admin.close()
    overrides = provider_overrides(providers) if providers else {}
    settings = make_settings(
        VaultEndpoint(bao.addr, bao.root_token, None), broker_token, database_url, **overrides
    )
    return TestClient(
        create_app(settings, engine=engine, vault=VaultGateway.from_settings(settings))
    )


def app_through(
    vault_addr: str,
    broker_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders | None = None,
    **overrides: Any,
) -> TestClient:
    """A client for an app whose Vault calls go to `vault_addr` (a fault proxy, say)."""
    extra = provider_overrides(providers) if providers else {}
    settings = make_settings(
        VaultEndpoint(vault_addr, "", None), broker_token, database_url, **extra, **overrides
    )
    return TestClient(
        create_app(settings, engine=engine, vault=VaultGateway.from_settings(settings))
    )


@contextmanager
def app_behind_slow_vault(
    vault_endpoint: VaultEndpoint,
    broker_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders | None = None,
) -> Iterator[tuple[TestClient, SlowProxy]]:
    """The broker through a proxy that can hold Vault writes back, with a 1 s Vault timeout
    and a 1.5 s budget: a write held longer is answered 503 and lands afterwards."""
    with SlowProxy(vault_endpoint.addr) as proxy:
        yield (
            app_through(
                proxy.addr,
                broker_token,
                database_url,
                engine,
                providers,
                vault_timeout_s=1.0,
                vault_retry_budget_s=1.5,
            ),
            proxy,
        )


@contextmanager
def clocked_client(
    settings: Settings, engine: Engine, now: Callable[[], float], *, one_loop: bool = False
) -> Iterator[TestClient]:
    """A client for the broker on `settings` whose time is `now()` (a fake clock's, shared
    with the fakes); its own Vault client is closed on the way out.

    With `one_loop` the client is entered: the app's lifespan runs, and one event loop
    serves every request (otherwise each request gets a loop of its own), so requests
    made at once from several threads share what belongs to the loop (the fetch threads).
    """
    vault = VaultGateway.from_settings(settings)
    app = create_app(
        settings, engine=engine, vault=vault, clock=lambda: datetime.fromtimestamp(now(), UTC)
    )
    client = TestClient(app, raise_server_exceptions=False)
    try:
        if one_loop:
            with client:
                yield client
        else:
            yield client
    finally:
        vault.close()
