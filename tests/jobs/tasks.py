"""Tasks that exist only in the tests' worker processes; each run leaves lines in a file.

A line is `<event> <key> <pid> <unix time>`, appended with one write to
`$JOBS_TEST_DIR/runs.log`, so runs in several worker processes can be compared.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from procrastinate import JobContext

from broker.jobs.app import app

QUEUE = "tests"


def record(event: str, key: str) -> None:
    """Append one line to the shared log."""
    line = f"{event} {key} {os.getpid()} {time.time():.6f}\n".encode()
    path = Path(os.environ["JOBS_TEST_DIR"]) / "runs.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="tests.work", queue=QUEUE)
def work(key: str, seconds: float) -> None:
    """Take `seconds`, recording start and end."""
    record("start", key)
    time.sleep(seconds)
    record("end", key)


@app.task(name="tests.hang_first_attempt", queue=QUEUE, pass_context=True)
def hang_first_attempt(context: JobContext, key: str) -> None:
    """The first attempt never ends (its worker gets killed); a retry completes at once."""
    record("start", key)
    if context.job.attempts == 0:
        time.sleep(120)  # bounded anyway, should the test fail to kill it
    record("end", key)


if os.environ.get("JOBS_TEST_TICK"):

    @app.periodic(cron="* * * * * *")
    @app.task(name="tests.tick", queue=QUEUE)
    def tick(timestamp: int) -> None:
        """Once a second, across all workers."""
        record("tick", str(timestamp))
