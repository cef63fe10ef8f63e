"""/metrics tells an operator about Vault, Stripe, limits, tokens, the pool and the process."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.auth.tokens import TokenVerifier
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, make_engine
from broker.core.logging import JsonFormatter, RedactionFilter
from broker.core.metrics import ComponentMetrics
from broker.core.ratelimit import RateLimiter
from broker.devstack.openbao import free_port
from broker.tenants.deletions import DeletionWatch
from broker.vault.gateway import VaultGateway
from tests.fakes.stripe import FakeStripe
from tests.support.metrics import metric_value
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def samples(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: dict[str, Any], name: str, **labels: str) -> float:
    return float(sum(v for have, v in found.get(name, []) if labels.items() <= have.items()))


def test_metrics_cover_vault_stripe_limits_tokens_pool_and_process(
    settings: Settings, engine: Engine, stripe_server: FakeStripe
) -> None:
    tight = settings.model_copy(update={"rate_limit_write": "2/minute"})
    vault = VaultGateway.from_settings(tight)
    try:
        client = TestClient(create_app(tight, engine=engine, vault=vault))
        tenant = make_tenant(client)
        finance = bearer(token("finance:manage", tenant_id=tenant))
        statuses = [
            client.post("/v1/tenants/settings/payment-methods/setup-intent", headers=finance)
            for _ in range(3)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert client.get("/readyz").status_code == 200
        found = samples(client)
    finally:
        vault.close()

    node = settings.vault_addrs[0]
    assert value(found, "broker_vault_request_duration_seconds_count", node=node) > 0
    assert value(found, "broker_stripe_request_duration_seconds_count") >= 2
    assert (
        value(
            found, "broker_stripe_request_duration_seconds_count", operation="create_setup_intent"
        )
        == 2
    )
    assert value(found, "broker_rate_limit_rejections_total", limit="write") == 1
    assert value(found, "broker_rate_limit_rejections_total", limit="fetch") == 0
    assert value(found, "broker_token_cache_lookups_total", result="hit") >= 2
    assert value(found, "broker_vault_state", state="ok") == 1
    assert value(found, "broker_vault_state", state="sealed") == 0
    assert value(found, "broker_db_pool_size") == tight.database_pool_size
    assert "broker_db_pool_connections" in found
    assert "broker_db_pool_timeouts_total" in found
    assert "broker_deletion_watch_refresh_failures_total" in found
    assert "process_resident_memory_bytes" in found
    assert "python_info" in found
    [(build, _)] = found["broker_build_info"]
    assert build["version"]
    assert build["python"]


def test_stripe_and_vault_errors_are_counted(client: TestClient, stripe_server: FakeStripe) -> None:
    tenant = make_tenant(client)
    stripe_server.fail_next(500, times=1)
    response = client.post(
        "/v1/tenants/settings/payment-methods/setup-intent",
        headers=bearer(token("finance:manage", tenant_id=tenant)),
    )
    assert response.status_code == 503
    found = samples(client)
    assert value(found, "broker_stripe_request_errors_total", error="APIError") >= 1


def _json_lines(logger: str) -> tuple[logging.Handler, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    logging.getLogger(logger).addHandler(handler)
    logging.getLogger(logger).setLevel(logging.INFO)
    return handler, stream


def test_the_access_log_is_one_json_line_with_route_status_duration_id_and_actor(
    client: TestClient,
) -> None:
    tenant = make_tenant(client)
    handler, stream = _json_lines("broker.access")
    try:
        client.get(
            "/v1/tenants/settings?secret=sk-canary-0123456789abcdef",
            headers={
                **bearer(token("tenant:admin", tenant_id=tenant, subject="ops-alice")),
                "X-Request-ID": "req-access-0001",
            },
        )
    finally:
        logging.getLogger("broker.access").removeHandler(handler)
    [line] = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    assert line["method"] == "GET"
    assert line["route"] == "/v1/tenants/settings"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float)
    assert line["request_id"] == "req-access-0001"
    assert line["actor"].endswith("ops-alice")
    assert "canary" not in stream.getvalue()


def test_failed_authentications_and_lockouts_log_warnings(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    strict = settings.model_copy(update={"rate_limit_auth_failures": "3/hour"})
    client = TestClient(create_app(strict, engine=engine, vault=broker_vault))
    handler, stream = _json_lines("broker.security")
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJlLWNhbmFyeQ"
    try:
        answers = [
            client.get("/v1/tenants/settings", headers=bearer(forged)).status_code for _ in range(6)
        ]
        client.get("/v1/tenants", headers=bearer(token("integrations:view", tenant_id="x")))
    finally:
        logging.getLogger("broker.security").removeHandler(handler)
    assert answers[:3] == [401, 401, 401]
    assert answers[3:] == [429, 429, 429]
    lines = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    assert all(line["level"] == "warning" for line in lines)
    events = [line["event"] for line in lines]
    assert events.count("authentication failed") == 3
    # Once per address per minute: a guesser cannot flood the log.
    assert events.count("authentication lockout") == 1
    assert events[-1] == "access denied"
    assert lines[-1]["route"] == "/v1/tenants"
    assert "c2lnbmF0dXJlLWNhbmFyeQ" not in stream.getvalue()


def test_job_outcomes_are_counted_by_task_and_status(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, status, args)"
                " VALUES ('metrics-test', 'metrics.example', 'failed', '{}')"
            )
        )
    try:
        found = samples(client)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM procrastinate_jobs WHERE queue_name = 'metrics-test'"))
    assert value(found, "broker_jobs", task="metrics.example", status="failed") == 1


def test_a_failed_refresh_of_the_deletion_watch_is_counted(settings: Settings) -> None:
    # Nothing listens there: every refresh fails, and keeps the last (empty) answer.
    unreachable = make_engine(
        f"postgresql+psycopg://broker@127.0.0.1:{free_port()}/broker",
        DatabaseBounds(connect_timeout_s=2),
    )
    limiter = RateLimiter("memory://", {"fetch": "10/minute"})
    deletions = DeletionWatch(unreachable, ttl_s=60)
    registry = CollectorRegistry()
    ComponentMetrics(registry, limiter.limits).attach(
        engine=unreachable,
        limiter=limiter,
        verifier=TokenVerifier.from_settings(settings),
        deletions=deletions,
    )
    try:
        deletions.refresh()
        deletions.refresh()
    finally:
        unreachable.dispose()
    counted = generate_latest(registry).decode()
    assert metric_value(counted, "broker_deletion_watch_refresh_failures_total") == 2
    assert not deletions.is_deleting("any-tenant")
