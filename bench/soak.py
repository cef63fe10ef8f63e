"""Memory under a long fetch soak: the broker's resident set, sampled as the load runs.

`run(bench, tenants, requests=100_000)` drives `GET /v1/credentials/{tenant}/shopify`
over every tenant at c=8 with wrk, in rounds (about `ROUNDS` of them), and reads
the broker's VmRSS from /proc before the soak and after each round, until
`requests` fetches were answered. Flat memory means the last sample is where the
first round left it: a leak grows with the requests, a cache warming up does not
grow past its first round. The peak (VmHWM, reset when the soak begins) is
recorded too. It measures; it asserts nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bench import wrk

if TYPE_CHECKING:
    from bench.run import Bench

log = logging.getLogger("bench")

CONCURRENCY = 8
ROUNDS = 20
# Never more than this many rounds, whatever the rate turns out to be.
MAX_ROUNDS = 200
MIN_ROUND_S = 1.0


def run(bench: Bench, tenants: list[str], *, requests: int, rate: float) -> dict[str, Any]:
    """Soak the fetch path with `requests` requests; VmRSS before and after each round.

    `rate` (requests per second expected at c=8, from an earlier figure) sizes the rounds.
    """
    targets = bench.fetch_targets(tenants)
    round_s = max(MIN_ROUND_S, requests / max(rate, 1.0) / ROUNDS)
    log.info("memory soak: %d fetches over %d tenants", requests, len(tenants))
    start = bench.broker.memory_kb()
    peak_reset = bench.broker.reset_peak()
    samples: list[dict[str, int]] = []
    done = errors = 0
    while done < requests and len(samples) < MAX_ROUNDS:
        result = wrk.measure(
            {
                "name": "memory soak",
                "base_url": bench.broker.url,
                "concurrency": CONCURRENCY,
                "duration_s": round_s,
                "warmup_s": 0,
                "targets": targets,
            }
        )
        done += int(result["requests"])
        errors += int(result["non_2xx_3xx"]) + sum(result["errors"].values())
        samples.append({"requests": done, "rss_kb": bench.broker.memory_kb()["VmRSS"]})
    return summarise(start, samples, errors, peak_reset, bench.broker.memory_kb())


def summarise(
    start: dict[str, int],
    samples: list[dict[str, int]],
    errors: int,
    peak_reset: bool,
    end: dict[str, int],
) -> dict[str, Any]:
    """First round against last: the growth a leak would show."""
    first, last = samples[0], samples[-1]
    growth = last["rss_kb"] - first["rss_kb"]
    span = last["requests"] - first["requests"]
    return {
        "requests": last["requests"],
        "concurrency": CONCURRENCY,
        "rounds": len(samples),
        "unexpected_answers": errors,
        "rss_before_kb": start.get("VmRSS"),
        "rss_after_first_round_kb": first["rss_kb"],
        "rss_last_kb": last["rss_kb"],
        "growth_after_first_round_kb": growth,
        "growth_per_100k_requests_kb": round(growth / span * 100_000, 1) if span else None,
        "peak_rss_kb": end.get("VmHWM"),
        "peak_is_since_soak_began": peak_reset,
        "samples": samples,
    }


def describe(soak: dict[str, Any]) -> str:
    """One line for the bench table."""
    return (
        f"memory soak: {soak['requests']} fetches at c{soak['concurrency']}: VmRSS "
        f"{soak['rss_before_kb'] / 1024:.1f} MiB before, "
        f"{soak['rss_after_first_round_kb'] / 1024:.1f} MiB after the first round, "
        f"{soak['rss_last_kb'] / 1024:.1f} MiB at the end "
        f"({soak['growth_after_first_round_kb']:+d} KiB; "
        f"peak {soak['peak_rss_kb'] / 1024:.1f} MiB, {soak['rounds']} samples)"
    )
