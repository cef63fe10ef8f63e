"""Integration credentials over HTTP, against real Vault, PostgreSQL and local provider APIs."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders
from tests.support.tokens import bearer, token

PROVIDER_NAMES = ["twilio", "woocommerce", "shopify", "whatsapp", "openai"]


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def valid_fields(provider: str, fake: FakeProviders) -> dict[str, str]:
    fields = dict(VALID[provider])
    if provider == "woocommerce":
        fields["store_url"] = fake.base_url
    return fields


def put(
    client: TestClient, tenant: str, provider: str, fields: dict[str, str], **extra: Any
) -> Any:
    headers = admin(tenant) | extra.pop("headers", {})
    return client.put(
        f"/v1/tenants/settings/integrations/{provider}",
        json={"fields": fields, **extra},
        headers=headers,
    )


def stored(vault_admin: VaultGateway, tenant: str, provider: str) -> dict[str, Any] | None:
    entry = vault_admin.kv.read(f"tenants/{tenant}/integrations/{provider}")
    return entry.data if entry else None


def listing(client: TestClient, tenant: str) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/tenants/settings/integrations", headers=admin(tenant))
    assert response.status_code == 200, response.text
    return {item["provider"]: item for item in response.json()}


@pytest.mark.parametrize("provider", PROVIDER_NAMES)
def test_save_tests_live_stores_sealed_and_answers_with_hints_only(
    client: TestClient,
    vault_admin: VaultGateway,
    providers: FakeProviders,
    tenant: str,
    provider: str,
) -> None:
    fields = valid_fields(provider, providers)
    response = put(client, tenant, provider, fields)
    assert response.status_code == 200, response.text
    assert providers.hits[provider] == 1
    body = response.json()
    assert body["configured"] is True
    assert body["version"] == 1
    assert response.headers["etag"] == '"1"'
    assert body["connection_test_skipped"] is False
    assert body["last_test"]["ok"] is True
    assert body["updated_by"] == "user:alice"
    secrets = {k: v for k, v in fields.items() if k not in ("store_url", "shop_domain")}
    for value in secrets.values():
        assert value not in response.text
        assert value[-4:] in "".join(body["hints"].values()) or len(value) < 16
    data = stored(vault_admin, tenant, provider)
    assert data is not None
    assert data["ciphertext"].startswith("vault:v1:")
    for value in secrets.values():
        assert value not in str(data)
    item = listing(client, tenant)[provider]
    assert item["configured"] is True
    assert item["hints"] == body["hints"]


def test_identifiers_are_kept_in_postgres_but_secrets_are_not(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    fields = valid_fields("woocommerce", providers)
    assert put(client, tenant, "woocommerce", fields).status_code == 200
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM integration_credentials WHERE tenant_id = :t"), {"t": tenant}
        ).one()
    assert row.identifiers == {"store_url": providers.base_url}
    assert row.hints["consumer_key"].startswith("ck_****")
    assert fields["consumer_secret"] not in str(tuple(row))
    assert fields["consumer_key"] not in str(tuple(row))


def test_wrong_credentials_are_422_and_nothing_is_stored(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders, tenant: str
) -> None:
    fields = valid_fields("shopify", providers)
    fields["access_token"] = "shpat_" + "0" * 32
    response = put(client, tenant, "shopify", fields)
    assert response.status_code == 422
    assert response.json()["connection_test"]["code"] == "rejected"
    assert fields["access_token"] not in response.text
    assert "Invalid API key" not in response.text  # the provider's body is never echoed
    assert stored(vault_admin, tenant, "shopify") is None
    assert listing(client, tenant)["shopify"]["configured"] is False


@pytest.mark.parametrize(
    ("provider", "field", "bad"),
    [
        ("twilio", "account_sid", "AC123"),
        ("woocommerce", "consumer_key", "key_without_prefix_0123456789abcdef0123456789"),
        ("shopify", "shop_domain", "shop.example.com"),
        ("openai", "api_key", "not-an-openai-key"),
    ],
)
def test_malformed_fields_are_422_naming_the_field(
    client: TestClient, providers: FakeProviders, tenant: str, provider: str, field: str, bad: str
) -> None:
    fields = valid_fields(provider, providers) | {field: bad}
    response = put(client, tenant, provider, fields)
    assert response.status_code == 422
    assert field in response.text
    assert bad not in response.text
    assert providers.hits[provider] == 0


def test_unknown_provider_is_404(client: TestClient, tenant: str) -> None:
    response = put(client, tenant, "myspace", {"token": "x"})
    assert response.status_code == 404


def test_skipping_the_live_test_is_explicit_and_recorded(
    client: TestClient, engine: Engine, providers: FakeProviders, tenant: str
) -> None:
    response = put(
        client, tenant, "twilio", valid_fields("twilio", providers), skip_connection_test=True
    )
    assert response.status_code == 200
    assert providers.hits["twilio"] == 0
    assert response.json()["connection_test_skipped"] is True
    with engine.connect() as conn:
        detail = conn.execute(
            text("SELECT detail FROM audit_events WHERE request_id = :r"),
            {"r": response.headers["x-request-id"]},
        ).scalar_one()
    assert detail["connection_test"] == "skipped"


def test_testing_stored_and_candidate_credentials(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    fields = valid_fields("openai", providers)
    assert put(client, tenant, "openai", fields).status_code == 200
    stored_ok = client.post("/v1/tenants/settings/integrations/openai/test", headers=admin(tenant))
    assert stored_ok.json()["ok"] is True
    providers.fail_with("openai", 503)
    down = client.post("/v1/tenants/settings/integrations/openai/test", headers=admin(tenant))
    assert down.status_code == 200
    assert down.json() | {"reason": ""} == {
        "ok": False,
        "code": "provider_error",
        "reason": "",
        "at": None,
    }
    item = listing(client, tenant)["openai"]
    assert item["last_test"]["ok"] is False
    assert item["last_test"]["code"] == "provider_error"
    providers.reset()
    candidate = client.post(
        "/v1/tenants/settings/integrations/openai/test",
        json={"fields": fields | {"api_key": "sk-" + "x" * 40}},
        headers=admin(tenant),
    )
    assert candidate.json()["code"] == "rejected"
    # A candidate's result does not overwrite the stored credentials' status.
    assert listing(client, tenant)["openai"]["last_test"]["code"] == "provider_error"


def test_test_of_unconfigured_provider_is_404(client: TestClient, tenant: str) -> None:
    response = client.post("/v1/tenants/settings/integrations/shopify/test", headers=admin(tenant))
    assert response.status_code == 404


def test_integrations_status_in_settings_follows_the_credentials(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    put(client, tenant, "shopify", valid_fields("shopify", providers))
    settings = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert settings["integrations_status"]["shopify"]["enabled"] is True
    assert settings["integrations_status"]["shopify"]["last_test_ok"] is True
    client.delete("/v1/tenants/settings/integrations/shopify", headers=admin(tenant))
    settings = client.get("/v1/tenants/settings", headers=admin(tenant)).json()
    assert settings["integrations_status"]["shopify"]["enabled"] is False


def test_delete_then_restore_an_earlier_version(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders, tenant: str
) -> None:
    first = valid_fields("twilio", providers)
    assert put(client, tenant, "twilio", first).status_code == 200
    second = first | {"auth_token": "f" * 32}
    providers.accept("twilio", **second)
    v2 = put(client, tenant, "twilio", second, headers={"If-Match": '"1"'})
    assert v2.status_code == 200, v2.text
    assert v2.json()["version"] == 2
    deleted = client.delete("/v1/tenants/settings/integrations/twilio", headers=admin(tenant))
    assert deleted.status_code == 204
    assert stored(vault_admin, tenant, "twilio") is None
    assert listing(client, tenant)["twilio"]["configured"] is False
    versions = client.get(
        "/v1/tenants/settings/integrations/twilio/versions", headers=admin(tenant)
    ).json()
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[1]["deletion_time"] is not None
    restored = client.post(
        "/v1/tenants/settings/integrations/twilio/versions/1/restore", headers=admin(tenant)
    )
    assert restored.status_code == 200, restored.text
    assert restored.json()["version"] == 3
    assert restored.json()["hints"]["auth_token"].endswith(first["auth_token"][-4:])
    missing = client.post(
        "/v1/tenants/settings/integrations/twilio/versions/99/restore", headers=admin(tenant)
    )
    assert missing.status_code == 404


def test_delete_of_unconfigured_provider_is_404(client: TestClient, tenant: str) -> None:
    response = client.delete("/v1/tenants/settings/integrations/openai", headers=admin(tenant))
    assert response.status_code == 404


def test_if_match_guards_against_stale_writes(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    fields = valid_fields("whatsapp", providers)
    other = fields | {"access_token": fields["access_token"][:-4] + "Zz99"}
    providers.accept("whatsapp", **other)
    assert put(client, tenant, "whatsapp", fields).status_code == 200
    assert put(client, tenant, "whatsapp", other, headers={"If-Match": '"1"'}).status_code == 200
    stale = put(client, tenant, "whatsapp", fields, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert listing(client, tenant)["whatsapp"]["version"] == 2


def test_a_stale_if_match_whose_change_is_already_applied_succeeds(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    """RFC 9110 13.1.1: a state-changing request that Vault already holds answers 2xx.

    This is what makes a retry after an unanswered write safe: the client's first
    attempt landed, its If-Match is now stale, and its retry must not be refused.
    """
    fields = valid_fields("whatsapp", providers)
    assert put(client, tenant, "whatsapp", fields).status_code == 200
    assert put(client, tenant, "whatsapp", fields, headers={"If-Match": '"1"'}).status_code == 200
    again = put(client, tenant, "whatsapp", fields, headers={"If-Match": '"1"'})
    assert again.status_code == 200
    assert again.headers["etag"] == '"2"'
    assert again.json()["version"] == 2
    assert listing(client, tenant)["whatsapp"]["version"] == 2


def test_concurrent_saves_never_silently_overwrite(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders, tenant: str
) -> None:
    fields = valid_fields("openai", providers)
    writers = 6
    barrier = threading.Barrier(writers)
    statuses: list[int] = []

    def save(n: int) -> None:
        # Each writer stores a different key: identical content would be recognised
        # as already applied (see the If-Match test above) rather than conflict.
        mine = fields | {"api_key": fields["api_key"][:-2] + f"{n:02d}"}
        barrier.wait()
        statuses.append(put(client, tenant, "openai", mine, skip_connection_test=True).status_code)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 409}
    meta = vault_admin.kv.metadata(f"tenants/{tenant}/integrations/openai")
    assert meta is not None
    # Every acknowledged save is its own KV version: none was overwritten unseen.
    assert meta["current_version"] == statuses.count(200)
    item = listing(client, tenant)["openai"]
    assert item["version"] == meta["current_version"]
    assert item["sync_pending"] is False


def test_a_ciphertext_only_decrypts_for_its_own_tenant_and_provider(
    client: TestClient,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
) -> None:
    from broker.integrations.service import read_credentials
    from broker.vault.errors import CiphertextRejected
    from tests.support.tenants import make_tenant

    victim, other = make_tenant(client), make_tenant(client)
    assert put(client, victim, "shopify", valid_fields("shopify", providers)).status_code == 200
    ciphertext = stored(vault_admin, victim, "shopify")
    assert ciphertext is not None
    # Plant the victim's ciphertext under another provider and another tenant.
    vault_admin.kv.write(f"tenants/{victim}/integrations/twilio", ciphertext, cas=None)
    vault_admin.kv.write(f"tenants/{other}/integrations/shopify", ciphertext, cas=None)
    creds, _ = read_credentials(broker_vault, tenant_id=victim, provider="shopify")
    assert creds.reveal("access_token") == VALID["shopify"]["access_token"]
    with pytest.raises(CiphertextRejected):
        read_credentials(broker_vault, tenant_id=victim, provider="twilio")
    with pytest.raises(CiphertextRejected):
        read_credentials(broker_vault, tenant_id=other, provider="shopify")


def test_ssrf_store_url_is_refused_before_any_call(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    for url in ("http://169.254.169.254/latest", "http://10.0.0.5", "http://[::ffff:10.0.0.1]/"):
        fields = valid_fields("woocommerce", providers) | {"store_url": url}
        response = put(client, tenant, "woocommerce", fields)
        assert response.status_code == 422, url
        assert response.json()["connection_test"]["code"] == "refused_address"
    assert providers.hits["woocommerce"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest",
        "http://10.0.0.5",
        "http://192.168.1.10:8080/shop",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00:ec2::254]/",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "http://metadata.google.internal/",
        "http://printer.local/",
    ],
)
def test_skipped_connection_test_still_refuses_a_non_public_store_url(
    client: TestClient,
    vault_admin: VaultGateway,
    providers: FakeProviders,
    tenant: str,
    url: str,
) -> None:
    fields = valid_fields("woocommerce", providers) | {"store_url": url}
    response = put(client, tenant, "woocommerce", fields, skip_connection_test=True)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [error["field"] for error in body["errors"]] == ["fields.store_url"]
    assert "may not call" in body["errors"][0]["message"]
    assert url not in response.text
    assert stored(vault_admin, tenant, "woocommerce") is None
    assert providers.hits["woocommerce"] == 0


def test_skipped_connection_test_accepts_a_permitted_store_url(
    client: TestClient, vault_admin: VaultGateway, providers: FakeProviders, tenant: str
) -> None:
    """Control: the test app allows loopback (its fake providers), so this one is stored."""
    response = put(
        client,
        tenant,
        "woocommerce",
        valid_fields("woocommerce", providers),
        skip_connection_test=True,
    )
    assert response.status_code == 200, response.text
    assert stored(vault_admin, tenant, "woocommerce") is not None
    assert providers.hits["woocommerce"] == 0


def test_restoring_a_version_with_a_non_public_store_url_is_refused(
    client: TestClient,
    vault_admin: VaultGateway,
    engine: Engine,
    providers: FakeProviders,
    tenant: str,
) -> None:
    """A version written before the egress check existed must not come back through restore."""
    fields = valid_fields("woocommerce", providers)
    assert put(client, tenant, "woocommerce", fields, skip_connection_test=True).status_code == 200
    path = f"tenants/{tenant}/integrations/woocommerce"
    record = stored(vault_admin, tenant, "woocommerce")
    assert record is not None
    # What an unchecked save used to leave behind: the same secrets, an inward store URL,
    # sealed together (as the broker did) so the version verifies.
    from broker.vault.sealed import SealedStore

    public = {**record["public"], "identifiers": {"store_url": "http://169.254.169.254"}}
    secrets = {name: value for name, value in fields.items() if name != "store_url"}
    ciphertext = SealedStore(vault_admin).seal(tenant, "integrations/woocommerce", secrets, public)
    planted = {"ciphertext": ciphertext, "public": public}
    assert vault_admin.kv.write(path, planted, cas=1) == 2
    with engine.begin() as connection:
        # The row catches up with Vault the way an interrupted write would: by reconciling.
        connection.execute(
            text(
                "UPDATE integration_credentials SET vault_sync_pending = true, "
                "pending_since = now() WHERE tenant_id = :t AND provider = 'woocommerce'"
            ),
            {"t": tenant},
        )
    assert put(client, tenant, "woocommerce", fields, skip_connection_test=True).status_code == 200
    restore = client.post(
        "/v1/tenants/settings/integrations/woocommerce/versions/2/restore", headers=admin(tenant)
    )
    assert restore.status_code == 422, restore.text
    assert [error["field"] for error in restore.json()["errors"]] == ["fields.store_url"]
    assert "169.254" not in restore.text
    entry = vault_admin.kv.read(path)
    assert entry is not None
    assert entry.data["public"]["identifiers"] == {"store_url": providers.base_url}
    assert listing(client, tenant)["woocommerce"]["version"] == 3
    assert providers.hits["woocommerce"] == 0


def test_provider_timeouts_and_errors_are_clear_422s(
    client: TestClient, providers: FakeProviders, tenant: str
) -> None:
    providers.delay("twilio", 3.0)
    slow = put(client, tenant, "twilio", valid_fields("twilio", providers))
    assert slow.status_code == 422
    assert slow.json()["connection_test"]["code"] == "timeout"
    providers.reset()
    providers.fail_with("twilio", 500)
    broken = put(client, tenant, "twilio", valid_fields("twilio", providers))
    assert broken.json()["connection_test"]["code"] == "provider_error"
