"""Vault sealed or gone: service fetches answer 503 with Retry-After, never stale data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.devstack.openbao import OpenBaoServer
from broker.vault.bootstrap import bootstrap
from broker.vault.gateway import VaultGateway
from tests.conftest import (
    VaultEndpoint,
    bearer,
    make_settings,
    make_tenant,
    provider_overrides,
    token,
)
from tests.fakes.providers import VALID, FakeProviders


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    with OpenBaoServer(tmp_path, ephemeral=True) as server:
        admin = VaultGateway(addrs=[server.addr], token=server.root_token)
        bootstrap(admin)
        admin.close()
        yield server


def test_sealed_then_dead_vault_is_503_with_retry_after(
    bao: OpenBaoServer, database_url: str, engine: Engine, providers: FakeProviders
) -> None:
    settings = make_settings(
        VaultEndpoint(bao.addr, bao.root_token, None),
        bao.root_token,
        database_url,
        **provider_overrides(providers),
    )
    client = TestClient(
        create_app(settings, engine=engine, vault=VaultGateway.from_settings(settings))
    )
    tenant = make_tenant(client)
    saved = client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"]), "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert saved.status_code == 200
    worker = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    assert client.get(f"/v1/credentials/{tenant}/openai", headers=worker).status_code == 200
    bao.seal()
    sealed = client.get(f"/v1/credentials/{tenant}/openai", headers=worker)
    assert sealed.status_code == 503
    assert int(sealed.headers["retry-after"]) > 0
    assert VALID["openai"]["api_key"] not in sealed.text
    bao.unseal()
    assert client.get(f"/v1/credentials/{tenant}/openai", headers=worker).status_code == 200
    bao.kill()
    dead = client.get(f"/v1/credentials/{tenant}/openai", headers=worker)
    assert dead.status_code == 503
    assert "retry-after" in dead.headers
