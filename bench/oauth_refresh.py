"""The OAuth refresh figures: Shopify credentials inside their refresh window at once.

`bench.run` uses it like this:

1. The tenants' pasted Shopify tokens are issued by the local fake Shopify
   (tests/fakes/shopify_oauth.py, run in the bench process on 127.0.0.1).
2. `seed` migrates each one to an expiring token set with the broker's own
   `migrate_to_expiring` (one token exchange at the fake, then the write protocol:
   Vault Transit, KV check-and-set, PostgreSQL), several tenants at a time, while
   the fake's clock stands `shift_s` in the past. Moving the clock forward again
   leaves every access token with less than `oauth_refresh_ahead_s` to live: all
   of them are inside the refresh window at once.
3. A real `broker worker` (`WorkerProcess`) runs `integrations.refresh_due_tokens`;
   `Drain` keeps one run of it queued until nothing is due, so runs follow each
   other back to back rather than once a minute: the figure is the job's capacity.
   The broker processes keep the real time, as in production.

Refresh throughput is the fake's own count of refresh calls over the drain's time.
Nothing here asserts a time.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select

from bench.process import BrokerCommand
from broker.app import oauth_access_for, outbound_for
from broker.auth.principal import Principal
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError
from broker.devstack.datadir import ENV_FILE
from broker.integrations import oauth
from broker.integrations.jobs import refresh_due_tokens
from broker.jobs.defer import defer
from broker.models import AuditEvent, IntegrationCredential, utcnow
from broker.vault.gateway import VaultGateway
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth

log = logging.getLogger("bench")

PROVIDER = "shopify"
CLIENT_ID = "bench-shopify-app"
# Seeding's first chunk (one tenant per thread) aims its expiries with this rate
# (tenants/s); later chunks measure it. Only that small chunk can be aimed wrong.
GUESSED_RATE = 25.0
# Lets a drain that stopped making progress end the scenario instead of the run.
STALL_S = 90.0


def fake_shopify(clock: FakeClock) -> FakeShopifyOAuth:
    """The local Shopify, with a fresh client secret for this run (enter it to start)."""
    return FakeShopifyOAuth(
        client_id=CLIENT_ID, client_secret="shpss_" + secrets.token_hex(16), clock=clock
    )


def egress_env(shopify: FakeShopifyOAuth) -> dict[str, str]:
    """What a broker process needs to reach the fake Shopify on loopback."""
    return {
        "BROKER_SHOPIFY_BASE_URL": shopify.base_url,
        "BROKER_EGRESS_ALLOW_HTTP": "true",
        "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
    }


def store_platform_app(data_dir: Path, settings: Settings, shopify: FakeShopifyOAuth) -> None:
    """Put the app's client id and secret in Vault, as an operator does (the broker only reads)."""
    values = dict(
        line.split("=", 1) for line in (data_dir / ENV_FILE).read_text().splitlines() if "=" in line
    )
    root_token = shlex.split(values["BROKER_VAULT_TOKEN"])[0]
    admin = VaultGateway(addrs=settings.vault_addrs, token=root_token)
    try:
        admin.kv.write(
            "platform/shopify",
            {"client_id": shopify.client_id, "client_secret": shopify.client_secret},
            cas=None,
        )
    finally:
        admin.close()


