"""Vault writes whose answer never comes, time budgets, own-write answers, sealed identifiers.

Real faults only: the broker under test talks to the session's real OpenBao
through `SlowProxy`, a loopback proxy that holds chosen requests back. A KV
write held past the broker's timeout reaches Vault after the broker gave up on
it, and lands: the outcome the broker could not know when it answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import app_through
from tests.support.rows import credential_row, payout_row
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

KV_WRITE = b"POST /v1/secret/data/"
KV_DELETE = b"POST /v1/secret/delete/"
FIRST = dict(VALID["twilio"])
SECOND = FIRST | {"auth_token": "e" * 32}
THIRD = FIRST | {"auth_token": "f" * 32}
IBAN = "DE89370400440532013000"
OTHER_IBAN = "GB82WEST12345698765432"


@pytest.fixture
def through_proxy(
    vault_proxy: SlowProxy,
    broker_vault_token: str,
    database_url: str,
    engine: Engine,
    providers: FakeProviders,
) -> Callable[[float, float], TestClient]:
    """Brokers whose Vault calls go through the proxy, given a timeout and a budget (s)."""

    def build(timeout_s: float, budget_s: float) -> TestClient:
        return app_through(
            vault_proxy.addr,
            broker_vault_token,
            database_url,
            engine,
            providers,
            vault_timeout_s=timeout_s,
            vault_retry_budget_s=budget_s,
        )

    return build


@pytest.fixture
def slow(through_proxy: Callable[[float, float], TestClient]) -> TestClient:
    """The broker, through the proxy, with a 1 s timeout and a 1.5 s budget per request."""
    return through_proxy(1.0, 1.5)


@pytest.fixture
def patient(through_proxy: Callable[[float, float], TestClient]) -> TestClient:
    """The broker, through the proxy, patient enough for a whole tenant deletion to run
    while one of its Vault calls is held."""
    return through_proxy(8.0, 9.0)


def _admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def _ops() -> dict[str, str]:
    return bearer(token("platform:admin", subject="ops"))


def _answer_with_tenant_deleted_meanwhile(
    client: TestClient, tenant: str, call: Callable[[], Any], held_s: float
) -> Any:
    """Run `call` (whose Vault request the proxy holds), delete the tenant after `held_s`,
    and return the call's answer."""
    answers: list[Any] = []
    running = threading.Thread(target=lambda: answers.append(call()))
    running.start()
    time.sleep(held_s)
    assert client.delete(f"/v1/tenants/{tenant}", headers=_ops()).status_code == 204
    running.join(15)
    (answer,) = answers
    return answer


def _audit_details(engine: Engine, tenant: str, action: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT detail FROM audit_events WHERE tenant_id = :t"
                    " AND action = :action ORDER BY id"
                ),
                {"t": tenant, "action": action},
            ).all()
        )


def _put(client: TestClient, tenant: str, fields: dict[str, str], **headers: str) -> Any:
    return client.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": fields},
        headers=_admin(tenant) | headers,
    )


def _listed(client: TestClient, tenant: str) -> dict[str, Any]:
    items = client.get("/v1/tenants/settings/integrations", headers=_admin(tenant)).json()
    return next(i for i in items if i["provider"] == "twilio")


