"""Real worker processes on the session's PostgreSQL and Vault, killed at the end if still alive.

Timings are short so a killed worker's jobs are retried within seconds: a
heartbeat every 0.5 s, stalled after 3 s without one, looked for every second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine, text

from broker.core.config import Settings

TEST_TIMINGS = {
    "BROKER_JOBS_HEARTBEAT_S": "0.5",
    "BROKER_JOBS_STALLED_AFTER_S": "3",
    "BROKER_JOBS_STALLED_CHECK_S": "1",
    "BROKER_JOBS_POLL_INTERVAL_S": "0.5",
}
TEST_WORKER = [sys.executable, "-m", "tests.jobs.worker_main"]
BROKER_WORKER = [sys.executable, "-m", "broker.cli", "worker"]
STARTUP_DEADLINE_S = 30


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker process: the session's services, test timings."""
    assert settings.database_url is not None
    assert settings.vault_token is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_ENV="test",
        BROKER_LOG_LEVEL="WARNING",
        BROKER_DATABASE_URL=settings.database_url.get_secret_value(),
        BROKER_VAULT_ADDRS=",".join(settings.vault_addrs),
        BROKER_VAULT_TOKEN=settings.vault_token.get_secret_value(),
        **TEST_TIMINGS,
    )
    env.update(extra)
    return env


def registered_workers(engine: Engine) -> set[int]:
    """Ids of the workers registered in the queue (running, or dead and not yet pruned)."""
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM procrastinate_workers")).scalars())


class Workers:
    """Starts worker processes and makes sure none outlives the test."""

    def __init__(self, settings: Settings, engine: Engine, log_dir: Path) -> None:
        self.settings = settings
        self.engine = engine
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str] | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start a worker and return once it has registered in the queue."""
        before = registered_workers(self.engine)
        output = (self.log_dir / f"worker-{len(self.started)}.log").open("wb")
        proc = subprocess.Popen(
            command or TEST_WORKER,
            env=worker_env(self.settings, JOBS_TEST_DIR=str(self.log_dir), **env),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        self.started.append(proc)
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not registered_workers(self.engine) - before:
            assert proc.poll() is None, self.output(proc)
            assert time.monotonic() < deadline, "the worker never registered"
            time.sleep(0.1)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """What a worker printed."""
        index = self.started.index(proc)
        return (self.log_dir / f"worker-{index}.log").read_text(errors="replace")

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def runs(log_dir: Path, prefix: str = "") -> list[tuple[str, str, int, float]]:
    """The lines the test tasks wrote for keys starting with `prefix`: (event, key, pid, time).

    Workers also run jobs other tests left queued; the keys tell them apart.
    """
    path = log_dir / "runs.log"
    if not path.exists():
        return []
    parsed = []
    for line in path.read_text().splitlines():
        event, key, pid, at = line.split()
        if key.startswith(prefix):
            parsed.append((event, key, int(pid), float(at)))
    return parsed


def wait_for(condition: Callable[[], object], *, timeout_s: float, what: str) -> None:
    """Poll `condition()` until true, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
