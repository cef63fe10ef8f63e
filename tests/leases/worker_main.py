"""A `broker worker` for tests whose clock follows `BROKER_TEST_CLOCK_FILE` (a FakeClock)."""

from __future__ import annotations

import asyncio

from broker.core.config import get_settings
from broker.jobs.worker import run_worker
from tests.support.broker_process import file_clock


def main() -> None:
    """Run the broker's worker on every queue, judging lease ends by the test's clock."""
    asyncio.run(run_worker(get_settings(), concurrency=2, clock=file_clock()))


if __name__ == "__main__":
    main()
