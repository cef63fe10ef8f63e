"""Tenants for tests: fresh ids, created through the API as a platform admin would."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.support.tokens import bearer, token


def new_tenant_id(prefix: str = "t") -> str:
    """A tenant id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_tenant(client: TestClient, tenant_id: str | None = None, **overrides: Any) -> str:
    """Create a tenant through the API, as a platform admin would."""
    tenant_id = tenant_id or new_tenant_id()
    body = {"id": tenant_id, "name": f"Shop {tenant_id}", **overrides}
    response = client.post(
        "/v1/tenants", json=body, headers=bearer(token("platform:admin", subject="ops"))
    )
    assert response.status_code == 201, response.text
    return tenant_id
