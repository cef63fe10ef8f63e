"""What /metrics tells an operator beyond HTTP traffic: dependencies, limits and jobs.

Counters and histograms are counted as things happen: calls to Vault and Stripe, and
what components report through their hooks (rate-limit rejections, token-cache
lookups, pool timeouts). What only makes sense at the moment of a scrape (the pool's
connections, the job and lease counts in PostgreSQL, the process) is read then by
collectors of the app's `local` registry. `exposition` writes both, adding up every
worker's counts under `broker serve --workers N`.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Row, TextClause, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from broker.auth.tokens import TokenVerifier
from broker.core.db import watch_pool_timeouts
from broker.core.ratelimit import RateLimiter
from broker.tenants.deletions import DeletionWatch

# prometheus_client's own variable: set before it is imported, it keeps values in files.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
VAULT_STATES = ("ok", "sealed", "unreachable", "refusing", "unknown")
# Vault and Stripe answer in milliseconds to seconds; past the budget is a timeout.
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def package_version() -> str:
    """The installed broker's version, or `unknown` when run from a bare checkout."""
    try:
        return version("tenant-secrets-broker")
    except PackageNotFoundError:
        return "unknown"


class DependencyMetrics:
    """Vault and Stripe calls, Vault's state as readiness last saw it, and build info."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.vault_latency = Histogram(
            "broker_vault_request_duration_seconds",
            "Vault call attempts by operation and node (retries count separately).",
            ["operation", "node"],
            buckets=_CALL_BUCKETS,
            registry=registry,
        )
        self.vault_errors = Counter(
            "broker_vault_request_errors_total",
            "Vault call attempts that failed, by operation, node and error class.",
            ["operation", "node", "error"],
            registry=registry,
        )
        # Each (operation, node) child found once: `.labels()` checks its arguments and looks
        # the child up under a lock on every call. As many as the registry holds anyway.
        self._vault_latency = functools.cache(self.vault_latency.labels)
        self.stripe_latency = Histogram(
            "broker_stripe_request_duration_seconds",
            "Stripe API calls by operation.",
            ["operation"],
            buckets=_CALL_BUCKETS,
            registry=registry,
        )
        self.stripe_errors = Counter(
            "broker_stripe_request_errors_total",
            "Stripe API calls that failed, by operation and error class.",
            ["operation", "error"],
            registry=registry,
        )
        self.vault_state = Gauge(
            "broker_vault_state",
            "1 for Vault's state at the last readiness probe (refusing: its audit device "
            "cannot write), 0 for the others.",
            ["state"],
            registry=registry,
            # With several workers: the state the latest probe of any of them found.
            multiprocess_mode="mostrecent",
        )

    def vault_call(self, operation: str, node: str, seconds: float, error: str | None) -> None:
        """Record one Vault attempt (a VaultGateway observer)."""
        self._vault_latency(operation, node).observe(seconds)
        if error is not None:
            self.vault_errors.labels(operation, node, error).inc()

    def stripe_call(self, operation: str, seconds: float, error: str | None) -> None:
        """Record one Stripe call (a StripeGateway observer)."""
        self.stripe_latency.labels(operation).observe(seconds)
        if error is not None:
            self.stripe_errors.labels(operation, error).inc()

    def saw_vault(self, state: str) -> None:
        """Vault's state as a readiness probe found it."""
        for known in VAULT_STATES:
            self.vault_state.labels(known).set(1.0 if known == state else 0.0)


