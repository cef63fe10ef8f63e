"""Tenant settings over HTTP: reads with ETag, merge-patches with If-Match, validation."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.settings.schemas import SETTINGS_GROUPS
from tests.support.tokens import bearer, token


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def test_get_returns_every_group_at_its_defaults_and_an_etag(
    client: TestClient, tenant: str
) -> None:
    response = client.get("/v1/tenants/settings", headers=admin(tenant))
    assert response.status_code == 200
    body = response.json()
    assert body["tenant_id"] == tenant
    assert set(SETTINGS_GROUPS) <= set(body)
    assert body["feature_flags"]["ai_responses_enabled"] is True
    assert body["business_hours"]["sunday"]["closed"] is True
    assert response.headers["etag"] == f'"{body["version"]}"'


def test_get_carries_no_credential_fields(client: TestClient, tenant: str) -> None:
    body = client.get("/v1/tenants/settings", headers=admin(tenant)).json()

    def keys(value: Any) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    leaky = {k for k in keys(body) if any(w in k for w in ("token", "secret", "password", "sid"))}
    assert not leaky


def test_patch_merges_nested_values_and_leaves_other_groups(
    client: TestClient, tenant: str
) -> None:
    response = client.patch(
        "/v1/tenants/settings",
        json={
            "notification_settings": {"email": {"weekly_report": True}},
            "branding": {"primary_color": "#AABBCC", "business_name": "Acme"},
        },
        headers=admin(tenant),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["notification_settings"]["email"] == {
        "order_received": True,
        "low_stock": True,
        "daily_summary": True,
        "weekly_report": True,
    }
    assert body["branding"]["primary_color"] == "#aabbcc"
    assert body["branding"]["business_name"] == "Acme"
    assert body["updated_by"] == "user:alice"
    assert body["version"] == 2
    again = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert again["branding"]["business_name"] == "Acme"
    assert again["feature_flags"]["ai_responses_enabled"] is True


def test_null_resets_a_key_or_a_whole_group_to_defaults(client: TestClient, tenant: str) -> None:
    client.patch(
        "/v1/tenants/settings",
        json={"compliance_settings": {"data_retention_days": 30, "gdpr_enabled": False}},
        headers=admin(tenant),
    )
    body = client.patch(
        "/v1/tenants/settings",
        json={"compliance_settings": {"data_retention_days": None}},
        headers=admin(tenant),
    ).json()
    assert body["compliance_settings"]["data_retention_days"] == 365
    assert body["compliance_settings"]["gdpr_enabled"] is False
    body = client.patch(
        "/v1/tenants/settings", json={"compliance_settings": None}, headers=admin(tenant)
    ).json()
    assert body["compliance_settings"]["gdpr_enabled"] is True


def test_etag_and_if_match(client: TestClient, tenant: str) -> None:
    first = client.get("/v1/tenants/settings", headers=admin(tenant))
    etag = first.headers["etag"]
    ok = client.patch(
        "/v1/tenants/settings",
        json={"orders": {"auto_confirm": True}},
        headers=admin(tenant) | {"If-Match": etag},
    )
    assert ok.status_code == 200
    assert ok.headers["etag"] != etag
    stale = client.patch(
        "/v1/tenants/settings",
        json={"orders": {"auto_confirm": False}},
        headers=admin(tenant) | {"If-Match": etag},
    )
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    current = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert current["orders"]["auto_confirm"] is True
    star = client.patch(
        "/v1/tenants/settings",
        json={"orders": {"auto_confirm": False}},
        headers=admin(tenant) | {"If-Match": "*"},
    )
    assert star.status_code == 200


def test_a_patch_that_changes_nothing_keeps_the_version(client: TestClient, tenant: str) -> None:
    before = client.get("/v1/tenants/settings", headers=admin(tenant))
    same = client.patch(
        "/v1/tenants/settings",
        json={"feature_flags": {"ai_responses_enabled": True}},
        headers=admin(tenant),
    )
    assert same.headers["etag"] == before.headers["etag"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"branding": {"primary_color": "blue"}}, "branding.primary_color"),
        ({"branding": {"logo_url": "http://insecure.example/logo.png"}}, "branding.logo_url"),
        ({"business_hours": {"monday": {"open": "25:00"}}}, "business_hours.monday.open"),
        ({"business_hours": {"timezone": "Mars/Olympus"}}, "business_hours.timezone"),
        ({"compliance_settings": {"data_retention_days": 0}}, "data_retention_days"),
        ({"compliance_settings": {"data_retention_days": 100000}}, "data_retention_days"),
        ({"feature_flags": {"teleportation": True}}, "feature_flags.(field 1)"),
        ({"notification_settings": {"quiet_hours": {"start": "9pm"}}}, "quiet_hours.start"),
        ({"colour_scheme": {"dark": True}}, '"field":"(field 1)"'),
        ({"integrations_status": {"shopify": {"enabled": True}}}, "integrations_status"),
        ({}, "patch"),
    ],
)
def test_bad_patches_are_422_naming_the_field(
    client: TestClient, tenant: str, patch: dict[str, Any], field: str
) -> None:
    response = client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant))
    assert response.status_code == 422, response.text
    assert field in response.text
    assert client.get("/v1/tenants/settings", headers=admin(tenant)).json()["version"] == 1


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        (
            {
                "webhooks": {
                    "endpoints": [{"url": "https://169.254.169.254/", "events": ["order.created"]}]
                }
            },
            "webhooks.endpoints.0.url",
        ),
        (
            {
                "webhooks": {
                    "endpoints": [{"url": "https://2130706433/", "events": ["order.created"]}]
                }
            },
            "webhooks.endpoints.0.url",
        ),
        ({"branding": {"logo_url": "https://[::ffff:10.0.0.1]/logo.png"}}, "branding.logo_url"),
        ({"branding": {"logo_url": "https://127.0.0.1:8443/logo.png"}}, "branding.logo_url"),
        (
            {"compliance_settings": {"privacy_policy_url": "https://metadata.google.internal/"}},
            "compliance_settings.privacy_policy_url",
        ),
        (
            {"compliance_settings": {"terms_url": "https://[::1]/terms"}},
            "compliance_settings.terms_url",
        ),
    ],
)
def test_urls_to_loopback_private_or_metadata_targets_are_refused(
    client: TestClient, tenant: str, patch: dict[str, Any], field: str
) -> None:
    response = client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant))
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert client.get("/v1/tenants/settings", headers=admin(tenant)).json()["version"] == 1


def test_validation_errors_do_not_echo_the_rejected_value(client: TestClient, tenant: str) -> None:
    canary = "CANARY-settings-7f3a9e"
    for patch in (
        {"branding": {"primary_color": canary}},
        {"feature_flags": {canary: True}},
        {"branding": {"logo_url": f"https://{canary}:pw@example.com/x"}},
    ):
        response = client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant))
        assert response.status_code == 422
        assert canary not in response.text.replace("feature_flags." + canary, "")


def test_malformed_json_is_a_problem_response(client: TestClient, tenant: str) -> None:
    response = client.patch(
        "/v1/tenants/settings",
        content=b"{not json",
        headers=admin(tenant) | {"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


def test_concurrent_patches_of_different_groups_all_survive(
    client: TestClient, tenant: str
) -> None:
    patches = [
        {"feature_flags": {"auto_handoff_enabled": True}},
        {"branding": {"business_name": "Concurrent"}},
        {"orders": {"payment_grace_period_hours": 48}},
        {"appointments": {"buffer_minutes": 30}},
        {"catalog": {"sync_interval_minutes": 120}},
        {"analytics": {"share_usage": True}},
        # Same group, different keys: a lost update inside one JSONB column.
        {"feature_flags": {"abandoned_cart_recovery": True}},
        {"feature_flags": {"multi_language_support": True}},
    ]
    barrier = threading.Barrier(len(patches))
    statuses: list[int] = []

    def send(patch: dict[str, Any]) -> None:
        barrier.wait()
        statuses.append(
            client.patch("/v1/tenants/settings", json=patch, headers=admin(tenant)).status_code
        )

    threads = [threading.Thread(target=send, args=(p,)) for p in patches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(patches)
    body = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert body["version"] == 1 + len(patches)
    assert body["feature_flags"]["auto_handoff_enabled"] is True
    assert body["feature_flags"]["abandoned_cart_recovery"] is True
    assert body["feature_flags"]["multi_language_support"] is True
    assert body["branding"]["business_name"] == "Concurrent"
    assert body["orders"]["payment_grace_period_hours"] == 48
    assert body["appointments"]["buffer_minutes"] == 30
    assert body["catalog"]["sync_interval_minutes"] == 120
    assert body["analytics"]["share_usage"] is True


def test_every_write_is_in_the_audit_trail(client: TestClient, engine: Engine, tenant: str) -> None:
    response = client.patch(
        "/v1/tenants/settings", json={"orders": {"auto_confirm": True}}, headers=admin(tenant)
    )
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT actor, tenant_id, action, resource, outcome, client_addr, detail, at"
                " FROM audit_events WHERE request_id = :rid"
            ),
            {"rid": response.headers["x-request-id"]},
        ).one()
    assert row.actor == "user:alice"
    assert row.tenant_id == tenant
    assert row.action == "settings.update"
    assert row.resource == f"tenants/{tenant}/settings"
    assert row.outcome == "success"
    assert row.client_addr
    assert row.detail["changed"] == ["orders"]
    assert row.at is not None


def test_a_url_stored_before_the_public_host_rule_keeps_the_settings_readable(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    """Rows written before URLs had to be public still read, and still patch elsewhere."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE tenant_settings SET branding = CAST(:b AS jsonb) WHERE tenant_id = :t"),
            {"b": '{"logo_url": "https://10.0.0.5/logo.png"}', "t": tenant},
        )
    headers = bearer(token("tenant:admin", tenant_id=tenant))
    read = client.get("/v1/tenants/settings", headers=headers)
    assert read.status_code == 200, read.text
    assert read.json()["branding"]["logo_url"] == "https://10.0.0.5/logo.png"
    patched = client.patch(
        "/v1/tenants/settings",
        json={"business_hours": {"timezone": "Africa/Nairobi"}},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
