"""The tenant's access report: Vault's audit log joined with the trail, scoped, audited, CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.core.config import Settings
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.integrations.test_routes import admin, put, valid_fields
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

REPORT = "/v1/tenants/settings/access-report"


@pytest.fixture(scope="module")
def reporting(
    settings: Settings, engine: Engine, broker_vault: VaultGateway, vault_endpoint: VaultEndpoint
) -> TestClient:
    """The app, told where the session's OpenBao writes its audit log."""
    if vault_endpoint.audit_log is None:
        pytest.skip("the session's Vault audit log is not readable here")
    configured = settings.model_copy(update={"vault_audit_log_paths": [vault_endpoint.audit_log]})
    return TestClient(create_app(configured, engine=engine, vault=broker_vault))


def fetch(client: TestClient, tenant: str, provider: str, *served: str) -> int:
    headers = bearer(token("credentials:read", kind="service", tenants=served, subject="sync"))
    status: int = client.get(f"/v1/credentials/{tenant}/{provider}", headers=headers).status_code
    return status


def test_the_report_names_each_read_and_each_refusal_of_the_tenants_credentials(
    reporting: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant, other = make_tenant(reporting), make_tenant(reporting)
    assert put(reporting, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    assert put(reporting, other, "openai", valid_fields("openai", providers)).status_code == 200
    assert fetch(reporting, tenant, "openai", tenant) == 200
    assert fetch(reporting, tenant, "openai", other) == 404  # a token that does not serve it
    assert fetch(reporting, other, "openai", other) == 200

    response = reporting.get(REPORT, headers=admin(tenant))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["vault_log_read"] is True
    reads = [r for r in body["rows"] if r["action"] == "credentials.fetch:openai"]
    assert [(r["actor"], r["via"], r["outcome"]) for r in reads] == [
        ("service:sync", "broker", "allowed")
    ]
    assert reads[0]["from_addr"] == "testclient"
    refused = [r for r in body["rows"] if r["outcome"] == "denied"]
    assert [(r["actor"], r["provider"]) for r in refused] == [("service:sync", "openai")]
    # The save's own reads are there too (the broker reading current metadata), named.
    assert all(r["provider"] == "openai" for r in body["rows"])
    # Nothing of the other tenant's reads.
    assert all(other not in str(row) for row in body["rows"])

    with engine.connect() as conn:
        audited = conn.execute(
            text(
                "SELECT count(*) FROM audit_events WHERE action = 'audit.access_report'"
                " AND tenant_id = :t"
            ),
            {"t": tenant},
        ).scalar_one()
    assert audited == 1


def test_the_report_as_csv(reporting: TestClient, providers: FakeProviders) -> None:
    tenant = make_tenant(reporting)
    assert put(reporting, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    assert fetch(reporting, tenant, "openai", tenant) == 200
    response = reporting.get(REPORT, params={"format": "csv"}, headers=admin(tenant))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    fetched: list[dict[str, Any]] = [r for r in rows if r["action"] == "credentials.fetch:openai"]
    assert [(r["actor"], r["outcome"], r["provider"]) for r in fetched] == [
        ("service:sync", "allowed", "openai")
    ]


def test_only_a_tenant_admin_gets_the_report(reporting: TestClient, tenant: str) -> None:
    viewer = bearer(token("integrations:manage", tenant_id=tenant))
    assert reporting.get(REPORT, headers=viewer).status_code == 403
    auditor = bearer(token("audit:read"))
    assert reporting.get(REPORT, headers=auditor).status_code == 403
