"""Denied requests are limited per principal, and a flood is one trail event per window."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.app import create_app
from broker.audit.denials import DenialTally
from broker.auth.principal import Principal
from broker.core.config import Settings
from broker.models import AuditEvent
from broker.vault.gateway import VaultGateway
from tests.support.tenants import make_tenant, new_tenant_id
from tests.support.tokens import bearer, token


def _events(engine: Engine, actor: str) -> list[AuditEvent]:
    with Session(engine) as session:
        query = select(AuditEvent).where(AuditEvent.actor == actor).order_by(col(AuditEvent.id))
        return list(session.exec(query))


def test_a_flood_of_denials_is_limited_and_summarised_in_the_trail(
    client: TestClient, settings: Settings, engine: Engine
) -> None:
    tenant = make_tenant(client)
    subject = f"nosy-{new_tenant_id()}"
    nosy = bearer(token("finance:view", tenant_id=tenant, subject=subject))
    admin = bearer(token("tenant:admin", tenant_id=tenant, subject=f"admin-{subject}"))
    tight = settings.model_copy(update={"rate_limit_denials": "3/minute"})
    # The app's own gateway: leaving the `with` block runs its shutdown, which closes it.
    app = create_app(tight, engine=engine, vault=VaultGateway.from_settings(tight))
    with TestClient(app) as limited:
        answers = [limited.get("/v1/tenants/settings", headers=nosy) for _ in range(10)]
        assert [a.status_code for a in answers] == [403] * 3 + [429] * 7
        assert all(int(a.headers["retry-after"]) > 0 for a in answers[3:])
        # Another principal behind the same address is not affected.
        assert limited.get("/v1/tenants/settings", headers=admin).status_code == 200
        assert len(_events(engine, f"user:{subject}")) == 3  # one per denial within the limit

    events = _events(engine, f"user:{subject}")
    individual, summary = events[:3], events[3:]
    assert [e.request_id for e in individual] == [a.headers["x-request-id"] for a in answers[:3]]
    [run] = summary
    assert (run.outcome, run.tenant_id, run.action) == (
        "denied",
        tenant,
        "GET /v1/tenants/settings",
    )
    assert run.detail["repeated"] == 7
    assert run.detail["status"] == 403
    assert run.request_id is None  # it stands for many requests, not the one that wrote it


def test_a_flood_of_refused_fetches_is_limited_and_summarised_in_the_trail(
    client: TestClient, settings: Settings, engine: Engine
) -> None:
    tenant = make_tenant(client)
    subject = f"prober-{new_tenant_id()}"
    prober = bearer(token("credentials:read", kind="service", tenants=(tenant,), subject=subject))
    tight = settings.model_copy(update={"rate_limit_denials": "3/minute"})
    app = create_app(tight, engine=engine, vault=VaultGateway.from_settings(tight))
    with TestClient(app) as limited:
        # Tenants it does not serve: each refusal would otherwise be a trail row of its own.
        answers = [
            limited.get(f"/v1/credentials/other-{i}/openai", headers=prober) for i in range(10)
        ]
        assert [a.status_code for a in answers] == [404] * 3 + [429] * 7
        assert all(int(a.headers["retry-after"]) > 0 for a in answers[3:])

    events = _events(engine, f"service:{subject}")
    individual, summary = events[:3], events[3:]
    assert [e.request_id for e in individual] == [a.headers["x-request-id"] for a in answers[:3]]
    [run] = summary
    assert (run.outcome, run.action) == ("denied", "credentials.fetch")
    assert run.detail["repeated"] == 7
    assert run.detail["status"] == 404


def test_failed_authentications_past_the_limit_are_summarised_in_the_trail(
    settings: Settings, engine: Engine
) -> None:
    tight = settings.model_copy(update={"rate_limit_auth_failures": "2/hour"})
    app = create_app(tight, engine=engine, vault=VaultGateway.from_settings(tight))
    tenant = new_tenant_id()  # only in the path: the summary is found by it
    forged = bearer(token("platform:admin", key="not-the-key-but-long-enough-for-hs256"))
    started = datetime.now(UTC)
    with TestClient(app) as limited:
        answers = [limited.get(f"/v1/tenants/{tenant}", headers=forged) for _ in range(6)]
        assert [a.status_code for a in answers] == [401] * 2 + [429] * 4

    with Session(engine) as session:
        events = list(
            session.exec(
                select(AuditEvent).where(
                    col(AuditEvent.request_id).in_([a.headers["x-request-id"] for a in answers])
                )
            )
        )
        summaries = [
            event
            for event in session.exec(
                select(AuditEvent).where(
                    AuditEvent.action == "GET /v1/tenants/{tenant_id}",
                    col(AuditEvent.request_id).is_(None),
                    col(AuditEvent.actor) == "anonymous",
                    col(AuditEvent.at) >= started,
                )
            )
            if event.detail.get("repeated") == 4
        ]
    assert len(events) == 2  # the two 401s; the 429s are counted instead
    assert summaries, "the refused attempts past the limit left no trace in the trail"
    assert summaries[-1].detail["status"] == 401


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0 - 1_800_000_000.0 % 60

    def __call__(self) -> float:
        return self.now


def test_the_tally_hands_back_each_window_once_it_closes() -> None:
    clock = Clock()
    tally = DenialTally(60, clock=clock)
    mallory = Principal(subject="mallory", kind="user", scopes=frozenset(), tenant_id="t")
    deny: dict[str, Any] = {"action": "GET /x", "resource": "/x", "status": 403, "reason": "no"}
    assert all(tally.add(principal=mallory, **deny) == [] for _ in range(5))
    assert tally.add(principal=None, **deny) == []  # another caller: another run
    assert tally.closed() == []
    clock.now += 60
    closed = tally.add(principal=mallory, **deny)  # the first hit of the next window
    assert sorted((run.principal == mallory, run.count) for run in closed) == [
        (False, 1),
        (True, 5),
    ]
    assert tally.closed() == []  # handed back once only
    [current] = tally.drain()
    assert current.count == 1
    assert tally.drain() == []
