"""bench/rotation.py seeds what it says (every secret a tenant can hold, or one) through
the broker's own write paths, and reports both distributions, labelled, side by side."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine, text

from bench import rotation
from broker.core.config import Settings
from broker.vault.gateway import VaultGateway


def test_both_distributions_are_seeded_rotated_and_reported(
    settings: Settings, engine: Engine, vault_admin: VaultGateway
) -> None:
    prefix = f"rotb-{uuid.uuid4().hex[:8]}"
    results = rotation.measure_distributions(settings, 12, workers=2, prefix=prefix)

    realistic, worst = (results["distributions"][n] for n in ("realistic", "worst_case"))
    assert realistic["distribution"] == (
        "6 per tenant: twilio, woocommerce, shopify, whatsapp, openai, payout"
    )
    assert worst["distribution"] == "1 per tenant: openai"
    assert (realistic["tenants"], realistic["secrets_rewrapped"], realistic["failed"]) == (2, 12, 0)
    assert (worst["tenants"], worst["secrets_rewrapped"], worst["failed"]) == (12, 12, 0)
    # The headline (what bench.report summarises) is the realistic distribution's.
    assert results["secrets_rewrapped"] == realistic["secrets_rewrapped"]
    assert "realistic" in rotation.describe(results)
    assert "worst case" in rotation.describe(results)

    # Really stored and really rotated: every row settled on a rewrapped version.
    tenant = f"{prefix}-realistic-000000"
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT provider, kv_version, vault_sync_pending FROM integration_credentials"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant},
        ).all()
        payout = conn.execute(
            text(
                "SELECT payout_version, payout_sync_pending FROM payment_profiles"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant},
        ).one()
    assert sorted(rows) == sorted((p, 2, False) for p in rotation.INTEGRATIONS)
    assert tuple(payout) == (2, False)
    entry = vault_admin.kv.read(f"tenants/{tenant}/payout")
    assert entry is not None
    assert entry.data["ciphertext"].startswith("vault:v2:")
