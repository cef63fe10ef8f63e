"""One query over the trail: the API and `broker audit` answer the same for the same filters."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from broker.audit import query
from broker.audit.cli import audit_app
from broker.audit.report import trail_row
from broker.core.db import unit_of_work
from broker.models import AuditEvent
from tests.support.tokens import bearer, token

AUDITOR = bearer(token("audit:read", subject="query-parity"))
T0 = datetime(2021, 6, 1, 12, 0, 0, tzinfo=UTC)
root = typer.Typer()
root.add_typer(audit_app, name="audit")


@root.command()
def _other() -> None:
    """A sibling command, so `audit` is a sub-group as in the `broker` app."""


@dataclass(frozen=True)
class Trail:
    """Planted events, each with its own `probe.<n>` action; names unique to this run."""

    tenant: str
    other: str
    alice: str
    log: Path
    database_url: str


def _event(n: int, run: str, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "actor": "user:nobody",
        "actor_kind": "user",
        "tenant_id": None,
        "resource": "elsewhere",
        "outcome": "success",
        "detail": {},
        "at": T0 + timedelta(seconds=n),
    }
    values.update(fields)
    return AuditEvent(action=f"probe.{run}.{n}", **values)


@pytest.fixture(scope="module")
def trail(engine: Engine, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Trail:
    run = uuid.uuid4().hex[:8]
    tenant, other, alice = f"q-{run}", f"q-{run}-other", f"alice-{run}"
    events = [
        _event(0, run, tenant_id=tenant, actor=f"user:{alice}"),
        # An operator belongs to no tenant: the resource names the tenant.
        _event(1, run, resource=f"/v1/tenants/{tenant}/settings", actor=f"service:{alice}"),
        _event(2, run, resource=f"credentials/{tenant}/shopify", outcome="denied"),
        _event(3, run, tenant_id=other, resource=f"tenants/{other}/integrations/shopify"),
        _event(4, run, tenant_id=tenant, detail={"provider": "twilio"}, actor=f"user:cli:{alice}"),
        _event(5, run, tenant_id=tenant, resource="/v1/tenants/settings", outcome="failed"),
        _event(6, run, resource=f"credentials/{tenant}-2/twilio", actor=alice),
    ]
    with unit_of_work(engine) as session:
        session.add_all(events)
    log = tmp_path_factory.mktemp("query") / "audit.log"
    log.write_text("")
    return Trail(tenant, other, alice, log, database_url)


def _iso(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def api_probes(client: TestClient, params: dict[str, str]) -> list[str]:
    response = client.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=AUDITOR)
    assert response.status_code == 200, response.text
    return sorted(e["action"] for e in response.json() if e["action"].startswith("probe."))


def cli_probes(trail: Trail, options: list[str]) -> list[str]:
    args = ["audit", str(trail.log), "--database-url", trail.database_url, "-f", "jsonl"]
    result = CliRunner().invoke(root, [*args, *options])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return sorted(row["action"] for row in rows if row["action"].startswith("probe."))


def _probes(trail: Trail, *numbers: int) -> list[str]:
    run = trail.alice.removeprefix("alice-")
    return sorted(f"probe.{run}.{n}" for n in numbers)


WINDOW = {"since": _iso(0), "until": _iso(100)}


@pytest.mark.parametrize(
    ("api", "cli", "expected"),
    [
        pytest.param(
            {"tenant_id": "{tenant}"}, ["--tenant", "{tenant}"], (0, 1, 2, 4, 5), id="tenant"
        ),
        pytest.param({"actor": "{alice}"}, ["--actor", "{alice}"], (0, 1, 6), id="bare-actor"),
        pytest.param({"actor": "user:{alice}"}, ["--actor", "user:{alice}"], (0,), id="actor"),
        pytest.param(
            {"tenant_id": "{tenant}", "provider": "shopify"},
            ["--tenant", "{tenant}", "--provider", "shopify"],
            (2,),
            id="provider-from-resource",
        ),
        pytest.param(
            {"tenant_id": "{tenant}", "provider": "twilio"},
            ["--tenant", "{tenant}", "--provider", "twilio"],
            (4,),
            id="provider-from-detail",
        ),
        pytest.param(
            {"tenant_id": "{tenant}", "outcome": "denied"},
            ["--tenant", "{tenant}", "--denied"],
            (2,),
            id="denied",
        ),
        pytest.param(
            {"tenant_id": "{tenant}", "since": _iso(1), "until": _iso(4)},
            ["--tenant", "{tenant}", "--since", _iso(1), "--until", _iso(4)],
            (1, 2),
            id="until-is-exclusive",
        ),
        pytest.param(
            {"tenant_id": "{tenant}", "since": _iso(4), "until": _iso(5)},
            ["--tenant", "{tenant}", "--since", _iso(4), "--until", _iso(5)],
            (4,),
            id="since-is-inclusive",
        ),
    ],
)
def test_the_api_and_the_cli_answer_the_same(
    client: TestClient,
    trail: Trail,
    api: dict[str, str],
    cli: list[str],
    expected: tuple[int, ...],
) -> None:
    names = {"tenant": trail.tenant, "alice": trail.alice}
    api_params = {k: v.format(**names) for k, v in (WINDOW | api).items()}
    cli_options = [v.format(**names) for v in cli]
    if "--since" not in cli_options:
        cli_options += ["--since", WINDOW["since"], "--until", WINDOW["until"]]
    from_api = api_probes(client, api_params)
    assert from_api == _probes(trail, *expected)
    assert cli_probes(trail, cli_options) == from_api


def test_the_api_pages_over_exactly_the_matching_events(client: TestClient, trail: Trail) -> None:
    params = {"tenant_id": trail.tenant, **WINDOW}
    every = client.get("/v1/audit/events", params=params, headers=AUDITOR).json()
    first = client.get("/v1/audit/events", params=params | {"limit": 2}, headers=AUDITOR).json()
    rest = client.get(
        "/v1/audit/events",
        params=params | {"after_id": first[-1]["id"]},
        headers=AUDITOR,
    ).json()
    assert [e["id"] for e in first + rest] == [e["id"] for e in every]
    assert len(every) == 5


def test_an_unknown_provider_filter_is_refused_without_echoing_it(client: TestClient) -> None:
    pasted = "sk_live_" + "Z9" * 10
    response = client.get("/v1/audit/events", params={"provider": pasted}, headers=AUDITOR)
    assert response.status_code == 422
    assert pasted not in response.text


def test_the_sql_reads_tenant_and_provider_as_the_timeline_shows_them(
    engine: Engine, trail: Trail
) -> None:
    run = trail.alice.removeprefix("alice-")
    with Session(engine) as session:
        found = session.exec(
            select(AuditEvent, query.resource_tenant(), query.event_provider()).where(
                col(AuditEvent.action).startswith(f"probe.{run}.")
            )
        ).all()
    assert len(found) == 7
    for event, tenant, provider in found:
        row = trail_row(event)
        assert (tenant or event.tenant_id, provider) == (row.tenant, row.provider), event.resource


def test_a_vault_log_window_is_half_open_too() -> None:
    from broker.audit.vault_log import Filters

    window = Filters(since=T0, until=T0 + timedelta(seconds=1))
    assert window.time_ok(T0)
    assert not window.time_ok(T0 + timedelta(seconds=1))
