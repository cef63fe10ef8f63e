"""A broker API process for tests: the app under uvicorn, with a clock that follows a file.

`python -m tests.support.broker_process` reads its settings from `BROKER_*` like
`broker serve`, and the time offset (seconds) from `BROKER_TEST_CLOCK_FILE`, which a
`FakeClock(path)` in the test writes. It stops by itself when its standard input
closes: the test that started it holds the other end. `BrokerProcess.start` is that test's
side: it starts one and waits until it answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn

from broker.app import create_app
from broker.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_S = 60


@dataclass
class BrokerProcess:
    """One broker process and its base URL."""

    url: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, url: str, env: dict[str, str], workdir: Path) -> BrokerProcess:
        """Start one with `env` (its whole environment) in `workdir` (no stray .env) and wait
        until it answers on `url`; its stderr goes to workdir/stderr.log."""
        with open(workdir / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.broker_process"],
                env=env | {"PYTHONPATH": str(ROOT)},
                cwd=workdir,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        broker = cls(url, proc)
        try:
            broker._wait_healthy(workdir / "stderr.log")
        except BaseException:
            broker.stop()
            raise
        return broker

    def _wait_healthy(self, log: Path) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            assert self.proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the broker process never answered"
            time.sleep(0.2)

    def stop(self) -> None:
        """Close its stdin (it stops by itself) and wait; killed if it does not."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def file_clock() -> Callable[[], datetime]:
    """The time a test's `FakeClock(path)` sets: now plus the offset in `BROKER_TEST_CLOCK_FILE`."""
    clock_file = Path(os.environ["BROKER_TEST_CLOCK_FILE"])

    def clock() -> datetime:
        try:
            offset = float(clock_file.read_text() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return datetime.now(UTC) + timedelta(seconds=offset)

    return clock


def main() -> None:
    """Serve until stdin closes."""
    settings = Settings()
    app = create_app(settings, clock=file_clock())
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None, lifespan="on")
    )

    def watch_parent() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_parent, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
