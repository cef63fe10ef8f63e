"""The Grafana dashboard and the Prometheus alert rules in deploy/ use only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import DatabaseBounds, make_engine
from broker.core.errors import BrokerError
from broker.vault.gateway import VaultGateway
from tests.support.metrics import metric_value
from tests.support.tokens import bearer, token

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
# Every metric the files use is the broker's or a standard collector's.
_METRIC = re.compile(r"\b((?:broker|process|python)_[a-z0-9_]+)\b")
_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_info", "_created")


def dashboard_expressions() -> list[str]:
    document = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in document["panels"] for target in panel["targets"]]


def rule_expressions() -> dict[str, str]:
    document: Any = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    return {rule["alert"]: rule["expr"] for group in document["groups"] for rule in group["rules"]}


def exposed(client: TestClient) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        names.update(family.name + suffix for suffix in _SUFFIXES)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_dashboard_and_alerts_use_exists(client: TestClient) -> None:
    client.get("/readyz")  # readiness sets Vault's state
    names = exposed(client)
    expressions = dashboard_expressions() + list(rule_expressions().values())
    assert len(expressions) >= 20
    for expression in expressions:
        used = _METRIC.findall(expression)
        assert used, expression
        missing = sorted(set(used) - names)
        assert not missing, f"{missing} in {expression!r}"


def test_the_alerts_an_operator_expects_are_there() -> None:
    rules = rule_expressions()
    for alert in (
        "BrokerVaultSealed",
        "BrokerVaultUnreachable",
        "BrokerVaultAuditDeviceFailing",
        "BrokerHighErrorRate",
        "BrokerDeletionRefreshFailing",
    ):
        assert alert in rules
    assert 'state="refusing"' in rules["BrokerVaultAuditDeviceFailing"]


# -- the metrics the alerts rest on move when their event happens --------------------------


def _value(client: TestClient, name: str, **labels: str) -> float:
    return metric_value(client.get("/metrics").text, name, **labels)


def test_a_failed_vault_call_is_counted_by_operation_node_and_error(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    # An app of its own: the session's gateway reports to the app built last with it.
    client = TestClient(create_app(settings, engine=engine, vault=broker_vault))
    labels = {"operation": "read a secret", "node": broker_vault.addrs[0], "error": "Forbidden"}
    before = _value(client, "broker_vault_request_errors_total", **labels)
    # Outside the broker's policy: the real Vault refuses it.
    with pytest.raises(BrokerError):
        broker_vault.kv.read("outside-the-brokers-policy/metrics")
    assert _value(client, "broker_vault_request_errors_total", **labels) == before + 1


def test_a_unit_of_work_that_finds_the_pool_busy_is_counted(
    settings: Settings, database_url: str, tenant: str
) -> None:
    engine = make_engine(
        database_url, DatabaseBounds(pool_size=1, max_overflow=0, pool_timeout_s=0.5)
    )
    vault = VaultGateway.from_settings(settings)
    try:
        client = TestClient(create_app(settings, engine=engine, vault=vault))
        admin = bearer(token("tenant:admin", tenant_id=tenant))
        assert _value(client, "broker_db_pool_timeouts_total") == 0
        with engine.connect():  # the pool's only connection, taken
            assert client.get("/v1/tenants/settings", headers=admin).status_code == 503
        assert _value(client, "broker_db_pool_timeouts_total") == 1
        assert _value(client, "broker_db_pool_connections", state="checked_out") == 0
    finally:
        vault.close()
        engine.dispose()
