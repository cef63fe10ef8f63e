"""A KV v2 mount that is starting up answers 400 for a moment: Vault is briefly
unavailable, not refusing the request.

A node that has just become active after a failover, or a mount just upgraded from KV
v1, answers every request on the mount with a 400 ("Upgrading from non-versioned to
versioned data. This backend will be unavailable for a brief period ...") until it is
ready. The real OpenBao shows it here the way that makes it last: a KV v1 mount holding
a few thousand keys, tuned to version 2, rewrites them all before it answers again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from broker.vault.errors import VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.kv import KvEntry
from tests.support.apps import VaultEndpoint
from tests.vault.test_loop import on_loop

# Enough keys that the upgrade outlasts the first attempts (about 0.15 s here).
KEYS = 3000
SEED_THREADS = 8


@pytest.fixture
def starting(vault_endpoint: VaultEndpoint) -> Iterator[str]:
    """A KV v1 mount full of keys, tuned to v2 just now: its upgrade is under way."""
    mount = f"starting-{uuid.uuid4().hex[:8]}"
    root = {"X-Vault-Token": vault_endpoint.root_token}
    with httpx.Client(base_url=vault_endpoint.addr, headers=root, timeout=30) as vault:
        vault.post(f"/v1/sys/mounts/{mount}", json={"type": "kv"}).raise_for_status()

        def seed(first: int) -> None:
            for key in range(first, KEYS, SEED_THREADS):
                vault.post(f"/v1/{mount}/k{key}", json={"value": str(key)}).raise_for_status()

        with ThreadPoolExecutor(SEED_THREADS) as pool:
            list(pool.map(seed, range(SEED_THREADS)))
        tune = {"options": {"version": "2"}}
        vault.post(f"/v1/sys/mounts/{mount}/tune", json=tune).raise_for_status()
        try:
            yield mount
        finally:
            _remove(vault_endpoint, mount)


def _remove(endpoint: VaultEndpoint, mount: str) -> None:
    """Remove the mount once its upgrade is over (not from under it)."""
    root = {"X-Vault-Token": endpoint.root_token}
    with httpx.Client(base_url=endpoint.addr, headers=root, timeout=30) as vault:
        deadline = time.monotonic() + 60
        while vault.get(f"/v1/{mount}/data/k0").status_code == 400:
            assert time.monotonic() < deadline, "the mount never finished its upgrade"
            time.sleep(0.05)
        vault.delete(f"/v1/sys/mounts/{mount}").raise_for_status()


def _gateway(
    endpoint: VaultEndpoint, mount: str, seen: list[str | None], budget_s: float = 30.0
) -> VaultGateway:
    """A gateway on `mount` that lists the error of each attempt it makes (None: answered)."""
    gateway = VaultGateway(
        addrs=[endpoint.addr], token=endpoint.root_token, kv_mount=mount, retry_budget_s=budget_s
    )
    gateway.observe = lambda operation, node, seconds, error: seen.append(error)
    return gateway


def _read_on_loop(gateway: VaultGateway, key: str) -> KvEntry | None:
    return on_loop(gateway, lambda threads: gateway.kv.read_on_loop(key, threads=threads))


# The threaded call, and the one on the event loop, which goes on to the threaded call.
READS: dict[str, Callable[[VaultGateway, str], KvEntry | None]] = {
    "threaded": lambda gateway, key: gateway.kv.read(key),
    "on the loop": _read_on_loop,
}


@pytest.mark.parametrize("read", list(READS))
def test_a_starting_mount_is_retried_never_taken_for_a_refusal(
    vault_endpoint: VaultEndpoint, starting: str, read: str
) -> None:
    seen: list[str | None] = []
    gateway = _gateway(vault_endpoint, starting, seen)
    outcome: KvEntry | VaultUnavailable | None
    try:
        outcome = READS[read](gateway, "k1")
    except VaultUnavailable as unavailable:
        outcome = unavailable
    finally:
        gateway.close()
    assert "InvalidRequest" in seen, "the upgrade was over before the first attempt"
    assert len(seen) > seen.index("InvalidRequest") + 1, "the 400 was not tried again"
    if isinstance(outcome, VaultUnavailable):
        # Still starting when the gateway's attempts ran out (a busy machine makes the
        # upgrade last): a 503 with Retry-After, as for any unavailability.
        assert outcome.retry_after
    else:  # waited out: the answer once the mount is up
        assert outcome is not None
        assert outcome.data == {"value": "1"}
        assert seen[-1] is None


def test_past_the_budget_it_is_unavailable_with_retry_after(
    vault_endpoint: VaultEndpoint, starting: str
) -> None:
    seen: list[str | None] = []
    gateway = _gateway(vault_endpoint, starting, seen, budget_s=0.05)
    try:
        with pytest.raises(VaultUnavailable) as unavailable:
            gateway.kv.read("k3")
    finally:
        gateway.close()
    assert unavailable.value.retry_after
    assert "InvalidRequest" in seen, "the upgrade was over before the first attempt"
