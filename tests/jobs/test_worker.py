"""Worker processes on the real PostgreSQL: kills, locks, periodic ticks, SIGTERM."""

from __future__ import annotations

import signal
import uuid
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from broker.core.db import unit_of_work
from broker.jobs.defer import defer
from tests.jobs.tasks import hang_first_attempt, work
from tests.support.workers import BROKER_WORKER, Workers, registered_workers, runs, wait_for


def _job(engine: Engine, job_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT status, attempts FROM procrastinate_jobs WHERE id = :id"), {"id": job_id}
        ).one()


def _key() -> str:
    return uuid.uuid4().hex[:12]


def test_a_job_whose_worker_is_killed_is_completed_by_another_worker(
    workers: Workers, engine: Engine, tmp_path: Path
) -> None:
    key = _key()
    first = workers.start()
    with unit_of_work(engine) as session:
        job_id = defer(session, hang_first_attempt, args={"key": key}, lock=f"hold:{key}")
    assert job_id is not None
    wait_for(lambda: runs(tmp_path, key), timeout_s=20, what="the first attempt to start")
    assert _job(engine, job_id).status == "doing"

    second = workers.start()
    first.send_signal(signal.SIGKILL)  # mid-job: no shutdown, no status update, no heartbeat
    first.wait(timeout=10)

    wait_for(lambda: _job(engine, job_id).status == "succeeded", timeout_s=30, what="a retry")
    assert _job(engine, job_id).attempts == 2  # the killed attempt, and the one that finished
    events = [(event, pid) for event, _, pid, _ in runs(tmp_path, key)]
    assert events == [("start", first.pid), ("start", second.pid), ("end", second.pid)]


def test_a_killed_job_with_a_successor_waiting_gives_way_to_it(
    workers: Workers, engine: Engine, tmp_path: Path
) -> None:
    # A periodic task's lock and queueing lock: while a killed run still shows "doing",
    # the next tick queues its successor. Retrying the killed run would break the
    # queueing lock; leaving it "doing" would hold the lock, and the successor, for ever.
    key = _key()
    held = f"periodic:{key}"
    first = workers.start()
    with unit_of_work(engine) as session:
        stalled = defer(
            session,
            hang_first_attempt,
            args={"key": f"{key}-killed"},
            lock=held,
            queueing_lock=held,
        )
    assert stalled is not None
    wait_for(lambda: runs(tmp_path, key), timeout_s=20, what="the first attempt to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    with unit_of_work(engine) as session:
        successor = defer(
            session, work, args={"key": f"{key}-next", "seconds": 0}, lock=held, queueing_lock=held
        )
    assert successor is not None

    workers.start()
    wait_for(
        lambda: _job(engine, successor).status == "succeeded", timeout_s=30, what="the successor"
    )
    assert _job(engine, stalled).status == "failed"
    assert [event for event, *_ in runs(tmp_path, f"{key}-killed")] == ["start"]
    assert [event for event, *_ in runs(tmp_path, f"{key}-next")] == ["start", "end"]


def test_two_workers_never_run_jobs_of_one_lock_at_once(
    workers: Workers, engine: Engine, tmp_path: Path
) -> None:
    test = _key()
    lock, free = f"{test}-locked", f"{test}-free"
    workers.start()
    workers.start()
    ids = []
    with unit_of_work(engine) as session:
        for n in range(3):
            ids.append(defer(session, work, args={"key": f"{lock}-{n}", "seconds": 0.6}, lock=lock))
            ids.append(defer(session, work, args={"key": f"{free}-{n}", "seconds": 0.6}))
    wait_for(
        lambda: all(_job(engine, i).status == "succeeded" for i in ids),  # type: ignore[arg-type]
        timeout_s=30,
        what="every job",
    )

    spans: dict[str, dict[str, float]] = {}
    pids = set()
    for event, key, pid, at in runs(tmp_path, test):
        spans.setdefault(key, {})[event] = at
        pids.add(pid)

    def overlapping(prefix: str) -> bool:
        mine = [(s["start"], s["end"]) for k, s in spans.items() if k.startswith(prefix)]
        assert len(mine) == 3
        return any(a[0] < b[1] and b[0] < a[1] for a, b in combinations(mine, 2))

    assert not overlapping(lock)
    # The same workers did run unlocked jobs side by side: it is the lock that kept them apart.
    assert overlapping(free)
    assert len(pids) == 2


def test_a_periodic_tick_runs_once_with_two_workers(workers: Workers, tmp_path: Path) -> None:
    workers.start(JOBS_TEST_TICK="1")
    workers.start(JOBS_TEST_TICK="1")
    wait_for(
        lambda: sum(event == "tick" for event, *_ in runs(tmp_path)) >= 4,
        timeout_s=20,
        what="four ticks",
    )
    ticks = [key for event, key, _, _ in runs(tmp_path) if event == "tick"]
    assert len(ticks) == len(set(ticks)), ticks


def test_broker_worker_stops_cleanly_on_sigterm(workers: Workers, engine: Engine) -> None:
    before = registered_workers(engine)
    proc = workers.start(BROKER_WORKER)
    mine = registered_workers(engine) - before
    assert len(mine) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, workers.output(proc)
    # It deregistered on its way out: a stop, not a crash whose jobs wait for a retry.
    assert not mine & registered_workers(engine)


def test_a_job_running_at_sigterm_finishes_before_the_worker_exits(
    workers: Workers, engine: Engine, tmp_path: Path
) -> None:
    key = _key()
    proc = workers.start()
    with unit_of_work(engine) as session:
        job_id = defer(session, work, args={"key": key, "seconds": 1.5})
    assert job_id is not None
    wait_for(lambda: runs(tmp_path, key), timeout_s=20, what="the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, workers.output(proc)
    assert _job(engine, job_id).status == "succeeded"
    assert [event for event, *_ in runs(tmp_path, key)] == ["start", "end"]
