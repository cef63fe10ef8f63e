"""The audit trail API for the security team."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

AUDITOR = bearer(token("audit:read", subject="sec-team"))


def test_the_security_team_reads_writes_and_denials_for_a_tenant(client: TestClient) -> None:
    tenant = make_tenant(client)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    client.patch("/v1/tenants/settings", json={"orders": {"auto_confirm": True}}, headers=admin)
    client.get("/v1/tenants/settings", headers=bearer(token("finance:view", tenant_id=tenant)))
    events = client.get("/v1/audit/events", params={"tenant_id": tenant}, headers=AUDITOR)
    assert events.status_code == 200
    actions = [(e["action"], e["outcome"]) for e in events.json()]
    assert ("tenant.create", "success") in actions
    assert ("settings.update", "success") in actions
    assert ("GET /v1/tenants/settings", "denied") in actions
    denied = client.get(
        "/v1/audit/events", params={"tenant_id": tenant, "outcome": "denied"}, headers=AUDITOR
    ).json()
    assert [e["outcome"] for e in denied] == ["denied"]
    first, *rest = events.json()
    page = client.get(
        "/v1/audit/events", params={"tenant_id": tenant, "after_id": first["id"]}, headers=AUDITOR
    ).json()
    # The reads above were audited too, so the page may have grown since.
    assert [e["id"] for e in page][: len(rest)] == [e["id"] for e in rest]


def test_reading_the_trail_is_itself_audited(client: TestClient) -> None:
    client.get("/v1/audit/events", params={"limit": 1}, headers=AUDITOR)
    mine = client.get(
        "/v1/audit/events", params={"actor": "user:sec-team", "limit": 1000}, headers=AUDITOR
    ).json()
    assert any(e["action"] == "audit.read" for e in mine)


def test_a_tenant_filter_that_is_no_tenant_id_is_refused_and_never_kept(
    client: TestClient,
) -> None:
    pasted = "sk_live_" + "Q7" * 12
    response = client.get("/v1/audit/events", params={"tenant_id": pasted}, headers=AUDITOR)
    assert response.status_code == 422
    assert pasted not in response.text
    mine = client.get(
        "/v1/audit/events", params={"actor": "user:sec-team", "limit": 1000}, headers=AUDITOR
    )
    assert pasted not in mine.text


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("acme-shop", True),
        ("t-5877187831e6", True),  # a generated id with a run of digits is still a tenant id
        ("0123456789abcdef0123456789abcdef", False),  # a Twilio auth token's shape
        ("t-4242424242424242", False),  # a card number
        ("254712345678", False),  # a phone number
        ("sk_live_51H8aBcDeFgHiJkLmNoPqRsTuVw", False),
    ],
)
def test_the_trail_keeps_only_identifiers_that_read_as_tenant_ids(value: str, kept: bool) -> None:
    from broker.audit.trail import plain_identifier

    assert (plain_identifier(value) == value) is kept
