"""Dynamic delivery: a key minted per service lease, never the root credential."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from typing import Any

import httpx
import hvac
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, select

from broker.auth.principal import Principal
from broker.core.errors import RateLimited
from broker.leases import service as leases
from broker.models import AuditEvent, DynamicLease
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore
from tests.fakes.provider_keys import OPENAI_ADMIN
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.leases.conftest import (
    DELIVERY,
    admin,
    configure,
    dynamic_tenant,
    fetch,
    leasing,
    service,
)
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

ROOT_VALUES = (VALID["twilio"]["auth_token"], OPENAI_ADMIN["api_key"])


def twilio_works(fake: FakeProviders, fields: dict[str, str]) -> bool:
    response = httpx.get(
        f"{fake.base_url}/2010-04-01/Accounts/{fields['account_sid']}.json",
        auth=(fields["api_key_sid"], fields["api_key_secret"]),
    )
    return response.status_code == 200


def openai_works(fake: FakeProviders, fields: dict[str, str]) -> bool:
    response = httpx.get(
        f"{fake.base_url}/v1/models", headers={"Authorization": f"Bearer {fields['api_key']}"}
    )
    return response.status_code == 200


def row(engine: Engine, lease_id: str) -> DynamicLease:
    with Session(engine) as session:
        found = session.get(DynamicLease, lease_id)
        assert found is not None
        return found


def test_a_twilio_fetch_returns_a_minted_key_that_works_and_never_the_root(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    fields = lease["fields"]
    assert set(fields) == {"account_sid", "api_key_sid", "api_key_secret"}
    assert fields["api_key_sid"].startswith("SK")
    assert VALID["twilio"]["auth_token"] not in str(lease)
    assert twilio_works(providers, fields)
    issued = datetime.fromisoformat(lease["issued_at"])
    assert datetime.fromisoformat(lease["expires_at"]) - issued == timedelta(seconds=300)
    registered = row(engine, lease["lease_id"])
    assert registered.state == "active"
    assert registered.provider_key_id == fields["api_key_sid"]
    assert registered.subject == "messaging"
    # Named after its lease at the provider, so a lost one is found again.
    assert providers.keys.twilio[fields["api_key_sid"]].friendly_name.endswith(lease["lease_id"])


def test_the_same_service_reuses_its_live_lease_and_another_gets_its_own(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenant = dynamic_tenant(dyn)
    first = fetch(dyn, tenant)
    again = fetch(dyn, tenant)
    assert again["lease_id"] == first["lease_id"]
    assert again["fields"] == first["fields"]
    other = fetch(dyn, tenant, subject="catalog-sync")
    assert other["lease_id"] != first["lease_id"]
    assert other["fields"]["api_key_sid"] != first["fields"]["api_key_sid"]
    assert len(providers.keys.twilio_keys(VALID["twilio"]["account_sid"])) >= 2


def test_an_openai_key_expires_with_its_lease_and_the_sweep_deletes_it(
    dyn: TestClient, providers: FakeProviders, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn, "openai")
    lease = fetch(dyn, tenant, "openai")
    assert set(lease["fields"]) == {"api_key"}
    assert openai_works(providers, lease["fields"])
    account_id = row(engine, lease["lease_id"]).provider_key_id
    assert account_id in providers.keys.service_accounts

    clock.advance(301)
    assert not openai_works(providers, lease["fields"])
    swept = leases.revoke_due(leasing(dyn))
    assert swept.revoked >= 1
    assert account_id not in providers.keys.service_accounts
    assert providers.keys.deleted[account_id] == 1
    done = row(engine, lease["lease_id"])
    assert done.state == "revoked"
    assert done.revoke_reason == "expired"
    # The next fetch mints a fresh key.
    assert fetch(dyn, tenant, "openai")["lease_id"] != lease["lease_id"]


def test_a_twilio_key_stops_working_after_expiry_and_the_sweep(
    dyn: TestClient, providers: FakeProviders, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    clock.advance(299)
    assert (
        leases.revoke_one(leasing(dyn), lease["lease_id"], actor=leases.WORKER, only_if_due=True)
        == "not_due"
    )
    assert twilio_works(providers, lease["fields"])
    clock.advance(2)
    leases.revoke_due(leasing(dyn))
    assert not twilio_works(providers, lease["fields"])
    assert row(engine, lease["lease_id"]).state == "revoked"
    with Session(engine) as session:
        events = session.exec(
            select(AuditEvent)
            .where(AuditEvent.tenant_id == tenant)
            .where(AuditEvent.action.in_(("lease.mint", "lease.revoke")))  # type: ignore[attr-defined]
        ).all()
    assert sorted(e.action for e in events) == ["lease.mint", "lease.revoke"]


def test_the_root_credential_never_leaves_in_a_fetch_or_a_wrap(
    dyn: TestClient, vault_endpoint: VaultEndpoint, engine: Engine
) -> None:
    seen: list[str] = []
    for provider in ("twilio", "openai"):
        tenant = dynamic_tenant(dyn, provider)
        for subject in ("a", "a", "b"):
            response = dyn.get(
                f"/v1/credentials/{tenant}/{provider}", headers=service(tenant, subject=subject)
            )
            assert response.status_code == 200, response.text
            seen.append(response.text)
            wrapped = dyn.get(
                f"/v1/credentials/{tenant}/{provider}?wrap_ttl=60s",
                headers=service(tenant, subject=subject),
            )
            assert wrapped.status_code == 200, wrapped.text
            seen.append(wrapped.text)
            unwrapping = hvac.Client(url=vault_endpoint.addr, token=wrapped.json()["wrap"]["token"])
            # types-hvac leaves unwrap untyped.
            inner: Any = unwrapping.sys.unwrap()["data"]  # type: ignore[no-untyped-call]
            assert inner["lease_id"] == wrapped.json()["lease_id"]
            assert "api_key" in str(inner["fields"])
            seen.append(str(inner))
        listed = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant))
        seen.append(listed.text)
    for text_seen in seen:
        for root in ROOT_VALUES:
            assert root not in text_seen
    # Nor anywhere in the registry, the trail or the queue's job arguments.
    with engine.connect() as conn:
        dumped = " ".join(
            str(r)
            for query in (
                "SELECT * FROM leases",
                "SELECT detail FROM audit_events",
                "SELECT args FROM procrastinate_jobs",
            )
            for r in conn.execute(text(query)).all()
        )
    for root in ROOT_VALUES:
        assert root not in dumped


def test_live_leases_are_capped_per_service(
    dyn: TestClient, clock: FakeClock, broker_vault: VaultGateway
) -> None:
    tenant = dynamic_tenant(dyn)
    record = SealedStore(broker_vault).read(tenant, "integrations/twilio")
    assert record is not None
    worker = Principal(subject="messaging", kind="service", scopes=frozenset())

    def issue(cap: int) -> str:
        assert record is not None
        return leases.issue(
            dataclasses.replace(leasing(dyn), live_cap=cap),
            principal=worker,
            tenant_id=tenant,
            provider="twilio",
            lease_s=300,
            record=record,
        ).lease_id

    first = issue(2)
    assert issue(2) == first
    clock.advance(245)  # under a minute left: not worth handing out again
    second = issue(2)
    assert second != first
    clock.advance(245)  # now the second is nearly over: one live lease, and the cap is one
    with pytest.raises(RateLimited) as refused:
        issue(1)
    assert 1 <= refused.value.retry_after <= 56
    assert issue(2) not in (first, second)  # below a cap of two, a fresh one is minted
    # Another service is not held back by this one's leases.
    fetch(dyn, tenant, subject="other")
    clock.advance(301)
    leases.revoke_due(leasing(dyn))


def test_dynamic_delivery_needs_a_root_that_can_mint(dyn: TestClient) -> None:
    tenant = make_tenant(dyn)
    dyn.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"])},
        headers=admin(tenant),
    ).raise_for_status()
    refused = dyn.put(
        DELIVERY.format(provider="openai"), json={"mode": "dynamic"}, headers=admin(tenant)
    )
    assert refused.status_code == 422
    assert "Admin key" in refused.json()["detail"]
    assert VALID["openai"]["api_key"] not in refused.text
    whatsapp = dyn.put(
        DELIVERY.format(provider="whatsapp"), json={"mode": "dynamic"}, headers=admin(tenant)
    )
    assert whatsapp.status_code in (404, 422)
    missing = dyn.put(
        DELIVERY.format(provider="twilio"), json={"mode": "dynamic"}, headers=admin(tenant)
    )
    assert missing.status_code == 404
    # Still static: the stored key is delivered as before.
    assert fetch(dyn, tenant, "openai")["fields"]["api_key"] == VALID["openai"]["api_key"]


def test_switching_back_to_static_revokes_the_minted_keys(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    back = dyn.put(
        DELIVERY.format(provider="twilio"), json={"mode": "static"}, headers=admin(tenant)
    )
    assert back.status_code == 200
    assert back.json()["delivery"] == "static"
    leases.revoke_due(leasing(dyn))
    assert not twilio_works(providers, lease["fields"])
    assert fetch(dyn, tenant)["fields"]["auth_token"] == VALID["twilio"]["auth_token"]


def test_rotating_the_root_revokes_keys_minted_from_the_old_one(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    old = fetch(dyn, tenant)
    saved = dyn.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": dict(VALID["twilio"])},
        headers=admin(tenant),
    )
    assert saved.status_code == 200
    assert saved.json()["delivery"] == "dynamic"  # a rotation keeps the delivery
    assert row(engine, old["lease_id"]).revoke_reason == "root_rotated"
    leases.revoke_due(leasing(dyn))
    assert not twilio_works(providers, old["fields"])
    new = fetch(dyn, tenant)
    assert new["lease_id"] != old["lease_id"]
    assert twilio_works(providers, new["fields"])


def test_deleting_the_root_revokes_its_keys_first(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    providers.go_down("twilio")
    refused = dyn.delete("/v1/tenants/settings/integrations/twilio", headers=admin(tenant))
    assert refused.status_code == 503
    assert twilio_works is not None
    providers.come_back("twilio")
    assert twilio_works(providers, lease["fields"])  # nothing was removed
    deleted = dyn.delete("/v1/tenants/settings/integrations/twilio", headers=admin(tenant))
    assert deleted.status_code == 204, deleted.text
    assert not twilio_works(providers, lease["fields"])


def test_deleting_the_tenant_revokes_every_key_before_the_shred(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenant = dynamic_tenant(dyn)
    configure(dyn, tenant, "openai")
    twilio = fetch(dyn, tenant)
    openai = fetch(dyn, tenant, "openai")
    gone = dyn.delete(f"/v1/tenants/{tenant}", headers=bearer(token("platform:admin")))
    assert gone.status_code == 204, gone.text
    assert not twilio_works(providers, twilio["fields"])
    assert not openai_works(providers, openai["fields"])


def test_every_mint_and_revoke_is_in_the_vault_audit_log_with_who_and_why(
    dyn: TestClient, vault_endpoint: VaultEndpoint
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    tenant = dynamic_tenant(dyn)
    minted = dyn.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant))
    lease_id = minted.json()["lease_id"]
    revoked = dyn.post(
        "/v1/tenants/settings/leases/revoke", json={"lease_id": lease_id}, headers=admin(tenant)
    )
    assert revoked.json()["revoked"] == 1

    def entries(request_id: str) -> list[dict[str, Any]]:
        assert vault_endpoint.audit_log is not None
        return [
            json.loads(line)
            for line in vault_endpoint.audit_log.read_text().splitlines()
            if request_id in line
        ]

    def seen(request_id: str) -> set[tuple[str, str, str, str]]:
        found = set()
        for entry in entries(request_id):
            headers = entry["request"].get("headers") or {}
            found.add(
                (
                    headers["x-broker-action"][0],
                    headers["x-broker-actor"][0],
                    headers["x-broker-tenant"][0],
                    entry["request"]["path"],
                )
            )
        return found

    lease_path = f"secret/data/tenants/{tenant}/leases/{lease_id}"
    root_path = f"secret/data/tenants/{tenant}/integrations/twilio"
    mint = seen(minted.headers["x-request-id"])
    assert ("leases.mint:twilio", "service:messaging", tenant, lease_path) in mint
    assert ("credentials.fetch:twilio", "service:messaging", tenant, root_path) in mint
    revoke = seen(revoked.headers["x-request-id"])
    assert ("leases.revoke:twilio", "user:owner", tenant, root_path) in revoke
    assert any(
        action == "leases.revoke:twilio" and path.endswith(f"tenants/{tenant}/leases/{lease_id}")
        for action, _, _, path in revoke
    )


def test_a_key_rotation_rewraps_live_leases_which_are_still_reused(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    rotated = dyn.post(
        f"/v1/tenants/{tenant}/keys/rotate", headers=bearer(token("platform:admin", subject="ops"))
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["rewrapped"] >= 2  # the root credential and the lease's key
    again = fetch(dyn, tenant)
    assert again["lease_id"] == lease["lease_id"]
    assert again["fields"] == lease["fields"]
    assert twilio_works(providers, again["fields"])