def _wait_for_version(vault: VaultGateway, path: str, version: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        meta = vault.kv.metadata(path)
        if meta is not None and int(meta["current_version"]) >= version:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached version {version}")


def _current_version(vault: VaultGateway, path: str) -> int:
    meta = vault.kv.metadata(path)
    return int(meta["current_version"]) if meta else 0


# -- A: a write Vault applies after the broker gave up -----------------------------------


@pytest.fixture
def saved(client: TestClient, slow: TestClient, providers: FakeProviders) -> str:
    """A tenant with Twilio's FIRST credentials saved through the slow broker; the fake
    Twilio accepts SECOND and THIRD too."""
    tenant = make_tenant(client)
    providers.accept("twilio", **SECOND)
    providers.accept("twilio", **THIRD)
    assert _put(slow, tenant, FIRST).status_code == 200
    return tenant


def test_a_write_that_lands_after_its_503_keeps_the_row_pending_until_vault_shows_it(
    saved: str, slow: TestClient, vault_proxy: SlowProxy, engine: Engine, vault_admin: VaultGateway
) -> None:
    tenant, path = saved, f"tenants/{saved}/integrations/twilio"

    vault_proxy.delay(KV_WRITE, 3.0)
    response = _put(slow, tenant, SECOND)
    vault_proxy.clear()
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["title"] == "Vault write not confirmed"
    assert "e" * 32 not in response.text
    # The outcome is unknown: the row must not claim version 1 is settled.
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.vault_sync_pending) == (1, True)

    _wait_for_version(vault_admin, path, 2)  # ...and there it lands
    listed = _listed(slow, tenant)
    assert (listed["version"], listed["sync_pending"]) == (2, False)
    assert listed["hints"]["auth_token"].endswith("eeee")

    # The client retries the same request with its old ETag: it succeeds, and
    # nothing is written twice.
    again = _put(slow, tenant, SECOND, **{"If-Match": '"1"'})
    assert again.status_code == 200, again.text
    assert again.headers["etag"] == '"2"'
    assert _current_version(vault_admin, path) == 2
    saves = _audit_details(engine, tenant, "integration.save")
    # The version the lost attempt wrote is in the trail, once, as already applied.
    assert [d.detail.get("already_applied", False) for d in saves] == [False, True]
    # The next, different write is no false conflict.
    third = _put(slow, tenant, THIRD)
    assert third.status_code == 200, third.text
    assert third.json()["version"] == 3


def test_a_retry_that_arrives_first_wins_and_the_lost_write_can_never_land(
    saved: str, slow: TestClient, vault_proxy: SlowProxy, engine: Engine, vault_admin: VaultGateway
) -> None:
    tenant, path = saved, f"tenants/{saved}/integrations/twilio"

    vault_proxy.delay(KV_WRITE, 4.0)
    assert _put(slow, tenant, SECOND).status_code == 503
    vault_proxy.clear()
    retried = _put(slow, tenant, SECOND)  # before the held write reaches Vault
    assert retried.status_code == 200, retried.text
    assert retried.json()["version"] == 2
    time.sleep(4.5)  # the held attempts reach Vault now, and fail check-and-set
    assert _current_version(vault_admin, path) == 2
    row = credential_row(engine, tenant)
    assert (row.kv_version, row.vault_sync_pending) == (2, False)