def seed(
    settings: Settings,
    engine: Engine,
    shopify: FakeShopifyOAuth,
    *,
    principal: Principal,
    tenants: list[str],
    workers: int,
) -> dict[str, Any]:
    """Migrate every tenant's pasted token to an expiring set, all expiring at about one time.

    Each chunk is issued in the fake's past, so that its tokens expire `ahead` minus
    10 s after the seeding is expected to end (from the rate so far): once the clock is
    back, every token is inside the refresh window, none expired, whatever the seeding
    took. `ready_at` (epoch seconds) is when the last of them has entered the window.
    """
    vault = VaultGateway.from_settings(settings)
    access = _seeding_access(settings, engine, vault, shopify, workers)

    def one(tenant: str) -> str:
        try:
            return oauth.migrate_to_expiring(
                access, principal=principal, tenant_id=tenant, provider=PROVIDER
            ).outcome
        except BrokerError as exc:
            log.warning("migrating %s: %s", tenant, exc.message)
            return "failed"

    started = time.perf_counter()
    try:
        left_s = settings.oauth_refresh_ahead_s - 10
        outcomes = _in_aimed_chunks(shopify, tenants, workers, left_s, one)
        seconds = time.perf_counter() - started
    finally:
        shopify.clock.advance(time.time() - shopify.clock.now())  # the present again
        access.outbound.client.close()
        vault.close()
    first, last = expiry_range(engine, tenants)
    return {
        "credentials": len(tenants),
        "outcomes": dict(outcomes),
        "seconds": round(seconds, 2),
        "migrated_per_s": round(outcomes["migrated"] / seconds, 1) if seconds else None,
        "workers": workers,
        "expiry_spread_s": round((last - first).total_seconds(), 1),
        "first_expiry": first.timestamp(),
        "ready_at": (last - timedelta(seconds=settings.oauth_refresh_ahead_s - 1)).timestamp(),
    }


def _seeding_access(
    settings: Settings,
    engine: Engine,
    vault: VaultGateway,
    shopify: FakeShopifyOAuth,
    workers: int,
) -> oauth.OAuthAccess:
    """The broker's OAuth access, reaching the fake Shopify, on the fake's clock."""
    clock = shopify.clock
    reaching = settings.model_copy(
        update={
            "shopify_base_url": shopify.base_url,
            "egress_allow_http": True,
            "egress_allow_loopback": True,
        }
    )
    access = oauth_access_for(
        reaching,
        engine=engine,
        vault=vault,
        outbound=outbound_for(reaching),
        clock=lambda: datetime.fromtimestamp(clock.now(), UTC),
    )
    # The default gate lets 4 credentials at a time through; the bench wants `workers`.
    return replace(access, gate=oauth.RefreshGate(workers))


def _in_aimed_chunks(
    shopify: FakeShopifyOAuth,
    tenants: list[str],
    workers: int,
    left_s: float,
    one: Callable[[str], str],
) -> Counter[str]:
    """Run `one` over the tenants chunk by chunk, each issued in the fake's past so that
    its tokens expire `left_s` after the seeding is expected to end."""
    clock = shopify.clock
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        at = 0
        while at < len(tenants):
            # A first chunk of one tenant per thread, aimed with the guess: a whole
            # chunk aimed far off would spread the expiries wider than the window.
            size = workers if at == 0 else workers * 10
            elapsed = time.perf_counter() - started
            rate = at / elapsed if at else GUESSED_RATE
            expires_at = time.time() + (len(tenants) - at) / rate + left_s
            clock.advance(expires_at - shopify.access_ttl_s - clock.now())
            outcomes.update(pool.map(one, tenants[at : at + size]))
            at += size
    return outcomes


def expiry_range(engine: Engine, tenants: list[str]) -> tuple[datetime, datetime]:
    """The first and last access-token expiry among `tenants`' Shopify credentials."""
    with Session(engine) as session:
        first, last = session.exec(
            select(
                func.min(IntegrationCredential.token_expires_at),
                func.max(IntegrationCredential.token_expires_at),
            )
            .where(IntegrationCredential.provider == PROVIDER)
            .where(col(IntegrationCredential.tenant_id).in_(tenants))
        ).one()
    if first is None or last is None:
        raise RuntimeError("no expiring Shopify credentials were seeded")
    return first, last


