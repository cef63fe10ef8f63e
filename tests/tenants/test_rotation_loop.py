"""Key rotation's Vault requests on the event loop, and what happens when one gets no answer.

The rotation makes each request once on the loop; an attempt that gets no definite
answer goes on to the threaded `call`, which retries it. A check-and-set write may
have landed although its answer was lost: the retry then checks what Vault holds
instead of reporting a conflict with itself. Real faults only: the write is held
back by `SlowProxy` in front of a real OpenBao.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.core.errors import Conflict
from broker.tenants import keys
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import FakeProviders
from tests.support.apps import VaultEndpoint
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.tenants.test_keys import OPERATOR, OPS
from tests.tenants.test_rotation_batches import _assert_rotated, _tenant


def test_a_write_retried_after_an_attempt_that_may_have_landed_finds_its_own_version(
    client: TestClient, broker_vault: VaultGateway
) -> None:
    path = f"tenants/{make_tenant(client)}/payout"
    data = {"ciphertext": "vault:v1:abc", "public": {"hint": "1234"}}
    # The attempt whose answer was lost: it created version 1.
    assert broker_vault.kv.write(path, data, cas=0) == 1
    # Retried as one that may have landed: version 1 holds exactly this data, so it is ours.
    assert broker_vault.kv.write(path, data, cas=0, tried=True) == 1
    # Other data at that version is another write's: a real conflict.
    other = {"ciphertext": "vault:v1:xyz", "public": {"hint": "1234"}}
    with pytest.raises(Conflict):
        broker_vault.kv.write(path, other, cas=0, tried=True)
    # A write not retried never claims a version it did not get.
    with pytest.raises(Conflict):
        broker_vault.kv.write(path, data, cas=0)


def test_a_rotation_write_held_past_the_loops_timeout_is_retried_and_settles(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    broker_vault_token: str,
    providers: FakeProviders,
    vault_proxy: SlowProxy,
) -> None:
    tenant = _tenant(client, providers, "twilio", "openai")
    # Only the first write of the tenant's Twilio item is held past the timeout: the
    # attempt on the loop. It still reaches Vault; the threaded retry goes through.
    vault_proxy.delay(
        f"POST /v1/secret/data/tenants/{tenant}/integrations/twilio".encode(), 1.5, once=True
    )
    patient = VaultGateway(
        addrs=[vault_proxy.addr], token=broker_vault_token, timeout_s=1.0, retry_budget_s=10.0
    )
    failed_writes: list[str | None] = []

    def observe(operation: str, node: str, seconds: float, error: str | None) -> None:
        if operation == "write a secret" and error is not None:
            failed_writes.append(error)

    patient.observe = observe
    try:
        (report,) = keys.rotate_all(
            engine, patient, principal=OPERATOR, tenant_ids=[tenant], workers=2
        )
    finally:
        patient.close()
    assert failed_writes  # the held attempt timed out
    # Whichever landed first, the item was rewritten once by the rotation: no conflict
    # with itself, nothing failed, every row settled on what Vault holds.
    assert (report.key_version, report.rewrapped, report.failed) == (2, 3, ())
    _assert_rotated(engine, vault_admin, broker_vault, tenant, 2)


def test_every_vault_request_of_a_rotation_through_the_api_names_the_caller(
    client: TestClient, vault_endpoint: VaultEndpoint, providers: FakeProviders
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    tenant = _tenant(client, providers, "twilio")
    response = client.post(f"/v1/tenants/{tenant}/keys/rotate", headers=OPS)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    requests = [
        entry
        for entry in map(json.loads, vault_endpoint.audit_log.read_text().splitlines())
        if entry["type"] == "request" and request_id in json.dumps(entry)
    ]
    # The key rotation (in a worker thread) and the rewrap (on the loop) alike.
    assert {e["request"]["path"] for e in requests} >= {
        f"transit/keys/tenant-{tenant}/rotate",
        f"secret/metadata/tenants/{tenant}/",
        f"secret/data/tenants/{tenant}/integrations/twilio",
        f"secret/data/tenants/{tenant}/payout",
        f"transit/rewrap/tenant-{tenant}",
        f"transit/keys/tenant-{tenant}/config",
    }
    for entry in requests:
        assert entry["request"]["headers"]["x-broker-actor"] == ["user:ops"]
