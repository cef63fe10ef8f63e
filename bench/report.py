"""The bench's output: the table it prints and the summary at the top of results.json.

The summary gathers, in one place, every figure issue 18 asks for, each taken
from the measurements of the same run (see `summary`); the table prints every
measurement, then the derived figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench import dynamic_leases, events, rotation, soak

if TYPE_CHECKING:
    from bench.run import Row

CONCURRENCIES = (1, 8)
CEILING = "loadgen ceiling"
FETCH = "fetch (broker)"
FLOOR = "fetch floor (Vault)"
SETTINGS_GET = "GET /v1/tenants/settings"
SETTINGS_PATCH = "PATCH /v1/tenants/settings"
MANY = "fetch (broker), many tenants"
MANY_FLOOR = "fetch floor (Vault), many"
REFRESHING = "fetch (broker), refreshing"
REFRESHED = "fetch (broker), oauth settled"
# The generator is not the bottleneck when its ceiling is at least this many times the
# fastest figure measured through it, and it used at most this share of one core.
CEILING_HEADROOM = 2.0
GEN_CPU_LIMIT = 0.5


# -- summary ----------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Every figure of issue 18, from this run's measurements."""
    return {
        "generator_check": generator_check(results),
        "fetch_floor": {f"c{c}": _floor(results[FLOOR][f"c{c}"]) for c in CONCURRENCIES},
        "fetch": {
            f"c{c}": {
                **_figure(results[FETCH][f"c{c}"]),
                "ratio_to_floor": results["ratios"][f"c{c}"]["throughput"],
            }
            for c in CONCURRENCIES
        },
        "settings_get": _by_concurrency(results[SETTINGS_GET]),
        "settings_patch": _by_concurrency(results[SETTINGS_PATCH]),
        "rotation": {
            k: results["rotation"].get(k)
            for k in ("secrets_rewrapped", "seconds", "secrets_per_s", "seconds_per_10000")
        },
        "legacy_migration": {
            k: results["legacy_migration"].get(k)
            for k in ("tenants", "tenants_per_second", "skipped")
            if k in results["legacy_migration"]
        },
        "scale": {
            "tenants": [results["scale"]["small_tenants"], results["scale"]["large_tenants"]],
            **{f"c{c}_p50_ratio": results["scale"][f"c{c}"]["p50_ratio"] for c in CONCURRENCIES},
        },
        "memory_soak": {
            k: results["memory_soak"][k]
            for k in (
                "requests",
                "rss_after_first_round_kb",
                "rss_last_kb",
                "growth_after_first_round_kb",
                "peak_rss_kb",
            )
        },
        "workers": results.get("workers", {}),
    }


def _figure(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("rps", "p50_ms", "p99_ms")}


def _by_concurrency(named: dict[str, Any]) -> dict[str, Any]:
    return {f"c{c}": _figure(named[f"c{c}"]) for c in CONCURRENCIES}


def _floor(result: dict[str, Any]) -> dict[str, Any]:
    """The in-series floor and each of its parts."""
    parts = {p["call"]: _figure(p) for p in result.get("parts", [])}
    return {"in_series": _figure(result), "parts": parts}


def generator_check(results: dict[str, Any]) -> dict[str, Any]:
    """Whether wrk had room to spare: its ceiling far above every figure, its CPU low."""
    rows = results.get("rows", [])
    measured = [r for r in rows if r["name"] != CEILING]
    check: dict[str, Any] = {}
    for c in CONCURRENCIES:
        ceiling = results[CEILING][f"c{c}"]["rps"]
        fastest = max((r["rps"] for r in measured if r["concurrency"] == c), default=0.0)
        check[f"c{c}"] = {
            "ceiling_rps": ceiling,
            "fastest_measured_rps": fastest,
            "headroom": round(ceiling / fastest, 1) if fastest else None,
        }
    floor_parts = [p for c in CONCURRENCIES for p in results[FLOOR][f"c{c}"].get("parts", [])]
    check["max_gen_cpu"] = max(
        [r["loadgen_cpu"] for r in measured] + [p["loadgen_cpu"] for p in floor_parts],
        default=0.0,
    )
    check["ok"] = check["max_gen_cpu"] <= GEN_CPU_LIMIT and all(
        (check[f"c{c}"]["headroom"] or 0) >= CEILING_HEADROOM for c in CONCURRENCIES
    )
    return check


# -- table ------------------------------------------------------------------------------


def table(rows: list[Row], results: dict[str, Any]) -> str:
    """The figures as a plain-text table, then the derived ones."""
    lines = [
        f"{'measurement':<30} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'gen cpu':>7}  note",
        "-" * 92,
    ]
    for r in rows:
        lines.append(
            f"{r.name:<30} {r.concurrency:>4} {r.rps:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.loadgen_cpu:>6.0%}  {r.note}"
        )
    lines.append("")
    lines.extend(_generator_lines(results))
    lines.extend(_fetch_lines(results))
    lines.append(rotation.describe(results["rotation"]))
    lines.extend(_oauth_lines(results))
    lines.append(_legacy_line(results["legacy_migration"]))
    lines.extend(_dynamic_lines(results))
    lines.extend(events.describe(results["events"]))
    lines.extend(_memory_lines(results))
    lines.append(_workers_line(results.get("workers", {})))
    m = results["machine"]
    lines.append(f"machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}")
    return "\n".join(lines)


