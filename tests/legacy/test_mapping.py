"""The pure rules of the legacy migration: tenant ids and metadata keys (no I/O)."""

from __future__ import annotations

from broker.legacy.migrate import map_metadata, normalise_tenant_id
from broker.settings.schemas import default_group


def test_legacy_ids_become_tenant_ids_deterministically() -> None:
    assert normalise_tenant_id("acme-shop") == "acme-shop"
    assert normalise_tenant_id("  Acme Shop  ") == "acme-shop"
    assert normalise_tenant_id("ACME__Shop!!") == "acme-shop"
    assert normalise_tenant_id("Café Olé") == "cafe-ole"
    assert normalise_tenant_id("42") == "42"
    assert normalise_tenant_id("settings") == "settings-legacy"
    assert normalise_tenant_id("x" * 80) == "x" * 63
    assert normalise_tenant_id("a" * 62 + "-b") == "a" * 62
    assert normalise_tenant_id("!!!") is None
    assert normalise_tenant_id("   ") is None
    # Different spellings of one shop land on one tenant: the migration must notice.
    assert normalise_tenant_id("Beta_Shop") == normalise_tenant_id("beta shop") == "beta-shop"


def test_metadata_keys_map_onto_settings_groups_and_the_rest_is_reported() -> None:
    metadata = {
        "business_hours": {"timezone": "Africa/Nairobi", "monday": {"open": "08:00"}},
        "branding.logo_url": "https://cdn.example.com/logo.png",
        "branding.primary_color": "blue",
        "notifications": {"sms": {"payment_failed": False}},
        "currency": "KES",
        "integrations_status": {"twilio": {"enabled": True}},
        "feature_flags": "all",
        "legacy_plan": "gold",
        "api_key=sk-live-123": "x",
        "catalog": None,
    }
    patches, unmapped = map_metadata(metadata, default_group)
    assert patches == {
        "business_hours": {"timezone": "Africa/Nairobi", "monday": {"open": "08:00"}},
        "branding": {"logo_url": "https://cdn.example.com/logo.png"},
        "notification_settings": {"sms": {"payment_failed": False}},
        "localization": {"currency": "KES"},
    }
    reasons = {u.key: u.reason for u in unmapped}
    assert reasons["branding.primary_color"].startswith("not valid for branding: primary_color")
    assert "maintained by the broker" in reasons["integrations_status"]
    assert reasons["feature_flags"] == "feature_flags must be an object"
    assert reasons["legacy_plan"] == "no settings group for this key"
    assert reasons["catalog"].startswith("the value is null")
    # A key that might be a pasted secret is reported, but not by name.
    assert "(a key that is not shown)" in reasons
    assert not any("sk-live" in key for key in reasons)
    assert len(unmapped) == 6
    # Not an object at all: reported as a whole, never dropped.
    assert map_metadata("free text", default_group)[1][0].key == "(metadata)"
    assert map_metadata(None, default_group) == ({}, [])
