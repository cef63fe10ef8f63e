"""Rate limits shared through a real Redis: a blip degrades them visibly, and they come back.

The blip is a real fault: redis-server is SIGSTOPped (calls time out) and then
SIGCONTinued. Skipped, with the reason, when redis-server is not installed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from broker.core.errors import RateLimited
from broker.core.ratelimit import RateLimiter
from tests.support.redis import redis_server

RECOVERY_DEADLINE_S = 15.0  # generous: a reconnect is due every 0.2 s below


@pytest.fixture
def redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server on a free loopback port, and its URL."""
    with redis_server() as started:
        yield started


def test_replicas_return_to_the_shared_limit_after_a_redis_blip(
    redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = redis
    replicas = [RateLimiter(url, {"fetch": "3/minute"}, reconnect_every_s=0.2) for _ in range(2)]
    assert not any(replica.degraded for replica in replicas)

    proc.send_signal(signal.SIGSTOP)
    try:
        for replica in replicas:
            replica.hit("fetch", "during-the-blip")  # still limited, in memory
        assert all(replica.degraded for replica in replicas)
    finally:
        proc.send_signal(signal.SIGCONT)

    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while any(replica.degraded for replica in replicas):  # as /readyz would poll it
        assert time.monotonic() < deadline, "the replicas never went back to Redis"
        time.sleep(0.05)

    first, second = replicas
    first.hit("fetch", "after-the-blip")
    first.hit("fetch", "after-the-blip")
    second.hit("fetch", "after-the-blip")
    with pytest.raises(RateLimited):
        second.hit("fetch", "after-the-blip")  # the other replica spent the shared budget
