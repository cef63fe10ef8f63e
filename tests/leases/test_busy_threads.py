"""A slow provider cannot make unrelated fetches queue behind it.

The blocking part of a fetch (a dynamic key's mint, an OAuth refresh, a wrap) runs on
the fetch threads (`BROKER_VAULT_THREADS`). A provider that answers slowly holds one for
each of its mints; with every thread held, another fetch that needs one waits at most
the request's Vault budget, then is answered 503 with Retry-After, while the slow mint
still goes on. Here the broker has a single fetch thread, and Twilio takes its time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes.providers import VALID, FakeProviders
from tests.leases.conftest import (
    admin,
    dynamic_tenant,
    fetch,
    service,
)
from tests.support.tenants import make_tenant

# Longer than a fetch waits for a thread (its Vault budget, 1 s here), shorter than the
# provider timeout (5 s here): the mint holds the thread, then succeeds.
TWILIO_TAKES_S = 3.0


@pytest.fixture(scope="module")
def dyn_settings() -> dict[str, Any]:
    return {"vault_threads": 1, "vault_retry_budget_s": 1.0, "egress_timeout_s": 5.0}


@pytest.fixture(scope="module")
def dyn_one_loop() -> bool:
    return True  # as served: every request shares the loop's fetch threads


def test_a_fetch_that_finds_every_thread_held_is_a_503_instead_of_a_wait(
    dyn: TestClient, providers: FakeProviders
) -> None:
    minting = dynamic_tenant(dyn)
    other = make_tenant(dyn)
    saved = dyn.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": dict(VALID["openai"])},
        headers=admin(other),
    )
    assert saved.status_code == 200, saved.text
    providers.delay("twilio", TWILIO_TAKES_S)
    asked_before = _mints_asked(providers)  # switching to dynamic delivery tried one
    with ThreadPoolExecutor(1) as pool:
        mint = pool.submit(fetch, dyn, minting)
        _until_twilio_is_asked_to_mint(providers, mint, asked_before)
        # A wrap needs a fetch thread; the only one is waiting on Twilio.
        wrapped = dyn.get(f"/v1/credentials/{other}/openai?wrap_ttl=60s", headers=service(other))
        mint_was_running = not mint.done()
        minted = mint.result()
    assert wrapped.status_code == 503, wrapped.text
    assert int(wrapped.headers["retry-after"]) > 0
    assert mint_was_running, "the refused fetch waited for the slow mint to end"
    assert minted["fields"]["api_key_sid"].startswith("SK")
    # Once the thread is free, the same fetch is served.
    again = dyn.get(f"/v1/credentials/{other}/openai?wrap_ttl=60s", headers=service(other))
    assert again.status_code == 200, again.text


def _mints_asked(providers: FakeProviders) -> int:
    return sum(r.provider == "twilio" and r.method == "POST" for r in providers.requests)


def _until_twilio_is_asked_to_mint(providers: FakeProviders, mint: Any, before: int) -> None:
    deadline = time.monotonic() + TWILIO_TAKES_S
    while _mints_asked(providers) == before:
        assert not mint.done(), mint.result()
        assert time.monotonic() < deadline, "the fetch never asked Twilio for a key"
        time.sleep(0.02)
