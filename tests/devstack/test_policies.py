"""The ACL policies in policies/*.hcl, checked with real requests against a real OpenBao.

Tokens are created with ``no_default_policy=True`` so that each token has exactly the rules of
its policy file (the built-in "default" policy would add e.g. sys/wrapping/* and cubbyhole/*).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker.devstack.openbao import OpenBaoServer

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
POLICIES = ("broker", "service-reader", "security-auditor")
SHOPIFY = "/secret/data/tenants/t1/integrations/shopify"
STRIPE = "/secret/data/platform/stripe"


@dataclass
class Clients:
    root: httpx.Client
    broker: httpx.Client
    reader: httpx.Client
    auditor: httpx.Client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def client(bao: OpenBaoServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=f"{bao.addr}/v1", headers={"X-Vault-Token": token}, timeout=10)


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code in (200, 204), f"{response.request.url}: {response.text}"
    return response


def denied(response: httpx.Response) -> None:
    assert response.status_code == 403, f"{response.request.url}: {response.status_code}"
    assert "permission denied" in response.text


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    with OpenBaoServer(tmp_path_factory.mktemp("bao-policies")) as bao:
        root = client(bao, bao.root_token)
        ok(root.post("/sys/mounts/secret", json={"type": "kv", "options": {"version": "2"}}))
        ok(root.post("/sys/mounts/transit", json={"type": "transit"}))
        ok(root.post(STRIPE, json={"data": {"api_key": "sk_test_platform"}}))
        ok(root.post("/secret/data/other", json={"data": {"x": "y"}}))
        ok(root.post("/transit/keys/platform"))
        tokens = {}
        for name in POLICIES:
            policy = (POLICY_DIR / f"{name}.hcl").read_text()
            ok(root.put(f"/sys/policies/acl/{name}", json={"policy": policy}))
            created = ok(
                root.post(
                    "/auth/token/create",
                    json={"policies": [name], "no_default_policy": True, "ttl": "1h"},
                )
            )
            tokens[name] = created.json()["auth"]["client_token"]
        c = Clients(
            root=root,
            broker=client(bao, tokens["broker"]),
            reader=client(bao, tokens["service-reader"]),
            auditor=client(bao, tokens["security-auditor"]),
        )
        try:
            yield c
        finally:
            for http in (c.root, c.broker, c.reader, c.auditor):
                http.close()


@pytest.fixture(scope="module")
def tenant_key(clients: Clients) -> str:
    """Transit key tenant-t1, created by the broker token itself."""
    ok(clients.broker.post("/transit/keys/tenant-t1"))
    return "tenant-t1"


@pytest.mark.parametrize("name", POLICIES)
def test_policy_files_start_with_a_comment_block(name: str) -> None:
    first = (POLICY_DIR / f"{name}.hcl").read_text().splitlines()[0]
    assert first.startswith(f"# Policy: {name}")


# --- broker: allowed ------------------------------------------------------------------------


def test_broker_writes_and_reads_tenant_credentials(clients: Clients) -> None:
    ok(clients.broker.post(SHOPIFY, json={"data": {"access_token": "shpat_1"}}))
    ok(clients.broker.post(SHOPIFY, json={"data": {"access_token": "shpat_2"}}))
    read = ok(clients.broker.get(SHOPIFY)).json()["data"]
    assert read["data"] == {"access_token": "shpat_2"}
    assert read["metadata"]["version"] == 2
    ok(clients.broker.post("/secret/data/tenants/t1/payout", json={"data": {"iban": "DE00"}}))
    assert ok(clients.broker.get("/secret/data/tenants/t1/payout")).json()["data"]["data"] == {
        "iban": "DE00"
    }
    listed = ok(clients.broker.request("LIST", "/secret/metadata/tenants/t1/integrations"))
    assert listed.json()["data"]["keys"] == ["shopify"]


def test_broker_manages_versions_and_metadata(clients: Clients) -> None:
    path = "tenants/t2/integrations/etsy"
    for n in (1, 2):
        ok(clients.broker.post(f"/secret/data/{path}", json={"data": {"n": n}}))
    ok(clients.broker.post(f"/secret/delete/{path}", json={"versions": [2]}))
    ok(clients.broker.post(f"/secret/undelete/{path}", json={"versions": [2]}))
    ok(clients.broker.post(f"/secret/destroy/{path}", json={"versions": [1]}))
    assert ok(clients.broker.get(f"/secret/metadata/{path}")).json()["data"]["versions"]["1"][
        "destroyed"
    ]
    ok(clients.broker.delete(f"/secret/metadata/{path}"))
    assert clients.root.get(f"/secret/data/{path}").status_code == 404


def test_broker_writes_a_lease_key_once_reads_lists_and_destroys_it(clients: Clients) -> None:
    path = "tenants/t3/leases/0123456789abcdef0123456789abcdef"
    ok(
        clients.broker.post(
            f"/secret/data/{path}", json={"data": {"c": "v1"}, "options": {"cas": 0}}
        )
    )
    assert ok(clients.broker.get(f"/secret/data/{path}")).json()["data"]["data"] == {"c": "v1"}
    listed = ok(clients.broker.request("LIST", "/secret/metadata/tenants/t3/leases/"))
    assert listed.json()["data"]["keys"] == ["0123456789abcdef0123456789abcdef"]
    # Rewrapped by a key rotation (check-and-set); never soft-deleted, only destroyed.
    ok(
        clients.broker.post(
            f"/secret/data/{path}", json={"data": {"c": "v2"}, "options": {"cas": 1}}
        )
    )
    denied(clients.broker.post(f"/secret/delete/{path}", json={"versions": [1]}))
    ok(clients.broker.delete(f"/secret/metadata/{path}"))
    assert clients.root.get(f"/secret/data/{path}").status_code == 404


def test_broker_reads_platform_secrets(clients: Clients) -> None:
    assert ok(clients.broker.get(STRIPE)).json()["data"]["data"] == {"api_key": "sk_test_platform"}


def test_broker_encrypts_and_decrypts_with_tenant_key(clients: Clients, tenant_key: str) -> None:
    ct = ok(clients.broker.post(f"/transit/encrypt/{tenant_key}", json={"plaintext": b64(b"hi")}))
    ciphertext = ct.json()["data"]["ciphertext"]
    pt = ok(clients.broker.post(f"/transit/decrypt/{tenant_key}", json={"ciphertext": ciphertext}))
    assert pt.json()["data"]["plaintext"] == b64(b"hi")


def test_broker_rotates_rewraps_and_retires_tenant_key(clients: Clients) -> None:
    key = "tenant-t3"
    ok(clients.broker.post(f"/transit/keys/{key}"))
    old = ok(clients.broker.post(f"/transit/encrypt/{key}", json={"plaintext": b64(b"x")}))
    ok(clients.broker.post(f"/transit/keys/{key}/rotate"))
    rewrapped = ok(
        clients.broker.post(
            f"/transit/rewrap/{key}", json={"ciphertext": old.json()["data"]["ciphertext"]}
        )
    ).json()["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v2:")
    ok(clients.broker.post(f"/transit/keys/{key}/config", json={"min_decryption_version": 2}))
    assert ok(clients.broker.get(f"/transit/keys/{key}")).json()["data"]["latest_version"] == 2
    ok(clients.broker.post(f"/transit/keys/{key}/config", json={"deletion_allowed": True}))
    ok(clients.broker.delete(f"/transit/keys/{key}"))


def test_broker_wraps_hashes_and_manages_its_token(clients: Clients) -> None:
    wrapped = ok(
        clients.broker.post(
            "/sys/wrapping/wrap", json={"k": "v"}, headers={"X-Vault-Wrap-TTL": "60s"}
        )
    )
    assert wrapped.json()["wrap_info"]["token"]
    ok(clients.broker.post("/sys/audit-hash/broker", json={"input": "shpat_1"}))
    ok(clients.broker.get("/auth/token/lookup-self"))
    ok(clients.broker.post("/auth/token/renew-self", json={"increment": "1h"}))
    ok(clients.broker.get("/sys/health"))


# --- broker: denied -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/sys/mounts", None),
        ("POST", "/sys/mounts/evil", {"type": "kv"}),
        ("LIST", "/sys/policies/acl", None),
        ("GET", "/sys/policies/acl/broker", None),
        ("PUT", "/sys/policies/acl/broker", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
        ("GET", "/sys/audit", None),
        ("GET", "/secret/data/other", None),
        ("POST", "/secret/data/other", {"data": {"x": "z"}}),
        ("POST", STRIPE, {"data": {"api_key": "sk_evil"}}),
        ("GET", "/secret/data/tenants/t1/notes", None),
        ("GET", "/secret/data/tenants/t1/integrations/shopify/extra", None),
        ("LIST", "/secret/metadata/tenants", None),
        ("POST", "/secret/metadata/tenants/t1/integrations/shopify", {"max_versions": 1}),
        ("GET", "/transit/export/encryption-key/tenant-t1", None),
        ("GET", "/transit/backup/tenant-t1", None),
        ("POST", "/transit/encrypt/platform", {"plaintext": "aGk="}),
        ("POST", "/transit/keys/platform/rotate", None),
        ("POST", "/transit/encrypt/tenant-nokey", {"plaintext": "aGk="}),  # no implicit create
    ],
)
def test_broker_is_denied(
    clients: Clients, tenant_key: str, method: str, path: str, body: object
) -> None:
    denied(clients.broker.request(method, path, json=body))


# --- service-reader -------------------------------------------------------------------------


def test_service_reader_unwraps_but_cannot_read_kv(clients: Clients) -> None:
    ok(clients.root.post(SHOPIFY, json={"data": {"access_token": "shpat_r"}}))
    wrapped = ok(clients.broker.get(SHOPIFY, headers={"X-Vault-Wrap-TTL": "60s"}))
    token = wrapped.json()["wrap_info"]["token"]
    lookup = ok(clients.reader.post("/sys/wrapping/lookup", json={"token": token})).json()
    assert lookup["data"]["creation_path"] == SHOPIFY.removeprefix("/")
    unwrapped = ok(clients.reader.post("/sys/wrapping/unwrap", json={"token": token})).json()
    assert unwrapped["data"]["data"] == {"access_token": "shpat_r"}

    denied(clients.reader.get(SHOPIFY))
    denied(clients.reader.get(STRIPE))
    denied(clients.reader.request("LIST", "/secret/metadata/tenants/t1/integrations"))
    denied(clients.reader.post("/sys/wrapping/wrap", json={"k": "v"}))
    denied(clients.reader.post("/transit/encrypt/tenant-t1", json={"plaintext": "aGk="}))


# --- security-auditor -----------------------------------------------------------------------


def test_auditor_hashes_and_inspects_audit_config(clients: Clients, tenant_key: str) -> None:
    mine = ok(clients.auditor.post("/sys/audit-hash/broker", json={"input": "shpat_1"}))
    theirs = ok(clients.broker.post("/sys/audit-hash/broker", json={"input": "shpat_1"}))
    assert mine.json()["data"]["hash"] == theirs.json()["data"]["hash"]
    devices = ok(clients.auditor.get("/sys/audit")).json()["data"]
    assert devices["broker/"]["type"] == "file"
    ok(clients.auditor.get("/sys/config/auditing/request-headers"))


def test_auditor_cannot_read_secrets_or_change_auditing(clients: Clients, tenant_key: str) -> None:
    ct = ok(clients.broker.post(f"/transit/encrypt/{tenant_key}", json={"plaintext": "aGk="}))
    ciphertext = ct.json()["data"]["ciphertext"]
    denied(clients.auditor.get(SHOPIFY))
    denied(clients.auditor.get(STRIPE))
    denied(clients.auditor.post(f"/transit/decrypt/{tenant_key}", json={"ciphertext": ciphertext}))
    denied(clients.auditor.post("/sys/audit/evil", json={"type": "file"}))
    denied(clients.auditor.delete("/sys/audit/broker"))
    denied(clients.auditor.put("/sys/config/auditing/request-headers/x-evil", json={}))


def test_only_service_reader_unwraps_with_its_own_token(clients: Clients) -> None:
    # A bogus wrapping token is rejected with 400 before the ACL is consulted, so use real ones.
    def wrap() -> str:
        response = clients.broker.get(STRIPE, headers={"X-Vault-Wrap-TTL": "60s"})
        token: str = ok(response).json()["wrap_info"]["token"]
        return token

    denied(clients.broker.post("/sys/wrapping/unwrap", json={"token": wrap()}))
    denied(clients.auditor.post("/sys/wrapping/unwrap", json={"token": wrap()}))
    ok(clients.reader.post("/sys/wrapping/unwrap", json={"token": wrap()}))