def _wait_for_deletion(vault: VaultGateway, path: str, version: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        meta = vault.kv.metadata(path)
        if meta is not None and meta["versions"][str(version)]["deletion_time"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} version {version} was never deleted")


def test_a_retried_delete_after_an_unanswered_one_succeeds(
    saved: str, slow: TestClient, vault_proxy: SlowProxy, engine: Engine, vault_admin: VaultGateway
) -> None:
    tenant, path = saved, f"tenants/{saved}/integrations/twilio"
    url = "/v1/tenants/settings/integrations/twilio"

    vault_proxy.delay(KV_DELETE, 3.0)
    response = slow.delete(url, headers=_admin(tenant))
    vault_proxy.clear()
    assert response.status_code == 503
    assert response.json()["title"] == "Vault write not confirmed"
    assert credential_row(engine, tenant).vault_sync_pending is True
    _wait_for_deletion(vault_admin, path, 1)  # ...and there it lands

    # The same DELETE again, as sent or with the ETag it was based on: its work is done.
    assert slow.delete(url, headers=_admin(tenant)).status_code == 204
    assert slow.delete(url, headers=_admin(tenant) | {"If-Match": '"1"'}).status_code == 204
    assert slow.delete(url, headers=_admin(tenant) | {"If-Match": '"7"'}).status_code == 404
    row = credential_row(engine, tenant)
    assert (row.configured, row.vault_sync_pending) == (False, False)
    deletes = _audit_details(engine, tenant, "integration.delete")
    # The deletion the lost attempt made is in the trail, as already applied.
    assert [d.detail.get("already_applied") for d in deletes] == [True, True]
    # Never configured at all is still a 404.
    never = slow.delete("/v1/tenants/settings/integrations/openai", headers=_admin(tenant))
    assert never.status_code == 404


def test_a_delete_whose_tenant_is_deleted_meanwhile_is_404(
    client: TestClient, vault_proxy: SlowProxy, patient: TestClient
) -> None:
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    vault_proxy.delay(KV_DELETE, 3.0)
    answer = _answer_with_tenant_deleted_meanwhile(
        client,
        tenant,
        lambda: patient.delete("/v1/tenants/settings/integrations/twilio", headers=_admin(tenant)),
        # By then the credential delete has marked its row and is waiting on Vault.
        held_s=0.5,
    )
    # Its row went with the tenant: the answer says so, instead of failing.
    assert answer.status_code == 404, answer.text
    assert answer.json()["detail"] == "no such tenant"


@pytest.mark.parametrize("item", ["integrations/twilio", "payout"])
def test_a_first_write_that_lands_after_its_tenant_was_shredded_is_destroyed(
    client: TestClient,
    vault_proxy: SlowProxy,
    patient: TestClient,
    vault_admin: VaultGateway,
    item: str,
) -> None:
    tenant = make_tenant(client)
    vault_proxy.delay(KV_WRITE, 3.0)

    def write() -> Any:
        if item == "payout":
            return _payout(patient, tenant, IBAN)
        return _put(patient, tenant, FIRST)

    # By then the write is held on its way to Vault.
    answer = _answer_with_tenant_deleted_meanwhile(client, tenant, write, held_s=1.0)
    assert answer.status_code == 404, answer.text
    # Nothing of the tenant outlives its deletion, not even what landed after it.
    assert vault_admin.kv.metadata(f"tenants/{tenant}/{item}") is None


def test_the_retry_budget_bounds_the_whole_request_against_a_hung_vault(
    client: TestClient,
    vault_proxy: SlowProxy,
    through_proxy: Callable[[float, float], TestClient],
) -> None:
    """Each Vault call used to get the whole budget and each attempt the whole timeout."""
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    # A 3 s socket timeout, but a 1 s budget for the whole request.
    hung = through_proxy(3.0, 1.0)
    vault_proxy.delay(b"", 20.0)
    service = bearer(token("credentials:read", kind="service", tenants=(tenant,)))
    for method, url, body, headers in (
        ("GET", f"/v1/credentials/{tenant}/twilio", None, service),
        (
            "PUT",
            "/v1/tenants/settings/integrations/twilio",
            {"fields": SECOND, "skip_connection_test": True},
            _admin(tenant),
        ),
    ):
        started = time.monotonic()
        response = hung.request(method, url, json=body, headers=headers)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (method, response.text)
        assert "retry-after" in response.headers
        # Under one socket timeout: no single attempt, let alone a second call, ran long.
        assert elapsed < 3.0, (method, elapsed)


# -- A: payout details -----------------------------------------------------------------


def _payout(client: TestClient, tenant: str, iban: str, **headers: str) -> Any:
    return client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "Acme Ltd"}},
        headers=bearer(token("finance:manage", "finance:view", tenant_id=tenant)) | headers,
    )


