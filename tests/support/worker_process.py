"""`broker worker` for tests whose time is a `FakeClock(path)`: jobs judge expiry by it.

`python -m tests.support.worker_process` reads its settings from `BROKER_*` like
`broker worker`, and the time offset from `BROKER_TEST_CLOCK_FILE` (see
tests/support/broker_process.py). Stopped like any worker: SIGTERM, or killed.
"""

from __future__ import annotations

import asyncio

from broker.core.config import Settings
from broker.core.logging import configure_logging
from broker.jobs.worker import run_worker
from tests.support.broker_process import file_clock

if __name__ == "__main__":
    settings = Settings()
    configure_logging(settings.log_level)
    asyncio.run(run_worker(settings, clock=file_clock()))
