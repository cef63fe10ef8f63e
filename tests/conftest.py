"""Session-wide real services: OpenBao and PostgreSQL, never mocks of either.

Which ones, in order of preference:
- Vault: `VAULT_ADDR` + `VAULT_TOKEN` (a privileged token) when set; otherwise
  the bundled OpenBao binary in dev mode with a file audit device.
- PostgreSQL: `TEST_DATABASE_URL` when set; otherwise the embedded pgserver.
- With `BROKER_TEST_CONTAINERS=1` and a Docker engine, testcontainers instead.

Each test isolates itself with fresh tenant ids; the schema is migrated once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import make_engine, upgrade
from broker.vault.bootstrap import create_policy_token
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.fakes.stripe import FakeStripe
from tests.support import containers
from tests.support.apps import (
    OAUTH_SETTINGS,
    VaultEndpoint,
    bootstrap_vault,
    make_settings,
    provider_overrides,
)
from tests.support.cli import session_services
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.workers import Workers


@pytest.fixture(scope="session")
def vault_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultEndpoint]:
    """A bootstrapped Vault for the whole session."""
    if os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"):
        endpoint = VaultEndpoint(os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], None)
        bootstrap_vault(endpoint)
        yield endpoint
        return
    if containers.requested():
        with containers.openbao() as (addr, token):
            endpoint = VaultEndpoint(addr, token, None)
            bootstrap_vault(endpoint)
            yield endpoint
        return
    from broker.devstack.openbao import OpenBaoServer

    with OpenBaoServer(tmp_path_factory.mktemp("openbao"), ephemeral=True) as bao:
        endpoint = VaultEndpoint(bao.addr, bao.root_token, bao.audit_log_path)
        bootstrap_vault(endpoint)
        yield endpoint


@pytest.fixture
def vault_proxy(vault_endpoint: VaultEndpoint) -> Iterator[SlowProxy]:
    """A loopback proxy in front of the session's Vault that can hold chosen requests back."""
    with SlowProxy(vault_endpoint.addr) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def vault_admin(vault_endpoint: VaultEndpoint) -> Iterator[VaultGateway]:
    """A gateway with the privileged token, for test set-up and inspection only."""
    gateway = VaultGateway(addrs=[vault_endpoint.addr], token=vault_endpoint.root_token)
    yield gateway
    gateway.close()


@pytest.fixture(scope="session")
def broker_vault_token(vault_admin: VaultGateway) -> str:
    """A token holding exactly the broker's policy, as the broker runs in production."""
    return create_policy_token(vault_admin, "broker")


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for the session."""
    if os.environ.get("TEST_DATABASE_URL"):
        from broker.devstack.postgres import create_database

        url = create_database(
            os.environ["TEST_DATABASE_URL"], f"broker_test_{uuid.uuid4().hex[:12]}"
        )
        upgrade(url)
        yield url
        return
    if containers.requested():
        with containers.postgres() as url:
            upgrade(url)
            yield url
        return
    from broker.devstack.postgres import EmbeddedPostgres, create_database

    # Not under pytest's tmp dir: pgserver (as root) opens up the parent
    # directories' permissions, and pytest resets its own tmp root to 0700.
    data_dir = Path(tempfile.mkdtemp(prefix="broker-test-pg-"))
    try:
        with EmbeddedPostgres(data_dir) as pg:
            url = create_database(pg.url, "broker_test")
            upgrade(url)
            yield url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """The session's engine."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def providers() -> Iterator[FakeProviders]:
    """Local stand-ins for Twilio, WooCommerce, Shopify, WhatsApp and OpenAI."""
    with FakeProviders() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _reset_providers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "providers" in request.fixturenames:
        request.getfixturevalue("providers").reset()


@pytest.fixture(scope="session")
def stripe_server(vault_admin: VaultGateway) -> Iterator[FakeStripe]:
    """A local Stripe; its secret key is the platform key, stored in Vault as operators do."""
    with FakeStripe() as fake:
        vault_admin.kv.write("platform/stripe", {"api_key": fake.secret_key}, cas=None)
        yield fake


@pytest.fixture(scope="session")
def shopify_app(vault_admin: VaultGateway) -> None:
    """The platform's Shopify app in Vault, as operators store it (OAuth connect needs it)."""
    vault_admin.kv.write(
        "platform/shopify",
        {"client_id": "session-client-id", "client_secret": "shpss_" + uuid.uuid4().hex},
        cas=None,
    )


@pytest.fixture(scope="session")
def meta_app(vault_admin: VaultGateway) -> None:
    """The platform's Meta app in Vault (WhatsApp's embedded signup needs it)."""
    vault_admin.kv.write(
        "platform/meta",
        {"client_id": "100000000000000", "client_secret": uuid.uuid4().hex},
        cas=None,
    )


@pytest.fixture(scope="session")
def settings(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    providers: FakeProviders,
    stripe_server: FakeStripe,
    shopify_app: None,
    meta_app: None,
) -> Settings:
    """The broker's settings for the session."""
    return make_settings(
        vault_endpoint,
        broker_vault_token,
        database_url,
        stripe_api_base=stripe_server.base_url,
        **provider_overrides(providers),
        **OAUTH_SETTINGS,
    )


@pytest.fixture(scope="session")
def broker_vault(settings: Settings) -> Iterator[VaultGateway]:
    """The gateway the broker uses (broker policy only)."""
    gateway = VaultGateway.from_settings(settings)
    yield gateway
    gateway.close()


@pytest.fixture(scope="session")
def app(settings: Settings, engine: Engine, broker_vault: VaultGateway) -> Any:
    """The app under test, on the real services."""
    return create_app(settings, engine=engine, vault=broker_vault)


@pytest.fixture(scope="session")
def client(app: Any) -> Iterator[TestClient]:
    """An HTTP client for the app (no lifespan: the session fixtures own the resources)."""
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def own_bao(tmp_path: Path) -> Iterator[Any]:
    """A bootstrapped OpenBao that only this test uses, so it may seal, throttle or kill it."""
    from broker.devstack.openbao import OpenBaoServer

    with OpenBaoServer(tmp_path, ephemeral=True) as bao:
        bootstrap_vault(VaultEndpoint(bao.addr, bao.root_token, bao.audit_log_path))
        yield bao


@pytest.fixture
def cli_services(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str
) -> dict[str, str]:
    """BROKER_* settings (without the prefix) for a CLI run on the session's services."""
    return session_services(vault_endpoint, broker_vault_token, database_url)


@pytest.fixture
def workers(settings: Settings, engine: Engine, tmp_path: Path) -> Iterator[Workers]:
    """Real `broker worker` processes on the session's services; any still running at the
    end is killed."""
    with Workers(settings, engine, tmp_path) as started:
        yield started


@pytest.fixture
def tenant(client: TestClient) -> str:
    """A fresh tenant for one test."""
    return make_tenant(client)