def test_an_unanswered_payout_write_stays_pending_and_its_retry_succeeds(
    client: TestClient,
    slow: TestClient,
    vault_proxy: SlowProxy,
    engine: Engine,
    vault_admin: VaultGateway,
) -> None:
    tenant = make_tenant(client)
    assert _payout(slow, tenant, IBAN).status_code == 200
    vault_proxy.delay(KV_WRITE, 3.0)
    response = _payout(slow, tenant, OTHER_IBAN)
    vault_proxy.clear()
    assert response.status_code == 503
    assert OTHER_IBAN not in response.text
    assert (
        payout_row(engine, tenant).payout_sync_pending,
        payout_row(engine, tenant).payout_version,
    ) == (True, 1)
    _wait_for_version(vault_admin, f"tenants/{tenant}/payout", 2)
    again = _payout(slow, tenant, OTHER_IBAN)
    assert again.status_code == 200, again.text
    assert again.json()["hint"].endswith("5432")
    assert _current_version(vault_admin, f"tenants/{tenant}/payout") == 2
    row = payout_row(engine, tenant)
    assert (row.payout_version, row.payout_sync_pending) == (2, False)


def test_the_first_payout_write_after_a_key_rotation_is_not_a_conflict(
    client: TestClient,
) -> None:
    tenant = make_tenant(client)
    assert _payout(client, tenant, IBAN).status_code == 200
    ops = _ops()
    assert client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=ops).status_code == 200
    response = _payout(client, tenant, OTHER_IBAN)
    assert response.status_code == 200, response.text


# -- C: each answer describes the caller's own write ------------------------------------


def test_concurrent_saves_each_answer_with_their_own_version_and_etag(
    client: TestClient, providers: FakeProviders, vault_admin: VaultGateway
) -> None:
    tenant = make_tenant(client)
    writers = 8
    barrier = threading.Barrier(writers)
    answers: dict[str, Any] = {}

    def save(n: int) -> None:
        mine = FIRST | {"auth_token": f"{n:x}" * 32}
        barrier.wait()
        response = client.put(
            "/v1/tenants/settings/integrations/twilio",
            json={"fields": mine, "skip_connection_test": True},
            headers=_admin(tenant),
        )
        answers[mine["auth_token"]] = response

    threads = [threading.Thread(target=save, args=(n,)) for n in range(1, writers + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    path = f"tenants/{tenant}/integrations/twilio"
    accepted = {secret: r for secret, r in answers.items() if r.status_code == 200}
    assert accepted
    assert all(r.status_code in (200, 409) for r in answers.values())
    for secret, response in accepted.items():
        version = response.json()["version"]
        assert response.headers["etag"] == f'"{version}"'
        assert response.json()["hints"]["auth_token"].endswith(secret[-4:])
        stored = vault_admin.kv.read(path, version=version)
        assert stored is not None
        assert stored.data["public"]["hints"]["auth_token"].endswith(secret[-4:])


# -- G: identifiers are sealed with the secret --------------------------------------------


def _swap_store_url(vault_admin: VaultGateway, tenant: str) -> None:
    """Point the stored WooCommerce public part at an attacker, in KV only (no Transit)."""
    path = f"tenants/{tenant}/integrations/woocommerce"
    entry = vault_admin.kv.read(path)
    assert entry is not None
    forged = dict(entry.data)
    forged["public"] = dict(entry.data["public"])
    forged["public"]["identifiers"] = {"store_url": "https://attacker.example.net"}
    vault_admin.kv.write(path, forged, cas=entry.version)


def _service(tenant: str) -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=(tenant,)))


