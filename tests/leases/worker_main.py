"""A `broker worker` for tests whose clock follows `BROKER_TEST_CLOCK_FILE` (a FakeClock)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.core.config import get_settings
from broker.jobs.worker import run_worker


def main() -> None:
    """Run the broker's worker on every queue, judging lease ends by the test's clock."""
    clock_file = Path(os.environ["BROKER_TEST_CLOCK_FILE"])

    def clock() -> datetime:
        try:
            offset = float(clock_file.read_text() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return datetime.now(UTC) + timedelta(seconds=offset)

    asyncio.run(run_worker(get_settings(), concurrency=2, clock=clock))


if __name__ == "__main__":
    main()
