"""Refresh across broker processes: one refresh per credential, and a killed refresher burns
nothing. Two real broker processes (uvicorn) and, racing their fetches, two real workers
running the refresh job, on one Vault and one PostgreSQL; the fake Shopify, and a clock
shared through a file.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from broker.client import BrokerClient, ReconnectRequired
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.devstack.openbao import free_port
from broker.integrations.jobs import REFRESH_DUE, refresh_due_tokens
from broker.jobs.defer import defer
from broker.vault.gateway import VaultGateway
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth
from tests.support import oauth as oauth_connect
from tests.support.apps import VaultEndpoint
from tests.support.broker_process import BrokerProcess
from tests.support.tenants import new_tenant_id
from tests.support.tokens import TEST_SIGNING_KEY, bearer, token
from tests.support.workers import Workers, wait_for

CLIENT_ID = "process-client"
CLIENT_SECRET = "shpss_process" + os.urandom(8).hex()
REDIRECT_BASE = "https://broker.platform.test"
RETURN = "https://app.platform.test/settings/integrations"
# `broker worker` on the test's clock file.
CLOCKED_WORKER = [sys.executable, "-m", "tests.support.worker_process"]


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FakeClock:
    """Time for the fake and for every broker process (through a file)."""
    return FakeClock(tmp_path_factory.mktemp("clock") / "offset")


@pytest.fixture(scope="module")
def shopify(clock: FakeClock, vault_admin: VaultGateway) -> Iterator[FakeShopifyOAuth]:
    """The fake Shopify; the platform app it knows is the one in Vault."""
    with FakeShopifyOAuth(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock) as fake:
        fake.allowed_redirect_uris = [f"{REDIRECT_BASE}/v1/oauth/callback/shopify"]
        vault_admin.kv.write(
            "platform/shopify", {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, cas=None
        )
        yield fake


def _broker_env(
    port: int,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    shopify: FakeShopifyOAuth,
    clock_file: str,
) -> dict[str, str]:
    """A broker process's environment: this session's Vault, database and fake Shopify."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {
        "BROKER_ENV": "test",
        "BROKER_PORT": str(port),
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_DATABASE_URL": database_url,
        "BROKER_VAULT_ADDRS": vault_endpoint.addr,
        "BROKER_VAULT_TOKEN": broker_vault_token,
        "BROKER_JWT_HS256_SECRET": TEST_SIGNING_KEY,
        "BROKER_EGRESS_ALLOW_HTTP": "true",
        "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
        "BROKER_SHOPIFY_BASE_URL": shopify.base_url,
        "BROKER_OAUTH_REDIRECT_BASE_URL": REDIRECT_BASE,
        "BROKER_OAUTH_RETURN_URLS": RETURN,
        "BROKER_RATE_LIMIT_FETCH": "100000/minute",
        "BROKER_RATE_LIMIT_WRITE": "100000/minute",
        "BROKER_TEST_CLOCK_FILE": clock_file,
    }
    return env