def test_an_identifier_changed_in_kv_without_transit_does_not_verify(
    client: TestClient, providers: FakeProviders, vault_admin: VaultGateway, engine: Engine
) -> None:
    tenant = make_tenant(client)
    fields = dict(VALID["woocommerce"], store_url=providers.base_url)
    saved = client.put(
        "/v1/tenants/settings/integrations/woocommerce",
        json={"fields": fields},
        headers=_admin(tenant),
    )
    assert saved.status_code == 200, saved.text
    # Someone with KV write access but no Transit swaps the store URL.
    _swap_store_url(vault_admin, tenant)

    response = client.get(f"/v1/credentials/{tenant}/woocommerce", headers=_service(tenant))
    assert response.status_code == 409
    assert response.json()["title"] == "Stored data does not verify"
    assert fields["consumer_secret"] not in response.text
    assert "attacker" not in response.text
    with engine.connect() as conn:
        outcomes = conn.execute(
            text(
                "SELECT outcome, detail FROM audit_events WHERE tenant_id = :t"
                " AND action = 'credentials.fetch'"
            ),
            {"t": tenant},
        ).all()
    assert any(o.outcome == "failed" and o.detail.get("reason") == "unverified" for o in outcomes)


def test_a_ciphertext_from_before_sealed_identifiers_does_not_verify(
    client: TestClient, providers: FakeProviders, vault_admin: VaultGateway
) -> None:
    """A bare secrets document (no sealed public part) is refused, not trusted."""
    import base64
    import json

    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    path = f"tenants/{tenant}/integrations/twilio"
    entry = vault_admin.kv.read(path)
    assert entry is not None
    bare = vault_admin.transit.encrypt(
        f"tenant-{tenant}",
        json.dumps({"auth_token": "a" * 32}).encode(),
        context=f"{tenant}/twilio",
    )
    assert base64  # the context is base64-encoded by the gateway itself
    vault_admin.kv.write(path, {**entry.data, "ciphertext": bare}, cas=entry.version)
    response = client.get(f"/v1/credentials/{tenant}/twilio", headers=_service(tenant))
    assert response.status_code == 409
    assert "a" * 32 not in response.text


# -- H: restoring a version a rotation retired -------------------------------------------


def test_restoring_a_version_from_before_a_key_rotation_is_410(client: TestClient) -> None:
    tenant = make_tenant(client)
    assert _put(client, tenant, FIRST).status_code == 200
    ops = _ops()
    assert client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=ops).status_code == 200
    response = client.post(
        "/v1/tenants/settings/integrations/twilio/versions/1/restore", headers=_admin(tenant)
    )
    assert response.status_code == 410, response.text
    assert "rotation" in response.json()["detail"]


# -- A: key rotation --------------------------------------------------------------------


@pytest.mark.parametrize("item", ["integrations/twilio", "payout"])
def test_a_rotation_whose_rewrap_goes_unanswered_leaves_no_false_conflict(
    client: TestClient,
    slow: TestClient,
    vault_proxy: SlowProxy,
    providers: FakeProviders,
    engine: Engine,
    vault_admin: VaultGateway,
    item: str,
) -> None:
    tenant = make_tenant(client)
    providers.accept("twilio", **SECOND)
    if item == "payout":
        assert _payout(client, tenant, IBAN).status_code == 200
    else:
        assert _put(client, tenant, FIRST).status_code == 200
    ops = _ops()

    vault_proxy.delay(KV_WRITE, 3.0)
    response = slow.post(f"/v1/tenants/{tenant}/keys/rotate", headers=ops)
    vault_proxy.clear()
    assert response.status_code == 503, response.text
    _wait_for_version(vault_admin, f"tenants/{tenant}/{item}", 2)  # the rewrap lands

    # The version only the rotation wrote is no reason to refuse the next write.
    if item == "payout":
        again = _payout(client, tenant, OTHER_IBAN)
        assert again.status_code == 200, again.text
        assert again.json()["hint"].endswith("5432")
    else:
        again = _put(client, tenant, SECOND)
        assert again.status_code == 200, again.text
        assert again.json()["version"] == 3
    # The rotation sent again finishes what it began.
    finished = client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=ops)
    assert finished.status_code == 200, finished.text
    assert finished.json()["resumed"] is True
    if item == "payout":
        assert payout_row(engine, tenant).payout_sync_pending is False
    else:
        assert credential_row(engine, tenant).vault_sync_pending is False


