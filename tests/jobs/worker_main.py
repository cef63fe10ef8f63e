"""A test worker process: the broker's own runner, which also knows the test tasks."""

from __future__ import annotations

import asyncio

import tests.jobs.tasks  # noqa: F401  (registers the test tasks)
from broker.core.config import get_settings
from broker.jobs.worker import run_worker

if __name__ == "__main__":
    asyncio.run(run_worker(get_settings(), concurrency=2))
