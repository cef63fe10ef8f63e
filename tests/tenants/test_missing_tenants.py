"""A tenant that does not exist (or is being deleted) is a 404 everywhere, never a 500 or a 200."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.support.tenants import new_tenant_id
from tests.support.tokens import bearer, token

IBAN = "DE89370400440532013000"


def test_put_payout_for_a_missing_tenant_is_404(client: TestClient) -> None:
    ghost = new_tenant_id()
    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": IBAN, "account_holder": "Acme Ltd"}},
        headers=bearer(token("finance:manage", tenant_id=ghost)),
    )
    assert response.status_code == 404, response.text
    assert IBAN not in response.text


def test_versions_of_a_missing_tenant_are_404(client: TestClient) -> None:
    ghost = new_tenant_id()
    response = client.get(
        "/v1/tenants/settings/integrations/openai/versions",
        headers=bearer(token("tenant:admin", tenant_id=ghost)),
    )
    assert response.status_code == 404, response.text


def test_a_huge_audit_cursor_is_422(client: TestClient) -> None:
    auditor = bearer(token("audit:read", subject="sec-team"))
    for after_id in (2**63, 10**30):
        response = client.get("/v1/audit/events", params={"after_id": after_id}, headers=auditor)
        assert response.status_code == 422, response.text
        assert str(after_id) not in response.text
    last = client.get("/v1/audit/events", params={"after_id": 2**63 - 1}, headers=auditor)
    assert last.status_code == 200
    assert last.json() == []
