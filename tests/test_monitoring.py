"""The Grafana dashboard and the Prometheus alert rules in deploy/ use only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

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
