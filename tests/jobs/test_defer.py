"""Deferring inside the caller's transaction: the job exists exactly when the work commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from broker.core.db import unit_of_work
from broker.jobs.defer import defer
from broker.models import Tenant, utcnow
from tests.jobs.tasks import work


def _jobs_for(engine: Engine, key: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT status FROM procrastinate_jobs WHERE args->>'key' = :key"),
                {"key": key},
            ).scalars()
        )


@pytest.fixture(autouse=True)
def _no_jobs_left_behind(engine: Engine) -> Iterator[None]:
    """Jobs queued here are only looked at: workers of later tests must not find them."""
    yield
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM procrastinate_jobs WHERE task_name = 'tests.work'"))


def _tenant(tenant_id: str) -> Tenant:
    return Tenant(id=tenant_id, name="Shop", created_at=utcnow(), created_by="test")


def test_a_job_deferred_in_a_committed_transaction_is_queued_with_the_change(
    engine: Engine,
) -> None:
    key = uuid.uuid4().hex
    with unit_of_work(engine) as session:
        session.add(_tenant(f"t-{key[:12]}"))
        job_id = defer(session, work, args={"key": key, "seconds": 0})
    assert isinstance(job_id, int)
    assert _jobs_for(engine, key) == ["todo"]


def test_a_job_deferred_in_a_rolled_back_transaction_never_exists(engine: Engine) -> None:
    key = uuid.uuid4().hex

    def change_that_fails() -> None:
        with unit_of_work(engine) as session:
            session.add(_tenant(f"t-{key[:12]}"))
            defer(session, work, args={"key": key, "seconds": 0})
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        change_that_fails()
    assert _jobs_for(engine, key) == []
    with Session(engine) as session:
        assert session.get(Tenant, f"t-{key[:12]}") is None


def test_a_second_job_under_one_queueing_lock_is_refused_without_spoiling_the_transaction(
    engine: Engine,
) -> None:
    key = uuid.uuid4().hex
    with unit_of_work(engine) as session:
        first = defer(session, work, args={"key": key, "seconds": 0}, queueing_lock=key)
        second = defer(session, work, args={"key": key, "seconds": 0}, queueing_lock=key)
        # The caller's transaction goes on and commits.
        session.add(_tenant(f"t-{key[:12]}"))
    assert first is not None
    assert second is None
    assert _jobs_for(engine, key) == ["todo"]
    with Session(engine) as session:
        assert session.get(Tenant, f"t-{key[:12]}") is not None


def test_a_job_can_wait_before_it_may_run(engine: Engine) -> None:
    key = uuid.uuid4().hex
    with unit_of_work(engine) as session:
        defer(session, work, args={"key": key, "seconds": 0}, schedule_in_s=600)
    with engine.connect() as conn:
        wait = conn.execute(
            text(
                "SELECT extract(epoch FROM scheduled_at - now()) FROM procrastinate_jobs"
                " WHERE args->>'key' = :key"
            ),
            {"key": key},
        ).scalar_one()
    assert 500 < wait <= 600
