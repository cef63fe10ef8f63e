"""The Vault gateway against a real OpenBao: auth, audited headers, retries, error mapping."""

from __future__ import annotations

import json
import uuid

import pytest

from broker.core import context
from broker.core.errors import Conflict
from broker.devstack.openbao import OpenBaoServer, free_port
from broker.vault.bootstrap import bootstrap, issue_broker_credentials
from broker.vault.errors import CiphertextRejected, VaultMisconfigured, VaultUnavailable
from broker.vault.gateway import VaultGateway
from tests.support.apps import VaultEndpoint


def _path() -> str:
    return f"tenants/gw-{uuid.uuid4().hex[:10]}/integrations/shopify"


def test_kv_check_and_set_and_versions(broker_vault: VaultGateway) -> None:
    path = _path()
    assert broker_vault.kv.read(path) is None
    assert broker_vault.kv.write(path, {"ciphertext": "one"}, cas=0) == 1
    with pytest.raises(Conflict):
        broker_vault.kv.write(path, {"ciphertext": "again"}, cas=0)
    assert broker_vault.kv.write(path, {"ciphertext": "two"}, cas=1) == 2
    with pytest.raises(Conflict):
        broker_vault.kv.write(path, {"ciphertext": "stale"}, cas=1)
    latest = broker_vault.kv.read(path)
    assert latest is not None
    assert (latest.version, latest.data) == (2, {"ciphertext": "two"})
    first = broker_vault.kv.read(path, version=1)
    assert first is not None
    assert first.data == {"ciphertext": "one"}


def test_transit_binds_ciphertext_to_its_context(broker_vault: VaultGateway) -> None:
    key = f"tenant-gw-{uuid.uuid4().hex[:10]}"
    assert broker_vault.transit.ensure_key(key) is True
    assert broker_vault.transit.ensure_key(key) is False
    ciphertext = broker_vault.transit.encrypt(key, b"s3cret", context="t1/shopify")
    assert ciphertext.startswith("vault:v1:")
    assert broker_vault.transit.decrypt(key, ciphertext, context="t1/shopify") == b"s3cret"
    with pytest.raises(CiphertextRejected):
        broker_vault.transit.decrypt(key, ciphertext, context="t1/twilio")


def test_broker_policy_cannot_touch_other_paths(broker_vault: VaultGateway) -> None:
    with pytest.raises(VaultMisconfigured):
        broker_vault.call("list mounts", lambda c: c.adapter.get("/v1/sys/mounts"))


def test_audited_headers_name_the_caller_in_the_vault_audit_log(
    broker_vault: VaultGateway, vault_endpoint: VaultEndpoint
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    request_id = f"req-{uuid.uuid4().hex}"
    context.bind(
        context.RequestContext(
            request_id=request_id, actor="user:auditee", tenant_id="t-aud", action="test.read"
        )
    )
    try:
        broker_vault.kv.read(_path())
    finally:
        context.bind(context.RequestContext(request_id="none"))
    entries = [
        json.loads(line)
        for line in vault_endpoint.audit_log.read_text().splitlines()
        if request_id in line
    ]
    assert entries, "the request id never reached the audit log"
    headers = entries[0]["request"]["headers"]
    assert headers["x-request-id"] == [request_id]
    assert headers["x-broker-actor"] == ["user:auditee"]
    assert headers["x-broker-tenant"] == ["t-aud"]
    assert headers["x-broker-action"] == ["test.read"]


def test_approle_login(vault_admin: VaultGateway, vault_endpoint: VaultEndpoint) -> None:
    role_id, secret_id = issue_broker_credentials(vault_admin)
    gateway = VaultGateway(addrs=[vault_endpoint.addr], role_id=role_id, secret_id=secret_id)
    try:
        path = _path()
        gateway.kv.write(path, {"ciphertext": "x"}, cas=0)
        assert gateway.kv.read(path) is not None
    finally:
        gateway.close()


def test_a_revoked_approle_token_is_replaced_by_one_more_login(
    vault_admin: VaultGateway, vault_endpoint: VaultEndpoint
) -> None:
    role_id, secret_id = issue_broker_credentials(vault_admin)
    gateway = VaultGateway(addrs=[vault_endpoint.addr], role_id=role_id, secret_id=secret_id)
    try:
        path = _path()
        gateway.kv.write(path, {"ciphertext": "x"}, cas=0)
        revoked = gateway._raw().token
        vault_admin._raw().adapter.post("/v1/auth/token/revoke", json={"token": revoked})
        # Vault answers 403 to the revoked token; the gateway logs in once more and retries.
        entry = gateway.kv.read(path)
        assert entry is not None
        assert entry.data == {"ciphertext": "x"}
        assert gateway._raw().token != revoked
    finally:
        gateway.close()


def test_bad_approle_secret_is_refused(
    vault_admin: VaultGateway, vault_endpoint: VaultEndpoint
) -> None:
    role_id, _ = issue_broker_credentials(vault_admin)
    gateway = VaultGateway(addrs=[vault_endpoint.addr], role_id=role_id, secret_id="wrong")
    try:
        with pytest.raises((VaultMisconfigured, VaultUnavailable)):
            gateway.kv.read(_path())
    finally:
        gateway.close()


def test_a_dead_first_address_falls_over_to_the_next(
    vault_endpoint: VaultEndpoint, broker_vault_token: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = VaultGateway(addrs=[dead, vault_endpoint.addr], token=broker_vault_token)
    try:
        assert gateway.kv.read(_path()) is None
        assert gateway.address == vault_endpoint.addr
        assert gateway.health().ready
    finally:
        gateway.close()


def test_sealed_and_dead_vault_become_unavailable_with_retry_after(own_bao: OpenBaoServer) -> None:
    gateway = VaultGateway(addrs=[own_bao.addr], token=own_bao.root_token, retry_after_s=7)
    try:
        own_bao.seal()
        with pytest.raises(VaultUnavailable) as sealed:
            gateway.kv.read(_path())
        assert sealed.value.retry_after == 7
        assert sealed.value.status == 503
        own_bao.kill()
        with pytest.raises(VaultUnavailable):
            gateway.kv.read(_path())
        assert not gateway.health().reachable
    finally:
        gateway.close()


def test_bootstrap_is_idempotent(own_bao: OpenBaoServer) -> None:
    admin = VaultGateway(addrs=[own_bao.addr], token=own_bao.root_token)
    try:
        again = bootstrap(admin)
        assert again.changed == []
        assert "policy broker" in again.unchanged
    finally:
        admin.close()


def test_bootstrap_reports_that_openbao_refuses_api_audit_devices(own_bao: OpenBaoServer) -> None:
    admin = VaultGateway(addrs=[own_bao.addr], token=own_bao.root_token)
    try:
        report = bootstrap(admin, audit_file_path=str(own_bao.audit_log_path) + ".second")
    finally:
        admin.close()
    assert any("config file" in warning for warning in report.warnings)
    assert report.changed == []
