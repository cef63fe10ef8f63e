"""What /metrics tells an operator beyond HTTP traffic: dependencies, limits and jobs.

Counters that components keep for themselves (rate-limit rejections, token-cache lookups,
pool timeouts) are read at scrape time by one collector, so those components need no
metrics registry of their own; calls to Vault and Stripe are observed as they happen.
"""

from __future__ import annotations

import functools
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
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Row, TextClause, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from broker.auth.tokens import TokenVerifier
from broker.core.db import pool_timeouts
from broker.core.ratelimit import RateLimiter
from broker.tenants.deletions import DeletionWatch

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
        )
        Info("broker_build", "The running broker.", registry=registry).info(
            {"version": package_version(), "python": platform.python_version()}
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


class StateCollector(Collector):
    """Reads, at scrape time, the counts the broker's components keep themselves."""

    def __init__(
        self,
        *,
        engine: Engine,
        limiter: RateLimiter,
        verifier: TokenVerifier,
        deletions: DeletionWatch,
    ) -> None:
        self._engine = engine
        self._limiter = limiter
        self._verifier = verifier
        self._deletions = deletions

    def collect(self) -> Iterator[Metric]:
        """The current values (a prometheus_client custom collector)."""
        rejections = CounterMetricFamily(
            "broker_rate_limit_rejections",
            "Requests refused with 429 by a named rate limit.",
            labels=["limit"],
        )
        for name in self._limiter.limits:
            rejections.add_metric([name], self._limiter.rejections[name])
        yield rejections
        lookups = CounterMetricFamily(
            "broker_token_cache_lookups",
            "Lookups in the cache of verified tokens (a hit skips signature verification).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], self._verifier.cache_hits)
        lookups.add_metric(["miss"], self._verifier.cache_misses)
        yield lookups
        yield from _pool_metrics(self._engine)
        yield from _job_metrics(self._engine)
        yield from _lease_metrics(self._engine)
        yield from _credential_metrics(self._engine)
        yield CounterMetricFamily(
            "broker_deletion_watch_refresh_failures",
            "Failed refreshes of the list of tenants being deleted (the last list is kept).",
            value=self._deletions.refresh_failures,
        )

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
    yield CounterMetricFamily(
        "broker_db_pool_timeouts",
        "Units of work that found every pooled connection busy (answered 503).",
        value=pool_timeouts(engine),
    )


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
    """The process (CPU, memory, file descriptors), Python platform and GC collectors."""
    # Each registers itself in the app's own registry, not the global one.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