def count_due(engine: Engine, settings: Settings, *, ahead: bool = True) -> int:
    """Credentials the refresh job would take now (`ahead=False`: those already expired)."""
    before = utcnow() + timedelta(seconds=settings.oauth_refresh_ahead_s if ahead else 0)
    with Session(engine) as session:
        return session.exec(
            select(func.count())
            .select_from(IntegrationCredential)
            .where(IntegrationCredential.provider == PROVIDER)
            .where(IntegrationCredential.credential_kind == "oauth")
            .where(IntegrationCredential.needs_reconnect == False)  # noqa: E712
            .where(col(IntegrationCredential.token_expires_at) < before)
        ).one()


def refreshes_by_actor(engine: Engine) -> dict[str, int]:
    """Audited refreshes per actor: the worker's ahead of time, a service's on a fetch."""
    with Session(engine) as session:
        rows = session.exec(
            select(AuditEvent.actor, func.count())
            .where(AuditEvent.action == "integration.oauth.refresh")
            .where(AuditEvent.outcome == "success")
            .group_by(col(AuditEvent.actor))
        ).all()
    return dict(rows)


class WorkerProcess(BrokerCommand):
    """`broker worker` in its own process, configured like the bench's broker."""

    command = "worker"

    def __init__(self, env: dict[str, str], engine: Engine, log_path: Path) -> None:
        own = {k: v for k, v in env.items() if k not in ("BROKER_PORT", "BROKER_HOST")}
        super().__init__(own, log_path)
        self.engine = engine
        self.before: set[int] = set()

    def start(self) -> Self:
        """Start the worker; it is ready once it has registered itself."""
        self.before = self._registered()
        return super().start()

    def ready(self) -> bool:
        """True once a worker that was not there before has registered."""
        return bool(self._registered() - self.before)

    def _registered(self) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(text("SELECT id FROM procrastinate_workers")).scalars())


class Drain:
    """Keeps one run of the refresh job queued until nothing is due; counts refresh calls."""

    def __init__(
        self, engine: Engine, settings: Settings, shopify: FakeShopifyOAuth, *, expiry: float
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.shopify = shopify
        self.calls_before = shopify.refresh_calls
        # The first seeded token's expiry (epoch s): refreshes after it came too late.
        self.expiry = expiry
        self.in_time: int | None = None
        self.started = self.finished = 0.0
        self.left_due = -1
        self.expired_at_start = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-drain", daemon=True)

    def snapshot(self) -> tuple[float, int]:
        """(now, refresh calls so far) for a window's own rate."""
        return time.perf_counter(), self.shopify.refresh_calls

    def start(self) -> None:
        # Seeding takes time, and each token's hour started when it was seeded: on a slow
        # machine the first ones may be past expiry before the job begins. Say how many.
        self.expired_at_start = count_due(self.engine, self.settings, ahead=False)
        self.started = time.perf_counter()
        self._thread.start()

    def wait(self) -> None:
        """Until nothing is due, or refreshes stopped making progress."""
        self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        progress_at, calls = time.monotonic(), self.shopify.refresh_calls
        while not self._stop.is_set():
            if self.in_time is None and time.time() >= self.expiry:
                self.in_time = self.shopify.refresh_calls - self.calls_before
            # Queueing lock: None while a run is still waiting, which is all this needs.
            with unit_of_work(self.engine) as session:
                defer(session, refresh_due_tokens)
            self.left_due = count_due(self.engine, self.settings)
            if self.left_due == 0:
                break
            if self.shopify.refresh_calls != calls:
                progress_at, calls = time.monotonic(), self.shopify.refresh_calls
            elif time.monotonic() - progress_at > STALL_S:
                log.warning("refreshes stopped making progress; %d still due", self.left_due)
                break
            time.sleep(0.2)
        self.finished = time.perf_counter()

    def figures(self) -> dict[str, Any]:
        """Refresh throughput over the whole drain."""
        refreshed = self.shopify.refresh_calls - self.calls_before
        seconds = self.finished - self.started
        return {
            "refresh_calls": refreshed,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(refreshed / seconds, 1) if seconds else None,
            "expired_at_start": self.expired_at_start,
            "refreshed_before_first_expiry": refreshed if self.in_time is None else self.in_time,
            "left_due": self.left_due,
        }
