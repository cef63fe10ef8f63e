"""How throughput grows with `broker serve --workers N`: one replica, one or two cores.

With `workers` in BENCH_ONLY (the default runs every section), `bench.run`
serves a second broker on the same stack with `--workers 2` beside its own
one-worker broker (`replicas`), and measures every fetch and settings figure on
both, back to back at each concurrency: `fetch (broker)` and
`fetch (broker), 2 workers`, and so on (`report.named`). `gains` gives the
two-worker figure over the one-worker one; the summary's fetch/floor ratio
uses, at each concurrency, the faster of the two configurations (one replica
either way) and says which, with both shown.

    python -m bench.workers     # settings GET and PATCH, 1 and 2 workers
                                # (the same as BENCH_ONLY=settings,workers python -m bench.run)

It measures; it asserts nothing about time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from bench.report import CONCURRENCIES, FETCH, SETTINGS_GET, SETTINGS_PATCH, WORKER_COUNTS, named

if TYPE_CHECKING:
    from bench.run import BrokerProcess

# The worker counts compared: the bench's own broker has one.
COUNTS = WORKER_COUNTS


@contextmanager
def replicas(broker: BrokerProcess, counts: tuple[int, ...]) -> Iterator[dict[int, BrokerProcess]]:
    """`broker` (one worker) and, for every further count, a sibling served with that many."""
    with ExitStack() as stack:
        serving = {counts[0]: broker}
        for count in counts[1:]:
            serving[count] = stack.enter_context(broker.sibling(count))
        yield serving


def gains(results: dict[str, Any], counts: tuple[int, ...] = COUNTS) -> dict[str, Any]:
    """Throughput of the most workers over one, per figure measured both ways and concurrency."""
    found: dict[str, Any] = {"nproc": os.cpu_count(), "counts": list(counts)}
    for name in (FETCH, SETTINGS_GET, SETTINGS_PATCH):
        one, most = results.get(named(name, counts[0])), results.get(named(name, counts[-1]))
        if one is None or most is None:
            continue
        found[name] = {
            f"c{c}": round(most[f"c{c}"]["rps"] / one[f"c{c}"]["rps"], 3)
            if one[f"c{c}"]["rps"]
            else None
            for c in CONCURRENCIES
        }
    return found


def main() -> None:
    """Settings GET and PATCH with 1 and 2 workers: `bench.run` with those sections alone."""
    os.environ.setdefault("BENCH_ONLY", "settings,workers")
    from bench import run

    run.main()


if __name__ == "__main__":
    main()