@pytest.fixture(scope="module")
def start_broker(
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    shopify: FakeShopifyOAuth,
    clock: FakeClock,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[object]:
    """Starts broker processes on free loopback ports; every one is stopped at the end."""
    started: list[BrokerProcess] = []
    clock_file = clock.path
    assert clock_file is not None

    def start() -> BrokerProcess:
        port = free_port()
        env = _broker_env(
            port, vault_endpoint, broker_vault_token, database_url, shopify, str(clock_file)
        )
        workdir = tmp_path_factory.mktemp("broker")  # no stray .env
        broker = BrokerProcess.start(f"http://127.0.0.1:{port}", env, workdir)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture(scope="module")
def brokers(start_broker: object) -> list[BrokerProcess]:
    """Two replicas."""
    return [start_broker(), start_broker()]  # type: ignore[operator]


def _tenant(broker: BrokerProcess) -> str:
    tenant = new_tenant_id()
    created = httpx.post(
        f"{broker.url}/v1/tenants",
        json={"id": tenant, "name": tenant},
        headers=bearer(token("platform:admin", subject="ops")),
    )
    assert created.status_code == 201, created.text
    return tenant


def connect(broker: BrokerProcess, shop: str) -> str:
    """A tenant connected to `shop` through `broker`."""
    tenant = _tenant(broker)
    with httpx.Client() as http:
        approved = oauth_connect.consent(http, tenant, shop, base=broker.url)
        query = urllib.parse.urlsplit(approved.headers["location"]).query
        answer = oauth_connect.callback(http, query, base=broker.url)
    assert answer.status_code == 303
    assert answer.headers["location"].endswith("outcome=connected"), answer.headers["location"]
    return tenant


def service(tenant: str) -> dict[str, str]:
    return bearer(token("credentials:read", kind="service", tenants=(tenant,), subject="sync"))


def _refresh_runs_settled(engine: Engine, after: int) -> bool:
    with engine.connect() as conn:
        return not conn.execute(
            text(
                "SELECT 1 FROM procrastinate_jobs WHERE task_name = :task AND id >= :after"
                " AND status IN ('todo', 'doing')"
            ),
            {"task": REFRESH_DUE, "after": after},
        ).first()


def test_concurrent_fetches_across_expiry_refresh_each_credential_once(
    brokers: list[BrokerProcess],
    shopify: FakeShopifyOAuth,
    clock: FakeClock,
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
) -> None:
    shops = [f"multi-{os.urandom(3).hex()}.myshopify.com" for _ in range(4)]
    tenants = [connect(brokers[0], shop) for shop in shops]
    assert clock.path is not None
    with (
        Workers(settings, engine, tmp_path) as workers,
        httpx.Client(limits=httpx.Limits(max_connections=64), timeout=60) as http,
    ):
        # Two workers on the same clock: their refresh job races the fetches.
        for _ in range(2):
            workers.start(
                CLOCKED_WORKER,
                BROKER_TEST_CLOCK_FILE=str(clock.path),
                BROKER_SHOPIFY_BASE_URL=shopify.base_url,
                BROKER_EGRESS_ALLOW_HTTP="true",
                BROKER_EGRESS_ALLOW_LOOPBACK="true",
            )

        def fetch(i: int) -> tuple[int, str]:
            tenant = tenants[i % len(tenants)]
            answer = http.get(
                f"{brokers[i % 2].url}/v1/credentials/{tenant}/shopify", headers=service(tenant)
            )
            assert answer.status_code == 200, answer.text
            return i, answer.json()["fields"]["access_token"]

        old = dict(zip(tenants, (fetch(i)[1] for i in range(len(tenants))), strict=True))
        before = {shop: shopify.refresh_calls_by_shop[shop] for shop in shops}
        with ThreadPoolExecutor(32) as pool:
            early = [pool.submit(fetch, i) for i in range(100)]
            clock.advance(3600)  # the hour ends while those are in flight
            with unit_of_work(engine) as session:  # and a run of the job starts
                queued = defer(session, refresh_due_tokens)
            late = [pool.submit(fetch, i) for i in range(100, 200)]
            served = [f.result() for f in early], [f.result() for f in late]
        # (None: a tick was already waiting, and does the same.) Its refreshes count too.
        mark = queued or 0
        wait_for(lambda: _refresh_runs_settled(engine, mark), timeout_s=120, what="the job")

    refreshes = {shop: shopify.refresh_calls_by_shop[shop] - before[shop] for shop in shops}
    assert refreshes == dict.fromkeys(shops, 1)
    new = {tenants[i % len(tenants)]: value for i, value in served[1]}
    for tenant in tenants:
        assert new[tenant] != old[tenant]
        assert shopify.token_valid(new[tenant])
    for i, value in served[0]:
        assert value in (old[tenants[i % len(tenants)]], new[tenants[i % len(tenants)]])
    for i, value in served[1]:  # asked after the hour ended: only the new token
        assert value == new[tenants[i % len(tenants)]]


def test_a_broker_killed_mid_refresh_burns_no_token(
    brokers: list[BrokerProcess], start_broker: object, shopify: FakeShopifyOAuth, clock: FakeClock
) -> None:
    shop = f"killed-{os.urandom(3).hex()}.myshopify.com"
    victim: BrokerProcess = start_broker()  # type: ignore[operator]
    tenant = connect(victim, shop)
    clock.advance(3600)
    calls = shopify.refresh_calls_by_shop[shop]
    shopify.refresh_rotated.clear()
    shopify.refresh_reply_delay_s = 30
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(
            httpx.get,
            f"{victim.url}/v1/credentials/{tenant}/shopify",
            headers=service(tenant),
            timeout=60,
        )
        # Shopify has rotated; the answer is on its way when the process dies.
        assert shopify.refresh_rotated.wait(30)
        victim.proc.kill()
        victim.proc.wait()
        with pytest.raises(httpx.TransportError):
            hanging.result()
    shopify.refresh_reply_delay_s = 0

    survivor = httpx.get(
        f"{brokers[1].url}/v1/credentials/{tenant}/shopify", headers=service(tenant), timeout=60
    )
    assert survivor.status_code == 200, survivor.text
    assert shopify.token_valid(survivor.json()["fields"]["access_token"])
    assert shopify.refresh_calls_by_shop[shop] == calls + 2


def test_the_sdk_keeps_an_oauth_token_for_its_own_hour_and_says_when_to_reconnect(
    brokers: list[BrokerProcess], shopify: FakeShopifyOAuth, clock: FakeClock
) -> None:
    shop = f"sdk-{os.urandom(3).hex()}.myshopify.com"
    tenant = connect(brokers[0], shop)
    ticks = [1000.0]
    with BrokerClient(
        brokers[1].url,
        token=token("credentials:read", kind="service", tenants=(tenant,), subject="sync"),
        clock=lambda: ticks[0],
    ) as sdk:
        first = sdk.shopify(tenant)
        assert shopify.token_valid(first.access_token)
        ticks[0] += 1800  # far past a static lease (300 s), within the token's hour
        assert sdk.lease(tenant, "shopify").fields["access_token"] == first.access_token
        assert sdk.shopify(tenant) == first
        calls = shopify.refresh_calls_by_shop[shop]

        clock.advance(3600)
        ticks[0] += 1800  # the hour is over on both clocks
        second = sdk.shopify(tenant)
        assert second.access_token != first.access_token
        assert shopify.token_valid(second.access_token)
        assert shopify.refresh_calls_by_shop[shop] == calls + 1

        shopify.revoke_grant(shop)
        clock.advance(3600)
        ticks[0] += 3600
        with pytest.raises(ReconnectRequired) as refused:
            sdk.shopify(tenant)
        assert "must reconnect" in str(refused.value)
