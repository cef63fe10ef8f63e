"""Liveness, readiness and metrics against real, and really failing, services."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import make_engine
from broker.devstack.openbao import OpenBaoServer
from broker.vault.gateway import VaultGateway
from tests.support.apps import VaultEndpoint, app_on, make_settings
from tests.support.slowproxy import SlowProxy
from tests.support.tokens import bearer, token


def readiness(status: str, **checks: str) -> dict[str, str]:
    """The whole /readyz body: `status`, and every check "ok" but those in `checks`."""
    return {
        "status": status,
        **dict.fromkeys(("vault", "database", "rate_limits", "stripe"), "ok"),
        **checks,
    }


def test_healthz_is_alive(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_when_everything_is_up(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == readiness("ready")


def test_readyz_is_degraded_while_the_shared_rate_limit_store_is_unreachable(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    degraded = settings.model_copy(update={"rate_limit_storage": f"redis://127.0.0.1:{port}/0"})
    client = TestClient(create_app(degraded, engine=engine, vault=broker_vault))
    response = client.get("/readyz")
    # Still in rotation: limits go on per process, and credential operations work.
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["rate_limits"] == "degraded"


def test_metrics_count_requests_by_route_template(client: TestClient, tenant: str) -> None:
    client.get("/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id=tenant)))
    body = client.get("/metrics").text
    assert "broker_http_requests_total" in body
    assert 'route="/v1/tenants/settings"' in body
    assert tenant not in body  # templates, not raw paths: no tenant ids in label values


def test_readyz_reports_a_sealed_then_a_dead_vault(
    own_bao: OpenBaoServer, database_url: str, engine: Engine
) -> None:
    client = app_on(own_bao, database_url, engine)
    assert client.get("/readyz").status_code == 200
    own_bao.seal()
    sealed = client.get("/readyz")
    assert sealed.status_code == 503
    assert sealed.json()["vault"] == "sealed"
    assert int(sealed.headers["retry-after"]) > 0
    own_bao.kill()
    dead = client.get("/readyz")
    assert dead.status_code == 503
    assert dead.json()["vault"] == "unreachable"


def test_settings_still_answer_while_vault_is_down(
    own_bao: OpenBaoServer, database_url: str, engine: Engine, tenant: str
) -> None:
    # Settings are PostgreSQL-only: a Vault outage must not take them down.
    client = app_on(own_bao, database_url, engine)
    own_bao.kill()
    response = client.get(
        "/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id=tenant))
    )
    assert response.status_code == 200


def test_readyz_and_settings_when_the_database_is_unreachable(
    settings: Settings, broker_vault: VaultGateway, tmp_path: Path
) -> None:
    dead = make_engine(f"postgresql+psycopg://nobody@/nothing?host={tmp_path}")
    client = TestClient(create_app(settings, engine=dead, vault=broker_vault))
    ready = client.get("/readyz")
    # Degraded, not unavailable: fetches need only Vault, so the replica stays in rotation.
    assert ready.status_code == 200
    assert ready.json() == readiness("degraded", database="unreachable")
    assert int(ready.headers["retry-after"]) > 0
    response = client.get(
        "/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id="any"))
    )
    assert response.status_code == 503
    assert "retry-after" in response.headers
    assert "psycopg" not in response.text
    assert "SELECT" not in response.text
    dead.dispose()


def test_readyz_is_not_ready_while_vaults_audit_device_cannot_write(
    own_bao: OpenBaoServer, database_url: str, engine: Engine
) -> None:
    # Vault refuses every audited request when no audit device can write, while
    # sys/health still says all is well: readiness must ask with an audited call.
    client = app_on(own_bao, database_url, engine)
    assert client.get("/readyz").json()["status"] == "ready"
    audit_log = own_bao.audit_log_path
    audit_log.unlink()
    audit_log.mkdir()  # the device's file can no longer be opened...
    pid = own_bao.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGHUP)  # ...once OpenBao reopens it
        deadline = time.monotonic() + 20
        while (refused := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "readiness never noticed the audit device"
            time.sleep(0.2)
        assert refused.status_code == 503
        assert refused.json() == readiness("unavailable", vault="refusing", stripe="unknown")
        assert int(refused.headers["retry-after"]) > 0
    finally:
        audit_log.rmdir()
        os.kill(pid, signal.SIGHUP)


def test_readyz_answers_within_the_vault_budget_when_vault_hangs(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str, engine: Engine
) -> None:
    with SlowProxy(vault_endpoint.addr) as proxy:
        # A 3 s socket timeout per node, but a 1 s budget for a request.
        settings = make_settings(
            VaultEndpoint(proxy.addr, "", None),
            broker_vault_token,
            database_url,
            vault_timeout_s=3.0,
            vault_retry_budget_s=1.0,
        )
        hung = TestClient(
            create_app(settings, engine=engine, vault=VaultGateway.from_settings(settings))
        )
        proxy.delay(b"", 20.0)
        started = time.monotonic()
        response = hung.get("/readyz")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["vault"] == "unreachable"
    assert "retry-after" in response.headers
    # Under one socket timeout: the budget, plus slack, bounds the probe.
    assert elapsed < 3.0, elapsed
