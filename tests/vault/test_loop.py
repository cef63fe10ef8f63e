"""Vault reads on the event loop (`VaultGateway.call_on_loop`): the same answers, headers,
budget and failover as the threaded `call`, which takes over anything indefinite.

Each test runs its calls inside `serving_on_loop()` on a loop of its own. Where a test
must show that a call was made on the loop, every Vault thread is taken first: a call
that needed one could not finish (`anyio.fail_after` turns that into a failure rather
than a hang).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from broker.core import context
from broker.vault.errors import CiphertextRejected, VaultMisconfigured, VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, key_name
from tests.support.apps import VaultEndpoint
from tests.support.slowproxy import SlowProxy
from tests.vault.test_transport import _Node

T = TypeVar("T")
# A guard against a hang, not a measurement: an on-loop call needs milliseconds.
HANG_S = 20


def on_loop(
    gateway: VaultGateway,
    call: Callable[[anyio.CapacityLimiter], Awaitable[T]],
    *,
    threads_free: bool = True,
    ctx: context.RequestContext | None = None,
) -> T:
    """Run `call(threads)` on a loop the gateway serves; with `threads_free=False` every
    Vault thread is taken, so only an on-loop call can finish."""

    async def main() -> T:
        context.bind(ctx or context.RequestContext(request_id="loop-test"))
        threads = anyio.CapacityLimiter(1)
        async with gateway.serving_on_loop():
            if threads_free:
                return await call(threads)
            async with threads:
                with anyio.fail_after(HANG_S):
                    return await call(threads)

    return anyio.run(main)


def _tenant() -> str:
    return f"loop-{uuid.uuid4().hex[:10]}"


def _sealed(gateway: VaultGateway, tenant: str) -> tuple[SealedStore, str]:
    """A sealed shopify item for `tenant`, through the threaded path."""
    store = SealedStore(gateway)
    store.ensure_tenant_key(tenant)
    item = "integrations/shopify"
    public = {"identifiers": {"shop_domain": "loop.myshopify.com"}}
    ciphertext = store.seal(tenant, item, {"access_token": "shpat_loop"}, public)
    store.write(tenant, item, ciphertext=ciphertext, public=public, cas=0)
    return store, item


def test_reads_and_decrypts_are_made_on_the_loop_with_the_threaded_answers(
    broker_vault: VaultGateway,
) -> None:
    tenant = _tenant()
    store, item = _sealed(broker_vault, tenant)
    expected = store.read(tenant, item)
    assert expected is not None

    async def read_and_open(threads: anyio.CapacityLimiter) -> dict[str, str]:
        record = await store.read_on_loop(tenant, item, threads=threads)
        assert record == expected
        assert await store.read_on_loop(tenant, "integrations/twilio", threads=threads) is None
        return await store.open_on_loop(tenant, item, record, threads=threads)

    opened = on_loop(broker_vault, read_and_open, threads_free=False)
    assert opened == store.open(tenant, item, expected) == {"access_token": "shpat_loop"}


def test_a_refused_decryption_is_the_threaded_error(broker_vault: VaultGateway) -> None:
    tenant = _tenant()
    store, item = _sealed(broker_vault, tenant)
    record = store.read(tenant, item)
    assert record is not None

    async def decrypt(threads: anyio.CapacityLimiter) -> bytes:
        # Bound to another provider: Transit refuses it (a 400, answered on the loop).
        return await broker_vault.transit.decrypt_on_loop(
            key_name(tenant), record.ciphertext, context=f"{tenant}/twilio", threads=threads
        )

    with pytest.raises(CiphertextRejected):
        on_loop(broker_vault, decrypt, threads_free=False)
    with pytest.raises(CiphertextRejected):
        broker_vault.transit.decrypt(key_name(tenant), record.ciphertext, context=f"{tenant}/x")


def test_calls_on_the_loop_carry_the_audited_headers(
    broker_vault: VaultGateway, vault_endpoint: VaultEndpoint
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    tenant = _tenant()
    store, item = _sealed(broker_vault, tenant)
    request_id = f"req-{uuid.uuid4().hex}"
    ctx = context.RequestContext(
        request_id=request_id,
        client_addr="10.1.2.3",
        actor="service:auditee",
        tenant_id=tenant,
        action="credentials.fetch:shopify",
    )

    async def fetch(threads: anyio.CapacityLimiter) -> dict[str, str]:
        record = await store.read_on_loop(tenant, item, threads=threads)
        assert record is not None
        return await store.open_on_loop(tenant, item, record, threads=threads)

    on_loop(broker_vault, fetch, threads_free=False, ctx=ctx)
    requests = [
        entry
        for entry in map(json.loads, vault_endpoint.audit_log.read_text().splitlines())
        if entry["type"] == "request" and request_id in json.dumps(entry)
    ]
    assert {e["request"]["path"] for e in requests} == {
        f"secret/data/tenants/{tenant}/{item}",
        f"transit/decrypt/tenant-{tenant}",
    }
    for entry in requests:
        headers = entry["request"]["headers"]
        assert headers["x-request-id"] == [request_id]
        assert headers["x-broker-actor"] == ["service:auditee"]
        assert headers["x-broker-tenant"] == [tenant]
        assert headers["x-broker-action"] == ["credentials.fetch:shopify"]
        assert headers["x-broker-client-addr"] == ["10.1.2.3"]


def test_calls_made_at_once_each_get_a_connection_kept_for_the_next() -> None:
    """A credential fetch makes its KV read and its decrypt at the same time
    (broker/credentials/opening.py): two calls to one node, in flight together."""
    with _Node(404) as node:
        gateway = VaultGateway(addrs=[node.url], token="s.x")

        async def pairs(threads: anyio.CapacityLimiter) -> list[object]:
            answers: list[object] = []
            for _ in range(3):
                answers += await asyncio.gather(
                    gateway.kv.read_on_loop("tenants/t/a", threads=threads),
                    gateway.kv.read_on_loop("tenants/t/b", threads=threads),
                )
            return answers

        try:
            answers = on_loop(gateway, pairs, threads_free=False)
        finally:
            gateway.close()
    assert answers == [None] * 6
    assert (
        sorted(path for _, path, _ in node.requests)
        == ["/v1/secret/data/tenants/t/a"] * 3 + ["/v1/secret/data/tenants/t/b"] * 3
    )
    assert node.connections == 2  # one per call in flight, both kept and reused


def test_a_hung_vault_costs_one_budget_then_is_unavailable() -> None:
    with _Node(200) as node:
        node.stall_s = 3.0
        gateway = VaultGateway(addrs=[node.url], token="s.x", retry_budget_s=0.5, retry_after_s=4)
        budgeted = context.RequestContext(request_id="hung", vault_budget=context.VaultBudget())
        try:
            with pytest.raises(VaultUnavailable) as hung:
                on_loop(
                    gateway,
                    lambda threads: gateway.kv.read_on_loop("tenants/t/x", threads=threads),
                    ctx=budgeted,
                )
        finally:
            gateway.close()
    assert hung.value.status == 503
    assert hung.value.retry_after == 4
    # The loop's attempt took the whole budget: the threaded call had none left to try.
    assert len(node.requests) == 1


# What a test node saw: (method, path, headers) of each request.
_Seen = list[tuple[str, str, dict[str, str]]]
_Call = Callable[[VaultGateway, anyio.CapacityLimiter], Awaitable[object]]


def _read(gateway: VaultGateway, threads: anyio.CapacityLimiter) -> Awaitable[object]:
    return gateway.kv.read_on_loop("tenants/t/x", threads=threads)


def _refused(
    status: int,
    error: type[Exception],
    call: _Call = _read,
    *,
    token: str = "s.x",
    threads_free: bool = True,
) -> tuple[Exception, _Seen]:
    """`call` on the loop against a node answering `status` (a 3xx pointing nowhere):
    the `error` it raised, and the requests the node saw."""
    with _Node(status, location="http://127.0.0.1:1/") as node:
        gateway = VaultGateway(addrs=[node.url], token=token, retry_budget_s=0.5)
        try:
            with pytest.raises(error) as refused:
                on_loop(gateway, partial(call, gateway), threads_free=threads_free)
        finally:
            gateway.close()
    return refused.value, node.requests


@pytest.mark.parametrize("status", [503, 429, 307])
def test_transient_answers_go_on_to_the_threaded_call(status: int) -> None:
    _, requests = _refused(status, VaultUnavailable)
    # One attempt on the loop, then the threaded call's own retries.
    assert len(requests) >= 2


def _guess(gateway: VaultGateway, threads: anyio.CapacityLimiter) -> Awaitable[object]:
    return gateway.transit.decrypt_on_loop(
        "tenant-t", "vault:v1:x", context="t/x", threads=threads, retry=False
    )


@pytest.mark.parametrize("status", [503, 429, 307])
def test_a_call_made_on_a_guess_is_one_attempt_and_never_takes_a_thread(status: int) -> None:
    # The early decrypt of a fetch (broker/credentials/opening.py): during an outage a
    # threaded retry would hold a second Vault thread for nothing. Every thread is taken
    # here, so a retry on one would hang rather than raise.
    _, requests = _refused(status, VaultUnavailable, _guess, threads_free=False)
    assert len(requests) == 1


def _misconfigured_read(status: int, token: str) -> tuple[Exception, _Seen]:
    """A read on the loop from a node answering `status`, with `token`: the error it
    raised, and the requests the node saw."""
    return _refused(status, VaultMisconfigured, token=token)


def test_a_refused_token_is_the_threaded_misconfiguration_without_echoing_it() -> None:
    error, requests = _misconfigured_read(403, "s.refused")
    assert "s.refused" not in str(error)
    assert len(requests) == 2  # the loop's attempt, then the threaded one


def test_an_unsendable_header_is_refused_without_echoing_it() -> None:
    error, requests = _misconfigured_read(404, "s.line\nbreak")
    assert "s.line" not in str(error)
    assert requests == []


def test_a_dead_active_node_is_failed_over_by_the_threaded_call(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, broker_vault: VaultGateway
) -> None:
    tenant = _tenant()
    _sealed(broker_vault, tenant)
    path = f"tenants/{tenant}/integrations/shopify"
    with SlowProxy(vault_endpoint.addr) as proxy:
        gateway = VaultGateway(addrs=[proxy.addr, vault_endpoint.addr], token=broker_vault_token)
        assert gateway.kv.read(path) is not None
        assert gateway.address == proxy.addr  # the first address answered as active
    try:
        # The proxy is gone: the loop's attempt fails, the threaded call finds the next node.
        entry = on_loop(gateway, lambda threads: gateway.kv.read_on_loop(path, threads=threads))
        assert entry is not None
        assert entry.version == 1
        assert gateway.address == vault_endpoint.addr
        # From now on the loop calls the node that answered, needing no thread.
        again = on_loop(
            gateway,
            lambda threads: gateway.kv.read_on_loop(path, threads=threads),
            threads_free=False,
        )
        assert again == entry
    finally:
        gateway.close()


def test_tls_on_the_loop_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = _Node(404)
    server.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server.ssl_context)
    with server:
        trusting = VaultGateway(addrs=[server.url], token="s.x", verify=str(ca_file))
        default = VaultGateway(addrs=[server.url], token="s.x", retry_budget_s=0.3)
        try:
            absent = on_loop(
                trusting,
                lambda threads: trusting.kv.read_on_loop("tenants/t/x", threads=threads),
                threads_free=False,
            )
            assert absent is None
            # An unknown CA: refused on the loop, and by the threaded call after it.
            with pytest.raises(VaultMisconfigured, match="certificate could not be verified"):
                on_loop(
                    default,
                    lambda threads: default.kv.read_on_loop("tenants/t/x", threads=threads),
                )
        finally:
            trusting.close()
            default.close()
    assert len(server.requests) == 1
