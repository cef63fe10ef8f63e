"""Blocking work on a pool of threads of its own, with a bounded wait for a free one.

A request that runs blocking work on a limited pool (the fetch threads of
`BROKER_VAULT_THREADS`, the JWKS verifications) must not queue without end behind work
it has nothing to do with: when a provider answers slowly, its mints or refreshes can
hold every thread of the pool for their whole timeout, and every request after them
would wait in line. `run_on` waits at most `wait_s` for a thread, then gives up with
503 and Retry-After; nothing of the work has started then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from broker.core.errors import UpstreamUnavailable

T = TypeVar("T")


async def run_on(
    threads: anyio.CapacityLimiter,
    work: Callable[[], T],
    *,
    wait_s: float,
    retry_after_s: int,
) -> T:
    """`work()` on one of `threads`, waiting at most `wait_s` for one to be free."""
    try:
        with anyio.fail_after(wait_s):
            await threads.acquire()
    except TimeoutError:
        raise UpstreamUnavailable("the broker is busy; retry", retry_after=retry_after_s) from None
    try:
        # The thread is `threads`' token, held above: no other limit applies to it.
        return await anyio.to_thread.run_sync(work, limiter=anyio.CapacityLimiter(math.inf))
    finally:
        threads.release()