def _failed_reads(engine: Engine, tenant: str) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT action, detail FROM audit_events WHERE tenant_id = :t"
                " AND outcome = 'failed' ORDER BY id"
            ),
            {"t": tenant},
        ).all()
    return [(r.action, r.detail.get("reason")) for r in rows]


def test_every_read_of_stored_data_that_does_not_verify_is_refused_and_recorded(
    client: TestClient, providers: FakeProviders, vault_admin: VaultGateway, engine: Engine
) -> None:
    """Not only a service's fetch: an admin's test of the stored credentials, a restore, a
    health check and a change of delivery."""
    tenant = make_tenant(client)
    fields = dict(VALID["woocommerce"], store_url=providers.base_url)
    url = "/v1/tenants/settings/integrations/woocommerce"
    assert client.put(url, json={"fields": fields}, headers=_admin(tenant)).status_code == 200
    _swap_store_url(vault_admin, tenant)

    tested = client.post(f"{url}/test", headers=_admin(tenant))
    restored = client.post(f"{url}/versions/2/restore", headers=_admin(tenant))
    checked = client.post(f"{url}/health/check", headers=_admin(tenant))
    delivery = client.put(f"{url}/delivery", json={"mode": "static"}, headers=_admin(tenant))
    for response in (tested, restored, checked, delivery):
        assert response.status_code == 409, response.text
        assert response.json()["title"] == "Stored data does not verify"
        assert "attacker" not in response.text
    assert _failed_reads(engine, tenant) == [
        ("integration.test", "unverified"),
        ("integration.restore", "unverified"),
        ("integration.health_check", "unverified"),
        ("integration.delivery", "unverified"),
    ]


def test_a_row_rebuilt_from_vault_never_adopts_hints_that_do_not_verify(
    client: TestClient, providers: FakeProviders, vault_admin: VaultGateway, engine: Engine
) -> None:
    """A pending row is rebuilt from KV's public part only once it verifies against the seal."""
    mine, other = make_tenant(client), make_tenant(client)
    url = "/v1/tenants/settings/integrations/woocommerce"
    for tenant, key in ((mine, "ck_" + "1" * 40), (other, "ck_" + "2" * 40)):
        fields = dict(VALID["woocommerce"], store_url=providers.base_url, consumer_key=key)
        providers.accept("woocommerce", **fields)
        saved = client.put(url, json={"fields": fields}, headers=_admin(tenant))
        assert saved.status_code == 200, saved.text
    path = f"tenants/{mine}/integrations/woocommerce"
    entry = vault_admin.kv.read(path)
    theirs = vault_admin.kv.read(f"tenants/{other}/integrations/woocommerce")
    assert entry is not None
    assert theirs is not None
    # A write interrupted after T1 left the row pending, and KV now shows a version whose
    # public part (another tenant's hints and identifiers) is not the one sealed inside it.
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE integration_credentials"
                " SET vault_sync_pending = true, pending_since = now()"
                " WHERE tenant_id = :t AND provider = 'woocommerce'"
            ),
            {"t": mine},
        )
    vault_admin.kv.write(path, {**entry.data, "public": theirs.data["public"]}, cas=entry.version)

    for _ in range(2):  # every reader tries the rebuild again
        answer = client.get("/v1/tenants/settings/integrations", headers=_admin(mine))
        assert answer.status_code == 200, answer.text
        listed = next(i for i in answer.json() if i["provider"] == "woocommerce")
        assert listed["hints"]["consumer_key"].endswith("1111")
        assert (listed["version"], listed["sync_pending"]) == (1, True)
    # The refusal is in the trail, once for that KV version.
    assert _failed_reads(engine, mine) == [("integration.reconcile", "unverified")]
    fetched = client.get(f"/v1/credentials/{mine}/woocommerce", headers=_service(mine))
    assert fetched.status_code == 409, fetched.text
    assert _failed_reads(engine, mine)[-1] == ("credentials.fetch", "unverified")
