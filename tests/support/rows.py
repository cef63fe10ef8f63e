"""The database rows the Vault-write tests check a write's bookkeeping against."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text


def credential_row(engine: Engine, tenant: str, provider: str = "twilio") -> Any:
    """The tenant's integration_credentials row for `provider`, or None."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT kv_version, vault_sync_pending, hints, configured"
                " FROM integration_credentials WHERE tenant_id = :t AND provider = :p"
            ),
            {"t": tenant, "p": provider},
        ).one_or_none()


def payout_row(engine: Engine, tenant: str) -> Any:
    """The tenant's payout bookkeeping: (payout_version, payout_sync_pending, payout_hint)."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT payout_version, payout_sync_pending, payout_hint"
                " FROM payment_profiles WHERE tenant_id = :t"
            ),
            {"t": tenant},
        ).one()
