"""Per-tenant Transit keys: created with the tenant, rotated with rewrap, shredded on delete."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.auth.principal import Principal
from broker.core.errors import BrokerError
from broker.integrations.service import read_credentials
from broker.tenants.keys import backfill_keys, rotate_all, rotate_tenant_key
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import binding, key_name
from tests.fakes.providers import VALID, FakeProviders
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

OPS = bearer(token("platform:admin", subject="ops"))
OPERATOR = Principal(subject="ops", kind="user", scopes=frozenset({"platform:admin"}))


def save(client: TestClient, tenant: str, provider: str, fake: FakeProviders) -> None:
    fields = dict(VALID[provider])
    if provider == "woocommerce":
        fields["store_url"] = fake.base_url
    response = client.put(
        f"/v1/tenants/settings/integrations/{provider}",
        json={"fields": fields, "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert response.status_code == 200, response.text


def tenant_with(client: TestClient, fake: FakeProviders, *providers: str) -> str:
    """A new tenant with credentials saved for each of `providers`, in that order."""
    tenant = make_tenant(client)
    for provider in providers:
        save(client, tenant, provider, fake)
    return tenant


def test_a_new_tenant_has_its_own_derived_aes256_key(
    client: TestClient, vault_admin: VaultGateway
) -> None:
    tenant = make_tenant(client)
    info = vault_admin.transit.key_info(key_name(tenant))
    assert info is not None
    assert info["type"] == "aes256-gcm96"
    assert info["derived"] is True


def test_backfill_creates_missing_keys_only(
    client: TestClient, engine: Engine, vault_admin: VaultGateway, broker_vault: VaultGateway
) -> None:
    tenant = make_tenant(client)
    vault_admin.transit.delete_key(key_name(tenant))
    created = backfill_keys(engine, broker_vault)
    assert tenant in created
    assert vault_admin.transit.key_info(key_name(tenant)) is not None
    assert tenant not in backfill_keys(engine, broker_vault)


def test_rotation_rewraps_everything_and_retires_old_ciphertexts(
    client: TestClient,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
) -> None:
    tenant = tenant_with(client, providers, "twilio", "shopify", "openai")
    old = vault_admin.kv.read(f"tenants/{tenant}/integrations/shopify")
    assert old is not None
    response = client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=OPS)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["key_version"] == 2
    assert (report["rewrapped"], report["already_current"], report["resumed"]) == (3, 0, False)
    for provider in ("twilio", "shopify", "openai"):
        entry = vault_admin.kv.read(f"tenants/{tenant}/integrations/{provider}")
        assert entry is not None
        assert entry.data["ciphertext"].startswith("vault:v2:")
        creds, _ = read_credentials(broker_vault, tenant_id=tenant, provider=provider)
        assert creds.reveal(next(iter(VALID[provider]))) == next(iter(VALID[provider].values()))
    with pytest.raises(BrokerError):
        vault_admin.transit.decrypt(
            key_name(tenant), old.data["ciphertext"], context=binding(tenant, "shopify")
        )
    info = vault_admin.transit.key_info(key_name(tenant))
    assert info is not None
    assert info["min_decryption_version"] == 2
    listed = client.get(
        "/v1/tenants/settings/integrations", headers=bearer(token("tenant:admin", tenant_id=tenant))
    ).json()
    assert {i["provider"]: i["version"] for i in listed if i["configured"]} == {
        "twilio": 2,
        "shopify": 2,
        "openai": 2,
    }


def test_an_interrupted_rotation_resumes_without_rotating_twice(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
) -> None:
    tenant = tenant_with(client, providers, "twilio", "openai")
    # Simulate a run that rotated the key and recorded it, then died before rewrapping.
    target = broker_vault.transit.rotate(key_name(tenant))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO key_rotations (tenant_id, target_version, status, rewrapped,"
                " started_at, started_by) VALUES (:t, :v, 'running', 0, now(), 'ops')"
            ),
            {"t": tenant, "v": target},
        )
    report = rotate_tenant_key(engine, broker_vault, principal=OPERATOR, tenant_id=tenant)
    assert report.resumed is True
    assert report.key_version == target == 2
    assert report.rewrapped == 2
    again = rotate_tenant_key(engine, broker_vault, principal=OPERATOR, tenant_id=tenant)
    assert (again.resumed, again.key_version, again.rewrapped, again.already_current) == (
        False,
        3,
        2,
        0,
    )


def test_deleting_a_tenant_crypto_shreds_it(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    providers: FakeProviders,
) -> None:
    tenant = tenant_with(client, providers, "shopify", "twilio")
    kept = vault_admin.kv.read(f"tenants/{tenant}/integrations/shopify")
    assert kept is not None
    response = client.delete(f"/v1/tenants/{tenant}", headers=OPS)
    assert response.status_code == 204
    assert vault_admin.kv.metadata(f"tenants/{tenant}/integrations/shopify") is None
    assert vault_admin.kv.metadata(f"tenants/{tenant}/integrations/twilio") is None
    assert vault_admin.transit.key_info(key_name(tenant)) is None
    # The ciphertext kept from before (a backup, say) is now undecryptable.
    with pytest.raises(BrokerError):
        vault_admin.transit.decrypt(
            key_name(tenant), kept.data["ciphertext"], context=binding(tenant, "shopify")
        )
    with engine.connect() as conn:
        for table in ("tenants", "tenant_settings", "integration_credentials"):
            column = "id" if table == "tenants" else "tenant_id"
            count = conn.execute(
                # Both names come from the literal tuple above, never from input.
                text(f"SELECT count(*) FROM {table} WHERE {column} = :t"),  # noqa: S608
                {"t": tenant},
            ).scalar_one()
            assert count == 0, table
        outcome = conn.execute(
            text(
                "SELECT outcome FROM audit_events WHERE tenant_id = :t AND action = 'tenant.delete'"
            ),
            {"t": tenant},
        ).scalar_one()
    assert outcome == "success"
    assert client.get(f"/v1/tenants/{tenant}", headers=OPS).status_code == 404
    assert client.delete(f"/v1/tenants/{tenant}", headers=OPS).status_code == 404


def test_rotating_many_tenants_side_by_side_settles_every_row(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
) -> None:
    tenants = [tenant_with(client, providers, "twilio", "openai") for _ in range(4)]
    before = _rows(engine, tenants)
    seen: list[str] = []
    reports = rotate_all(
        engine,
        broker_vault,
        principal=OPERATOR,
        tenant_ids=tenants,
        workers=4,
        on_done=lambda r: seen.append(r.tenant_id),
    )
    assert sorted(seen) == sorted(tenants)
    assert sorted((r.tenant_id, r.key_version, r.rewrapped, r.failed) for r in reports) == [
        (tenant, 2, 2, ()) for tenant in sorted(tenants)
    ]
    after = _rows(engine, tenants)
    for key, (version, pending, rotated_at) in after.items():
        # Moved to the version the rotation wrote, settled, and not aged: the secret is
        # the same, only its wrapping changed.
        assert (version, pending, rotated_at) == (before[key][0] + 1, False, before[key][2])
        tenant, provider = key
        entry = vault_admin.kv.read(f"tenants/{tenant}/integrations/{provider}")
        assert entry is not None
        assert entry.version == version
        assert entry.data["ciphertext"].startswith("vault:v2:")
        creds, _ = read_credentials(broker_vault, tenant_id=tenant, provider=provider)
        assert creds.reveal(next(iter(VALID[provider]))) == next(iter(VALID[provider].values()))


def _rows(engine: Engine, tenants: list[str]) -> dict[tuple[str, str], tuple[int, bool, object]]:
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT tenant_id, provider, kv_version, vault_sync_pending, rotated_at"
                " FROM integration_credentials WHERE tenant_id = ANY(:t)"
            ),
            {"t": tenants},
        ).all()
    return {(t, p): (v, pending, rotated) for t, p, v, pending, rotated in found}
