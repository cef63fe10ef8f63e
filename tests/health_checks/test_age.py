"""Credential age: rotation due dates, reminders once per version, and the platform's report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from broker.cli import app as cli
from broker.core.config import Settings, get_settings
from broker.credential_health import age
from broker.events import outbox
from broker.models import Event, IntegrationCredential, utcnow
from tests.fakes.providers import FakeProviders
from tests.health_checks.test_health import check_now, health, own_twilio
from tests.integrations.test_routes import put, valid_fields
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

REPORT = "/v1/platform/credentials/report"
OPS = bearer(token("platform:admin", subject="ops"))


def age_events(engine: Engine, tenant: str) -> list[tuple[str, str | None]]:
    with Session(engine) as session:
        return [
            (e.type, e.state)
            for e in session.exec(
                select(Event)
                .where(Event.tenant_id == tenant)
                .where(col(Event.type).in_([outbox.ROTATION_DUE, outbox.EXPIRING]))
                .order_by(col(Event.id))
            )
        ]


def age_back(engine: Engine, tenant: str, provider: str, days: int) -> None:
    """Make a stored credential `days` older, as if it had been saved back then."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE integration_credentials SET rotated_at = rotated_at - make_interval("
                "days => :d), first_stored_at = first_stored_at - make_interval(days => :d)"
                " WHERE tenant_id = :t AND provider = :p"
            ),
            {"d": days, "t": tenant, "p": provider},
        )


def test_a_credential_shows_its_age_and_rotation_due_date(
    client: TestClient, providers: FakeProviders, settings: Settings, tenant: str
) -> None:
    assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    shown = health(client, tenant, "openai")["age"]
    assert shown["state"] == "ok"
    assert shown["created_at"] == shown["rotated_at"]
    period = age.rotation_period(settings, "openai")
    assert shown["rotation_due_at"] is not None
    rotated = shown["rotated_at"].replace("Z", "+00:00")
    assert datetime.fromisoformat(shown["rotation_due_at"]) - datetime.fromisoformat(rotated) == (
        period
    )


def test_reminders_go_out_once_before_due_and_once_overdue_and_restart_on_rotation(
    client: TestClient, engine: Engine, providers: FakeProviders, settings: Settings, tenant: str
) -> None:
    fields = valid_fields("openai", providers)
    assert put(client, tenant, "openai", fields).status_code == 200
    period = age.rotation_period(settings, "openai")
    soon = utcnow() + period - timedelta(days=1)
    age.sweep(engine, settings, now=soon)
    age.sweep(engine, settings, now=soon)
    assert age_events(engine, tenant) == [(outbox.ROTATION_DUE, "due")]
    age.sweep(engine, settings, now=soon + timedelta(days=2))
    assert age_events(engine, tenant) == [
        (outbox.ROTATION_DUE, "due"),
        (outbox.ROTATION_DUE, "overdue"),
    ]
    # Rotating the key (a new version) starts the clock again.
    rotated = {**fields, "api_key": "sk-proj-" + "r" * 48}
    providers.accept("openai", **rotated)
    assert put(client, tenant, "openai", rotated).status_code == 200
    age.sweep(engine, settings)
    assert len(age_events(engine, tenant)) == 2
    assert health(client, tenant, "openai")["age"]["state"] == "ok"


@pytest.mark.parametrize(
    ("provider", "expires_in", "expected"),
    [
        ("whatsapp", timedelta(days=30), "ok"),
        ("whatsapp", timedelta(days=3), "expiring"),
        ("whatsapp", timedelta(hours=-1), "expired"),
        # Shopify's tokens are refreshed by the broker: their hourly expiry is no concern.
        ("shopify", timedelta(hours=-1), "ok"),
    ],
)
def test_oauth_expiry_states(
    settings: Settings, provider: str, expires_in: timedelta, expected: str
) -> None:
    now = utcnow()
    row = IntegrationCredential(
        tenant_id="t",
        provider=provider,
        configured=True,
        credential_kind="oauth",
        token_expires_at=now + expires_in,
        first_stored_at=now - timedelta(days=1),
        rotated_at=now - timedelta(days=1),
    )
    assert age.age_of(row, settings, now).state == expected


def test_the_platform_sees_overdue_and_failing_credentials_across_tenants(
    client: TestClient, engine: Engine, providers: FakeProviders, settings: Settings
) -> None:
    old, broken = make_tenant(client), make_tenant(client)
    assert put(client, old, "openai", valid_fields("openai", providers)).status_code == 200
    age_back(engine, old, "openai", age.rotation_period(settings, "openai").days + 1)
    fields = own_twilio(client, providers, broken)
    providers.revoke("twilio", auth_token=fields["auth_token"])
    check_now(client, broken, "twilio")
    assert check_now(client, broken, "twilio")["state"] == "failing"

    response = client.get(REPORT, params={"limit": 10000}, headers=OPS)
    assert response.status_code == 200, response.text
    found = {(r["tenant_id"], r["provider"]): r for r in response.json()}
    assert found[(old, "openai")]["problems"] == ["overdue"]
    assert found[(broken, "twilio")]["problems"] == ["failing"]
    assert fields["auth_token"] not in response.text
    overdue = client.get(REPORT, params={"problem": "overdue", "limit": 10000}, headers=OPS)
    assert (broken, "twilio") not in {(r["tenant_id"], r["provider"]) for r in overdue.json()}
    tenant_admin = bearer(token("tenant:admin", tenant_id=old))
    assert client.get(REPORT, headers=tenant_admin).status_code == 403

    age.sweep(engine, settings)
    metrics = client.get("/metrics").text
    assert 'broker_credentials{age="overdue"' in metrics
    assert 'health="failing"' in metrics


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BROKER_ENV", "test")
    monkeypatch.setenv("BROKER_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_cli_report_lists_problems_and_exits_1(
    client: TestClient,
    engine: Engine,
    providers: FakeProviders,
    settings: Settings,
    tenant: str,
    cli_env: None,
) -> None:
    assert put(client, tenant, "openai", valid_fields("openai", providers)).status_code == 200
    age_back(engine, tenant, "openai", age.rotation_period(settings, "openai").days + 1)
    result = CliRunner().invoke(cli, ["credentials", "report", "--json", "--problem", "overdue"])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    mine = [r for r in rows if r["tenant_id"] == tenant]
    assert [(r["provider"], r["problems"]) for r in mine] == [("openai", ["overdue"])]
    unknown = CliRunner().invoke(cli, ["credentials", "report", "--problem", "stale"])
    assert unknown.exit_code == 2
