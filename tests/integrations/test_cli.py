"""`broker shopify migrate-expiring` on the session's PostgreSQL and Vault and the fake Shopify."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.cli import app as cli
from broker.integrations.oauth import pasted_tenants
from broker.integrations.service import read_sealed
from broker.vault.gateway import VaultGateway
from tests.fakes.shopify_oauth import FakeShopifyOAuth
from tests.integrations.test_oauth import (  # noqa: F401 - fixtures
    CLIENT_SECRET,
    _shop,
    app_client,
    pasted,
    shopify,
)
from tests.support.cli import LOOPBACK_EGRESS, broker_env, invoke
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cli_services: dict[str, str],
    shopify: FakeShopifyOAuth,  # noqa: F811
    app_client: TestClient,  # noqa: F811 - stores the platform app in Vault
) -> Iterator[None]:
    """The broker's configuration for the CLI, Shopify pointed at the fake."""
    with broker_env(
        monkeypatch,
        tmp_path,
        **cli_services,
        **LOOPBACK_EGRESS,
        SHOPIFY_BASE_URL=shopify.base_url,
    ):
        yield


def run(*args: str) -> Any:
    return invoke(cli, ["shopify", "migrate-expiring", *args])


def test_migrate_expiring_reports_and_resumes(
    cli_env: None,
    app_client: TestClient,  # noqa: F811
    shopify: FakeShopifyOAuth,  # noqa: F811
    broker_vault: VaultGateway,
    engine: Engine,
) -> None:
    shops = [_shop(), _shop()]
    tenants = [pasted(app_client, shopify, shop)[0] for shop in shops]
    stranger = make_tenant(app_client)
    app_client.put(
        "/v1/tenants/settings/integrations/shopify",
        json={
            "fields": {"shop_domain": _shop(), "access_token": "shpat_" + secrets.token_hex(16)},
            "skip_connection_test": True,
        },
        headers=bearer(token("integrations:manage", tenant_id=stranger)),
    )
    picked = [arg for tenant in [*tenants, stranger] for arg in ("--tenant", tenant)]
    # What --all would work through: every pasted Shopify token, these among them.
    assert {*tenants, stranger} <= set(pasted_tenants(engine, provider="shopify"))

    dry = run(*picked, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["outcomes"] == {"would_migrate": 3}

    first = run(*picked, "--json")
    assert first.exit_code == 3  # one tenant could not be migrated
    report = json.loads(first.stdout)
    assert report["outcomes"] == {"migrated": 2, "failed": 1}
    assert [f["tenant_id"] for f in report["failures"]] == [stranger]
    assert "invalid_grant" in report["failures"][0]["error"]
    for tenant in tenants:
        record, _ = read_sealed(broker_vault, tenant_id=tenant, provider="shopify")
        assert record.public["kind"] == "oauth"
    left = set(pasted_tenants(engine, provider="shopify"))
    assert stranger in left
    assert not left & set(tenants)

    # Run again: the migrated ones are skipped, the failure is reported again.
    again = run(*picked)
    assert again.exit_code == 3
    assert "already_expiring: 2" in again.stdout
    assert CLIENT_SECRET not in again.output + first.output

    usage = run()
    assert usage.exit_code == 2