class ComponentMetrics:
    """What the broker's components count as it happens: requests refused by a rate limit,
    lookups in the token cache, units of work that found the pool busy, failed refreshes
    of the deletion watch.

    Each component is told of the event through a hook it owns (`on_rejected`, ...), and
    the count is a counter here rather than a number the component keeps and a scrape
    reads: with `broker serve --workers N`, counters are what a scrape adds up over every
    worker (`exposition`).
    """

    def __init__(self, registry: CollectorRegistry, limits: Iterable[str]) -> None:
        self.rejections = Counter(
            "broker_rate_limit_rejections",
            "Requests refused with 429 by a named rate limit.",
            ["limit"],
            registry=registry,
        )
        for name in limits:
            self.rejections.labels(name)  # each limit shown, at 0 until it refuses one
        lookups = Counter(
            "broker_token_cache_lookups",
            "Lookups in the cache of verified tokens (a hit skips signature verification).",
            ["result"],
            registry=registry,
        )
        self._hit, self._miss = lookups.labels("hit"), lookups.labels("miss")
        self.pool_timeouts = Counter(
            "broker_db_pool_timeouts",
            "Units of work that found every pooled connection busy (answered 503).",
            registry=registry,
        )
        self.deletion_refresh_failures = Counter(
            "broker_deletion_watch_refresh_failures",
            "Failed refreshes of the list of tenants being deleted (the last list is kept).",
            registry=registry,
        )

    def attach(
        self,
        *,
        engine: Engine,
        limiter: RateLimiter,
        verifier: TokenVerifier,
        deletions: DeletionWatch,
    ) -> None:
        """Count what these components report from now on."""
        limiter.on_rejected = self.rejected
        verifier.on_lookup = self.token_lookup
        deletions.on_refresh_failed = self.deletion_refresh_failures.inc
        watch_pool_timeouts(engine, self.pool_timeouts.inc)

    def rejected(self, limit: str) -> None:
        """One request refused by the named limit."""
        self.rejections.labels(limit).inc()

    def token_lookup(self, found: bool) -> None:
        """One lookup in the token cache, which found the token or not."""
        (self._hit if found else self._miss).inc()