def _generator_lines(results: dict[str, Any]) -> list[str]:
    check = results["summary"]["generator_check"]
    verdict = "not the bottleneck" if check["ok"] else "MAY BE THE BOTTLENECK"
    return [
        f"generator (wrk) {verdict}: ceiling "
        + ", ".join(
            f"{check[f'c{c}']['ceiling_rps']:.0f} req/s at c{c} "
            f"(x{check[f'c{c}']['headroom']} the fastest figure)"
            for c in CONCURRENCIES
        )
        + f"; at most {check['max_gen_cpu']:.0%} of a core"
    ]


def _fetch_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, key in (("fetch", "ratios"), ("wrapped fetch", "wrapped_ratios")):
        for c, r in results[key].items():
            lines.append(
                f"{label} broker/floor at {c}: p50 x{r['p50']}, p99 x{r['p99']}, "
                f"throughput x{r['throughput']}"
            )
    scale = results["scale"]
    for c in CONCURRENCIES:
        s = scale[f"c{c}"]
        lines.append(
            f"fetch latency, {scale['large_tenants']} vs {scale['small_tenants']} tenants at "
            f"c{c}: p50 x{s['p50_ratio']}, p99 x{s['p99_ratio']} "
            f"(Vault floor alone: p50 x{s['floor_p50_ratio']})"
        )
    return lines


def _oauth_lines(results: dict[str, Any]) -> list[str]:
    auth = results["oauth_refresh"]
    seed, drain = auth["seed"], auth["drain"]
    lines = [
        f"oauth seed: {seed['outcomes'].get('migrated', 0)} pasted tokens migrated to expiring "
        f"ones in {seed['seconds']} s = {seed['migrated_per_s']}/s ({seed['workers']} workers); "
        f"{seed['due_at_start']} inside the refresh window (expiries within "
        f"{seed['expiry_spread_s']} s)",
        f"oauth refresh: {drain['refresh_calls']} tokens refreshed through the fake Shopify in "
        f"{drain['seconds']} s = {drain['tokens_per_s']} tokens/s, runs back to back "
        f"({drain['refreshed_before_first_expiry']} before the first token expired, "
        f"{drain['expired_at_start']} already expired at the start, {drain['left_due']} left "
        f"due); by actor: {auth['refreshes_by_actor']}",
    ]
    for c in CONCURRENCIES:
        refreshing = results[REFRESHING][f"c{c}"]
        settled = results[REFRESHED][f"c{c}"]
        lines.append(
            f"fetch latency while refreshing vs settled at c{c}: "
            f"p50 {refreshing['p50_ms']:.2f} vs {settled['p50_ms']:.2f} ms, "
            f"p99 {refreshing['p99_ms']:.2f} vs {settled['p99_ms']:.2f} ms"
        )
    return lines


def _legacy_line(legacy: dict[str, Any]) -> str:
    if "skipped" in legacy:
        return f"legacy migration: skipped, {legacy['skipped']}"
    return (
        f"legacy migration: {legacy.get('tenants')} tenants, "
        f"{legacy.get('tenants_per_second')} tenants/s"
    )


def _dynamic_lines(results: dict[str, Any]) -> list[str]:
    dyn = results["dynamic_leases"]
    fresh, revocation = dyn["fresh_mint_c1"], dyn["revocation"]
    reuse = results[dynamic_leases.REUSE]
    return [
        "dynamic fetch: live lease reused p50 "
        + ", ".join(f"{reuse[f'c{c}']['p50_ms']:.2f} ms at c{c}" for c in CONCURRENCIES)
        + f"; fresh mint through the fake Twilio p50 {fresh['p50_ms']} ms, "
        f"p99 {fresh['p99_ms']} ms ({fresh['calls']} calls at c1)",
        f"lease revocation: {revocation['revoked']} of {revocation['leases']} due leases revoked "
        f"by one worker in {revocation['seconds_incl_worker_start']} s = "
        f"{revocation['leases_per_s']} leases/s ({revocation['fake_deletions']} deletions at "
        "the fake)",
    ]


def _memory_lines(results: dict[str, Any]) -> list[str]:
    mem = results["memory"]
    peak = mem["peak_rss_under_fetch_kb"]
    return [
        f"broker peak RSS under fetch load: {peak / 1024:.1f} MiB "
        f"(idle {mem['idle_rss_kb'] / 1024:.1f} MiB)",
        soak.describe(results["memory_soak"]),
    ]


def _workers_line(workers: dict[str, Any]) -> str:
    if not workers or "skipped" in workers:
        return f"broker workers 1 vs 2: skipped, {workers.get('skipped', 'not measured')}"
    return f"broker workers 1 vs 2: {workers}"
