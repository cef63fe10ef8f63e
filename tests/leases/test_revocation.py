"""Revocation: on demand (a lease, a tenant, a service across tenants), failures retried
with backoff and visible, and mints whose answer was lost still revoked."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from broker.leases import service as leases
from broker.leases.service import lease_item
from broker.models import DynamicLease
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock
from tests.leases.conftest import (
    admin,
    configure,
    dynamic_tenant,
    fetch,
    leasing,
    refused_mint,
    service,
)
from tests.leases.test_dynamic import openai_works, twilio_works
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

ACCOUNT = VALID["twilio"]["account_sid"]


def row(engine: Engine, lease_id: str) -> DynamicLease:
    with Session(engine) as session:
        found = session.get(DynamicLease, lease_id)
        assert found is not None
        return found


def _metric(client: TestClient, name: str, provider: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{provider="{provider}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_provider_outage_during_revocation_is_retried_visible_and_ends_revoked(
    dyn: TestClient, providers: FakeProviders, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    providers.go_down("twilio")
    clock.advance(301)
    swept = leases.revoke_due(leasing(dyn))
    assert swept.failed >= 1
    failed = row(engine, lease["lease_id"])
    assert failed.state == "active"
    assert failed.revoke_attempts == 1
    assert failed.last_error == "unreachable"
    assert failed.next_attempt_at is not None
    assert failed.next_attempt_at - datetime.fromtimestamp(clock.now()).astimezone() > timedelta(
        seconds=8
    )
    # The security team sees it, and so do the metrics.
    listed = dyn.get(
        "/v1/leases",
        params={"tenant_id": tenant, "state": "failing"},
        headers=bearer(token("audit:read", subject="sec")),
    )
    assert [item["id"] for item in listed.json()] == [lease["lease_id"]]
    assert listed.json()[0]["last_error"] == "unreachable"
    assert _metric(dyn, "broker_lease_revocations_failing", "twilio") >= 1
    # Backing off: the next sweep does not hammer the provider.
    leases.revoke_due(leasing(dyn))
    assert row(engine, lease["lease_id"]).revoke_attempts == 1

    providers.come_back("twilio")
    assert twilio_works(providers, lease["fields"])
    clock.advance(11)
    leases.revoke_due(leasing(dyn))
    done = row(engine, lease["lease_id"])
    assert done.state == "revoked"
    assert done.revoke_attempts == 1
    assert not twilio_works(providers, lease["fields"])
    assert providers.keys.deleted[lease["fields"]["api_key_sid"]] == 1


def test_a_rate_limited_revocation_waits_for_retry_after(
    dyn: TestClient, providers: FakeProviders, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn, "openai")
    lease = fetch(dyn, tenant, "openai")
    providers.fail_with("openai", 429, retry_after="120")
    outcome = leases.revoke_matching(
        leasing(dyn),
        leases.Selector(tenant_id=tenant),
        principal=leases.WORKER,
        reason="requested",
    )
    assert outcome.failed == 1
    waiting = row(engine, lease["lease_id"])
    assert waiting.last_error == "rate_limited"
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at >= waiting.due_at + timedelta(seconds=119)
    providers.come_back("openai")
    clock.advance(121)
    leases.revoke_due(leasing(dyn))
    assert row(engine, lease["lease_id"]).state == "revoked"
    assert not openai_works(providers, lease["fields"])


def test_a_refused_mint_leaves_no_key_and_says_retry(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant, refused = refused_mint(dyn, providers)
    assert refused.headers["Retry-After"] == "7"
    assert VALID["twilio"]["auth_token"] not in refused.text
    listed = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant)).json()
    assert [(item["state"], item["revoke_reason"]) for item in listed] == [
        ("revoked", "mint_failed")
    ]


def test_a_key_minted_after_the_broker_gave_up_is_found_by_name_and_revoked(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    providers.delay("twilio", 3)  # longer than the broker waits (2 s in tests)
    lost = dyn.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant))
    assert lost.status_code == 503
    (pending,) = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant)).json()
    assert pending["state"] == "minting"
    assert pending["revoke_reason"] == "mint_unconfirmed"
    # The fake mints it once its delay is over: a key the broker never saw.
    name = f"broker-lease-{pending['id']}"
    deadline = time.monotonic() + 10
    while not any(k.friendly_name == name for k in providers.keys.twilio_keys(ACCOUNT)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    providers.come_back("twilio")
    leases.revoke_due(leasing(dyn))
    assert not any(k.friendly_name == name for k in providers.keys.twilio_keys(ACCOUNT))
    done = row(engine, pending["id"])
    assert done.state == "revoked"
    assert done.provider_key_id is not None
    assert providers.keys.deleted[done.provider_key_id] == 1


def test_a_tenant_admin_lists_and_revokes_the_tenants_leases(
    dyn: TestClient, providers: FakeProviders, broker_vault: VaultGateway
) -> None:
    tenant = dynamic_tenant(dyn)
    configure(dyn, tenant, "openai")
    first = fetch(dyn, tenant, subject="bot")
    second = fetch(dyn, tenant, subject="sync")
    third = fetch(dyn, tenant, "openai", subject="bot")
    other_tenant = dynamic_tenant(dyn)
    elsewhere = fetch(dyn, other_tenant, subject="bot")

    listed = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant)).json()
    assert {item["id"] for item in listed} == {
        first["lease_id"],
        second["lease_id"],
        third["lease_id"],
    }
    assert all(item["tenant_id"] == tenant for item in listed)
    by_bot = dyn.get(
        "/v1/tenants/settings/leases", params={"subject": "bot"}, headers=admin(tenant)
    ).json()
    assert {item["id"] for item in by_bot} == {first["lease_id"], third["lease_id"]}

    one = dyn.post(
        "/v1/tenants/settings/leases/revoke",
        json={"lease_id": first["lease_id"]},
        headers=admin(tenant),
    )
    assert one.json() == {"revoked": 1, "failed": 0, "already": 0, "queued": 0}
    assert not twilio_works(providers, first["fields"])
    assert twilio_works(providers, second["fields"])
    # Its sealed copy is gone from Vault too.
    assert SealedStore(broker_vault).read(tenant, lease_item(first["lease_id"])) is None

    # Another tenant's lease id is not this admin's to revoke.
    foreign = dyn.post(
        "/v1/tenants/settings/leases/revoke",
        json={"lease_id": elsewhere["lease_id"]},
        headers=admin(tenant),
    )
    assert foreign.json()["revoked"] == 0
    assert twilio_works(providers, elsewhere["fields"])

    incident = dyn.post(
        "/v1/tenants/settings/leases/revoke", json={"provider": "openai"}, headers=admin(tenant)
    )
    assert incident.json()["revoked"] == 1
    assert not openai_works(providers, third["fields"])
    everything = dyn.post("/v1/tenants/settings/leases/revoke", json={}, headers=admin(tenant))
    assert everything.json()["revoked"] == 1
    assert not twilio_works(providers, second["fields"])
    # A service asking afterwards gets a fresh key.
    assert fetch(dyn, tenant, subject="sync")["lease_id"] != second["lease_id"]


def test_revoking_a_service_across_three_tenants_spares_other_services(
    dyn: TestClient, providers: FakeProviders
) -> None:
    tenants = [dynamic_tenant(dyn) for _ in range(3)]
    configure(dyn, tenants[2], "openai")
    leaked = [fetch(dyn, t, subject="leaky-worker") for t in tenants]
    leaked.append(fetch(dyn, tenants[2], "openai", subject="leaky-worker"))
    spared = [fetch(dyn, t, subject="healthy-worker") for t in tenants]

    tenant_admin = dyn.post(
        "/v1/leases/revoke", json={"subject": "leaky-worker"}, headers=admin(tenants[0])
    )
    assert tenant_admin.status_code == 403
    revoked = dyn.post(
        "/v1/leases/revoke",
        json={"subject": "leaky-worker"},
        headers=bearer(token("leases:revoke", subject="incident-response")),
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] == 4
    for lease in leaked[:3]:
        assert not twilio_works(providers, lease["fields"])
    assert not openai_works(providers, leaked[3]["fields"])
    for lease in spared:
        assert twilio_works(providers, lease["fields"])
    audit = dyn.get(
        "/v1/leases",
        params={"subject": "leaky-worker", "state": "revoked"},
        headers=bearer(token("audit:read", subject="sec")),
    ).json()
    assert {item["tenant_id"] for item in audit} >= set(tenants)
    assert {item["revoked_by"] for item in audit} == {"user:incident-response"}


def test_bad_revocation_requests_are_refused_without_echo(dyn: TestClient) -> None:
    tenant = make_tenant(dyn)
    pasted = "sk-admin-" + "Z" * 30
    for body in ({"lease_id": pasted}, {"subject": pasted + " x"}, {"provider": "stripe"}):
        response = dyn.post("/v1/tenants/settings/leases/revoke", json=body, headers=admin(tenant))
        assert response.status_code == 422
        assert pasted not in response.text
    empty = dyn.post(
        "/v1/leases/revoke", json={}, headers=bearer(token("platform:admin", subject="ops"))
    )
    assert empty.status_code == 422


def test_a_lease_revoked_while_its_key_is_being_minted_does_not_keep_the_key(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    fired: list[leases.Revocations] = []
    started: list[bool] = []

    def incident(provider: str) -> None:
        # The tenant's incident response lands between the registration and the mint's
        # answer: nothing is minted yet, so the revoker finds no key by the lease's name.
        if provider == "twilio" and not started:
            started.append(True)
            fired.append(
                leases.revoke_matching(
                    leasing(dyn),
                    leases.Selector(tenant_id=tenant),
                    principal=leases.WORKER,
                    reason="requested",
                )
            )

    providers.on_request = incident
    refused = dyn.get(f"/v1/credentials/{tenant}/twilio", headers=service(tenant))
    providers.on_request = None
    assert providers.hook_errors == []
    assert fired[0].revoked == 1
    assert refused.status_code == 404
    (lease,) = dyn.get("/v1/tenants/settings/leases", headers=admin(tenant)).json()
    assert lease["state"] == "revoked"
    assert lease["provider_key_id"] is not None
    assert providers.keys.deleted[lease["provider_key_id"]] == 1
    assert not any(
        k.friendly_name.endswith(lease["id"]) for k in providers.keys.twilio_keys(ACCOUNT)
    )


def test_moving_to_another_twilio_account_still_revokes_the_old_accounts_keys(
    dyn: TestClient, providers: FakeProviders, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    old = fetch(dyn, tenant)
    other = {"account_sid": "AC" + "b" * 32, "auth_token": "c" * 32}
    providers.accept("twilio", **other)
    moved = dyn.put(
        "/v1/tenants/settings/integrations/twilio", json={"fields": other}, headers=admin(tenant)
    )
    assert moved.status_code == 200, moved.text
    leases.revoke_due(leasing(dyn))
    # Deleted in the old account, with the root version that minted it.
    assert not twilio_works(providers, old["fields"])
    assert providers.keys.deleted[old["fields"]["api_key_sid"]] == 1
    assert row(engine, old["lease_id"]).state == "revoked"
    new = fetch(dyn, tenant)
    assert new["fields"]["account_sid"] == other["account_sid"]
    assert twilio_works(providers, new["fields"])


def test_a_sweep_stops_calling_a_provider_that_keeps_failing(
    dyn: TestClient, providers: FakeProviders, clock: FakeClock, engine: Engine
) -> None:
    tenant = dynamic_tenant(dyn)
    issued = [fetch(dyn, tenant, subject=f"breaker-{n}") for n in range(20)]
    providers.go_down("twilio")
    leases.revoke_matching(
        leasing(dyn),
        leases.Selector(tenant_id=tenant),
        principal=leases.WORKER,
        reason="x",
        inline=0,
    )
    before = providers.hits["twilio"]
    swept = leases.revoke_due(leasing(dyn))
    # A few failures open the breaker; the rest wait for the next run untouched.
    assert leases.BREAKER_FAILURES <= swept.failed < 10
    assert swept.queued >= 10
    assert providers.hits["twilio"] - before == swept.failed
    providers.come_back("twilio")
    clock.advance(3600)
    leases.revoke_due(leasing(dyn))
    for lease in issued:
        assert row(engine, lease["lease_id"]).state == "revoked"
