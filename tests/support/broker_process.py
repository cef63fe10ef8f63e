"""A broker API process for tests: the app under uvicorn, with a clock that follows a file.

`python -m tests.support.broker_process` reads its settings from `BROKER_*` like
`broker serve`, and the time offset (seconds) from `BROKER_TEST_CLOCK_FILE`, which a
`FakeClock(path)` in the test writes. It stops by itself when its standard input
closes: the test that started it holds the other end.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvicorn

from broker.app import create_app
from broker.core.config import Settings


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
