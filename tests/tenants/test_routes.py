"""Tenant lifecycle over HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.tenants import make_tenant, new_tenant_id
from tests.support.tokens import bearer, token

OPS = bearer(token("platform:admin", subject="ops"))


def test_a_new_tenant_gets_settings_with_defaults(client: TestClient) -> None:
    tenant_id = new_tenant_id()
    created = client.post("/v1/tenants", json={"id": tenant_id, "name": "Acme"}, headers=OPS)
    assert created.status_code == 201
    assert created.json()["created_by"] == "user:ops"
    settings = client.get(
        "/v1/tenants/settings", headers=bearer(token("integrations:view", tenant_id=tenant_id))
    )
    assert settings.status_code == 200
    assert settings.json()["version"] == 1


def test_duplicate_tenant_is_a_conflict(client: TestClient) -> None:
    tenant_id = make_tenant(client)
    again = client.post("/v1/tenants", json={"id": tenant_id, "name": "Again"}, headers=OPS)
    assert again.status_code == 409


@pytest.mark.parametrize(
    "bad_id", ["", "UPPER", "has space", "-leading", "trailing-", "a" * 64, "settings", "x/y"]
)
def test_tenant_ids_are_safe_slugs(client: TestClient, bad_id: str) -> None:
    response = client.post("/v1/tenants", json={"id": bad_id, "name": "X"}, headers=OPS)
    assert response.status_code == 422


def test_unknown_fields_are_rejected(client: TestClient) -> None:
    response = client.post(
        "/v1/tenants", json={"id": new_tenant_id(), "name": "X", "plan": "gold"}, headers=OPS
    )
    assert response.status_code == 422
    # By position, with the allowed names: an unknown name may be a pasted secret.
    assert response.json()["errors"] == [
        {"field": "(field 3)", "message": "unknown field; the allowed fields are id, name"}
    ]


def test_get_and_list(client: TestClient) -> None:
    first, second = (
        make_tenant(client, new_tenant_id("la")),
        make_tenant(client, new_tenant_id("lb")),
    )
    assert client.get(f"/v1/tenants/{first}", headers=OPS).json()["id"] == first
    assert client.get(f"/v1/tenants/{new_tenant_id()}", headers=OPS).status_code == 404
    listed = client.get("/v1/tenants", params={"limit": 500}, headers=OPS).json()
    ids = [t["id"] for t in listed]
    assert {first, second} <= set(ids)
    assert ids == sorted(ids)
    page = client.get("/v1/tenants", params={"after": first, "limit": 1}, headers=OPS).json()
    assert page[0]["id"] > first


@pytest.mark.parametrize("method", ["DELETE", "POST", "PUT"])
def test_the_callers_own_settings_are_not_a_tenant_named_settings(
    client: TestClient, method: str
) -> None:
    tenant_id = make_tenant(client)
    admin = bearer(token("tenant:admin", tenant_id=tenant_id))
    for headers in (OPS, admin):
        answer = client.request(method, "/v1/tenants/settings", headers=headers)
        assert answer.status_code == 405
        assert "GET" in answer.headers["allow"]
        assert answer.headers["content-type"] == "application/problem+json"
    assert client.post("/v1/tenants/settings/keys/rotate", headers=OPS).status_code == 404
    # A tenant id that only begins with the word is a tenant like any other.
    near = make_tenant(client, new_tenant_id("settings"))
    assert client.get(f"/v1/tenants/{near}", headers=OPS).json()["id"] == near
    assert client.post(f"/v1/tenants/{near}/keys/rotate", headers=OPS).status_code == 200
