"""Vault sealed or gone: service fetches answer 503 with Retry-After, never stale data."""

from __future__ import annotations

from sqlalchemy import Engine

from broker.devstack.openbao import OpenBaoServer
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import app_on
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def test_sealed_then_dead_vault_is_503_with_retry_after(
    own_bao: OpenBaoServer, database_url: str, engine: Engine, providers: FakeProviders
) -> None:
    bao = own_bao
    client = app_on(bao, database_url, engine, providers)
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