class StateCollector(Collector):
    """Reads, at scrape time, what this process's pool and rate limiter are in, and the
    counts PostgreSQL holds for every process (jobs, leases, credentials)."""

    def __init__(self, *, engine: Engine, limiter: RateLimiter) -> None:
        self._engine = engine
        self._limiter = limiter

    def collect(self) -> Iterator[Metric]:
        """The current values (a prometheus_client custom collector)."""
        yield GaugeMetricFamily(
            "broker_rate_limit_degraded",
            "1 while the shared rate-limit storage is unreachable and this process limits alone.",
            value=float(self._limiter.degraded),
        )
        yield from _pool_metrics(self._engine)
        yield from _job_metrics(self._engine)
        yield from _lease_metrics(self._engine)
        yield from _credential_metrics(self._engine)

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the collector is only ever registered once per registry."""
        return []


def _pool_metrics(engine: Engine) -> Iterator[Metric]:
    connections = GaugeMetricFamily(
        "broker_db_pool_connections",
        "Database connections of this process's pool, by state.",
        labels=["state"],
    )
    pool = engine.pool
    if isinstance(pool, QueuePool):
        connections.add_metric(["checked_out"], pool.checkedout())
        connections.add_metric(["idle"], pool.checkedin())
        connections.add_metric(["overflow"], max(0, pool.overflow()))
        yield GaugeMetricFamily(
            "broker_db_pool_size", "The pool's configured size (without overflow).", pool.size()
        )
    yield connections


# Succeeded jobs are kept a day and failed ones until removed (broker.jobs.housekeeping),
# so counts by status are the recent outcomes. The table is small; the engine bounds the
# query like any other.
_JOB_COUNTS = text(
    "SELECT queue_name, task_name, status::text, count(*) FROM procrastinate_jobs"
    " GROUP BY queue_name, task_name, status"
)


def _rows(engine: Engine, query: TextClause) -> Sequence[Row[*tuple[Any, ...]]]:
    """The query's rows, or none while the database cannot answer.

    The scrape must not fail with the database: the family is left empty, and the pool
    and readiness metrics tell why.
    """
    try:
        with engine.connect() as conn:
            return conn.execute(query).all()
    except SQLAlchemyError:
        return []


def _job_metrics(engine: Engine) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "broker_jobs",
        "Background jobs by queue, task and status (todo, doing, succeeded, failed, ...).",
        labels=["queue", "task", "status"],
    )
    for queue, task, status, count in _rows(engine, _JOB_COUNTS):
        jobs.add_metric([str(queue), str(task), str(status)], float(count))
    yield jobs


# Revocations run on job workers, which serve no /metrics: what they did is read from the
# lease registry, which records every failed attempt.
_LEASE_COUNTS = text(
    "SELECT provider, state, count(*),"
    " count(*) FILTER (WHERE state <> 'revoked' AND revoke_attempts > 0),"
    " count(*) FILTER (WHERE state <> 'revoked' AND due_at <= now()),"
    " coalesce(sum(revoke_attempts), 0)"
    " FROM leases GROUP BY provider, state"
)


def _lease_metrics(engine: Engine) -> Iterator[Metric]:
    leases = GaugeMetricFamily(
        "broker_leases",
        "Dynamic credential leases by provider and state.",
        labels=["provider", "state"],
    )
    failing = GaugeMetricFamily(
        "broker_lease_revocations_failing",
        "Leases whose revocation failed and is being retried with backoff (alert above 0).",
        labels=["provider"],
    )
    overdue = GaugeMetricFamily(
        "broker_lease_revocations_overdue",
        "Leases past the time they were due to be revoked and not revoked yet.",
        labels=["provider"],
    )
    failures = CounterMetricFamily(
        "broker_lease_revocation_failures",
        "Failed revocation attempts recorded in the lease registry.",
        labels=["provider"],
    )
    by_provider: dict[str, list[float]] = {}
    for provider, state, count, failing_n, overdue_n, attempts in _rows(engine, _LEASE_COUNTS):
        leases.add_metric([str(provider), str(state)], float(count))
        totals = by_provider.setdefault(str(provider), [0.0, 0.0, 0.0])
        totals[0] += float(failing_n)
        totals[1] += float(overdue_n)
        totals[2] += float(attempts)
    for provider, (failing_n, overdue_n, attempts) in sorted(by_provider.items()):
        failing.add_metric([provider], failing_n)
        overdue.add_metric([provider], overdue_n)
        failures.add_metric([provider], attempts)
    yield from (leases, failing, overdue, failures)


def _credential_metrics(engine: Engine) -> Iterator[Metric]:
    # Imported here: the credential_health domain imports most of the broker.
    from broker.core.db import unit_of_work
    from broker.core.errors import UpstreamUnavailable
    from broker.credential_health import age

    credentials = GaugeMetricFamily(
        "broker_credentials",
        "Stored credentials by health (healthy, failing, needs_reconnect, unknown) and age"
        " (ok, due, overdue, expiring, expired; as of the hourly sweep), across tenants.",
        labels=["health", "age"],
    )
    try:
        with unit_of_work(engine) as session:
            found = age.counts(session)
    except (SQLAlchemyError, UpstreamUnavailable):
        found = {}
    for (health, aged), count in sorted(found.items()):
        credentials.add_metric([health, aged], float(count))
    yield credentials


def install_runtime_collectors(registry: CollectorRegistry) -> None:
    """The process (CPU, memory, file descriptors), Python platform and GC collectors, and
    the build."""
    # Each registers itself in the app's own registry, not the global one.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info("broker_build", "The running broker.", registry=registry).info(
        {"version": package_version(), "python": platform.python_version()}
    )


def exposition(counted: CollectorRegistry, local: CollectorRegistry) -> bytes:
    """The /metrics body: what is `counted` as it happens (requests, Vault and Stripe calls,
    the components' counts), then what `local` reads from this process at scrape time.

    Under `broker serve --workers N` the counted metrics are every worker's, added up:
    the supervisor names a directory in PROMETHEUS_MULTIPROC_DIR before it starts them,
    so prometheus_client keeps each worker's values in files there, and any worker's
    scrape reads them all. What `local` reads (the pool, the process, the rate limiter's
    state) is the answering worker's own.
    """
    directory = os.environ.get(MULTIPROCESS_DIR)
    if directory:
        counted = CollectorRegistry()
        MultiProcessCollector(counted, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(counted) + generate_latest(local)
