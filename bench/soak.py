"""Memory under a long fetch soak: the broker's resident set, sampled as the load runs.

`run(bench, tenants, requests=100_000, rate=..., max_s=600)` drives
`GET /v1/credentials/{tenant}/shopify` at c=8 with wrk, in rounds of about
`requests / ROUNDS` fetches each (sized from the rate of the round before,
the first from `rate`), and reads the broker's VmRSS from /proc before the
soak and after each round, until `requests` fetches were answered or `max_s`
have passed (then `complete` is false). Each round starts where the one before
left off in the list of tenants (wrk's two threads half the list apart), so
the soak goes round every tenant, not the first few again and again: one pass
over every tenant takes as many requests as there are tenants.

Flat memory means the last sample is where the soak left it once it had been
round every tenant (`growth_after_full_pass_kb`): a leak grows with the
requests, a cache warming up does not grow past its first pass. The growth
after the first round and the peak (VmHWM, reset when the soak begins) are
recorded too. It measures; it asserts nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from bench import wrk

if TYPE_CHECKING:
    from bench.run import Bench

log = logging.getLogger("bench")

CONCURRENCY = 8
ROUNDS = 20
MIN_ROUND_S = 1.0
# The c=8 rate assumed when the run measured none before the soak.
GUESSED_RATE = 300.0
# wrk's threads at c=8, spread evenly over the targets.
THREADS = wrk.threads_for(CONCURRENCY)


def run(
    bench: Bench, tenants: list[str], *, requests: int, rate: float, max_s: float
) -> dict[str, Any]:
    """Soak the fetch path with `requests` requests (at most `max_s`); VmRSS after each round.

    `rate` (requests per second expected at c=8, from an earlier figure) sizes the
    first round; each later one is sized from the rate the round before it reached.
    """
    targets = bench.fetch_targets(tenants)
    per_round = max(1, requests // ROUNDS)
    log.info(
        "memory soak: %d fetches over %d tenants, at most %.0f s", requests, len(tenants), max_s
    )
    start = bench.broker.memory_kb()
    peak_reset = bench.broker.reset_peak()
    samples: list[dict[str, int]] = []
    done = errors = offset = 0
    began = time.monotonic()
    while done < requests and (left_s := max_s - (time.monotonic() - began)) >= MIN_ROUND_S:
        round_s = min(left_s, max(MIN_ROUND_S, min(per_round, requests - done) / max(rate, 1.0)))
        result = wrk.measure(
            {
                "name": "memory soak",
                "base_url": bench.broker.url,
                "concurrency": CONCURRENCY,
                "duration_s": round_s,
                "warmup_s": 0,
                "targets": targets[offset:] + targets[:offset],
            }
        )
        done += int(result["requests"])
        errors += int(result["non_2xx_3xx"]) + sum(result["errors"].values())
        rate = float(result["rps"]) or rate
        offset = (offset + int(result["requests"]) // THREADS) % len(targets)
        samples.append({"requests": done, "rss_kb": bench.broker.memory_kb()["VmRSS"]})
    figures = summarise(start, samples, errors, peak_reset, bench.broker.memory_kb())
    return {
        **figures,
        "tenants": len(tenants),
        "target_requests": requests,
        "complete": done >= requests,
        "seconds": round(time.monotonic() - began, 1),
        **full_pass(samples, len(tenants)),
    }


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


def full_pass(samples: list[dict[str, int]], pass_requests: int) -> dict[str, Any]:
    """The growth from the first sample taken after one pass over every tenant to the last.

    None when no sample came after that one: the soak was too short to tell.
    """
    after = [s for s in samples if s["requests"] >= pass_requests]
    if len(after) < 2:
        return {"rss_after_full_pass_kb": None, "growth_after_full_pass_kb": None}
    return {
        "rss_after_full_pass_kb": after[0]["rss_kb"],
        "growth_after_full_pass_kb": after[-1]["rss_kb"] - after[0]["rss_kb"],
    }


def describe(soak: dict[str, Any]) -> str:
    """One line for the bench table."""
    after_pass = soak.get("growth_after_full_pass_kb")
    return (
        f"memory soak: {soak['requests']} fetches at c{soak['concurrency']} over "
        f"{soak.get('tenants', '?')} tenants: VmRSS "
        f"{soak['rss_before_kb'] / 1024:.1f} MiB before, "
        f"{soak['rss_after_first_round_kb'] / 1024:.1f} MiB after the first round, "
        f"{soak['rss_last_kb'] / 1024:.1f} MiB at the end "
        f"({soak['growth_after_first_round_kb']:+d} KiB; after a full pass "
        f"{'n/a' if after_pass is None else f'{after_pass:+d} KiB'}; "
        f"peak {soak['peak_rss_kb'] / 1024:.1f} MiB, {soak['rounds']} samples)"
    )
