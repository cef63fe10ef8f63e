"""The bench's output: the table it prints and the summary at the top of results.json.

The summary gathers, in one place, every figure issue 18 asks for, each taken
from the measurements of the same run (see `summary`), and under `targets`
each of the issue's targets with its measured figure and whether it was met.
A section the run did not select (BENCH_ONLY) has no figures: its entries say
"not run". The table prints every measurement, then the targets, then the
derived figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench import dynamic_leases, events, rotation, soak

if TYPE_CHECKING:
    from bench.run import Row

CONCURRENCIES = (1, 8)
CEILING = "loadgen ceiling"
HEALTHZ = "GET /healthz (broker)"
FETCH = "fetch (broker)"
FLOOR = "fetch floor (Vault)"
WRAPPED = "wrapped fetch (broker)"
WRAPPED_FLOOR = "wrapped floor (Vault)"
SETTINGS_GET = "GET /v1/tenants/settings"
SETTINGS_PATCH = "PATCH /v1/tenants/settings"
MANY = "fetch (broker), many tenants"
MANY_FIRST = "fetch (broker), many, first visits"
FEW = "fetch (broker), few, beside many"
FEW_FLOOR = "fetch floor (Vault), few, beside"
MANY_FLOOR = "fetch floor (Vault), many"
REFRESHING = "fetch (broker), refreshing"
REFRESHED = "fetch (broker), oauth settled"
NOT_RUN = "not run"
FAILED = "failed (see section_errors)"
# The worker counts of `broker serve` fetch and settings are measured with (`bench/workers.py`).
WORKER_COUNTS = (1, 2)
# The generator is not the bottleneck when its ceiling is at least this many times the
# fastest figure measured through it, and it used at most this share of one core.
CEILING_HEADROOM = 2.0
GEN_CPU_LIMIT = 0.5

# Issue 18's targets.
FETCH_RATIO_MIN = 0.7
SETTINGS_GET_MIN_RPS = 1500.0
SETTINGS_GET_MAX_P99_MS = 20.0
SETTINGS_PATCH_MIN_RPS = 500.0
ROTATION_SECRETS = 10_000
ROTATION_MAX_S = 30.0
LEGACY_ROWS = 10_000
LEGACY_MIN_PER_S = 100.0
SCALE_MAX_RATIO = 1.10
SOAK_REQUESTS = 100_000
# Flat: the resident set at the end within this share of where one full pass left it.
SOAK_FLAT_SHARE = 0.02


def named(name: str, workers: int) -> str:
    """A figure's name for a broker served with `workers` workers (one: the plain name)."""
    return name if workers == 1 else f"{name}, {workers} workers"


def ratio(results: dict[str, Any], a: str, b: str, c: int, key: str) -> float:
    """Figure `key` of `a` over the same of `b`, at concurrency `c`."""
    x, y = results[a][f"c{c}"][key], results[b][f"c{c}"][key]
    # Three places: a verdict against a target must not come from rounding.
    return round(x / y, 3) if y else float("nan")


def ratios(results: dict[str, Any], broker: str, floor: str) -> dict[str, Any]:
    """Broker over floor: latency (p50, p99) and throughput, per concurrency."""
    return {
        f"c{c}": {
            "p50": ratio(results, broker, floor, c, "p50_ms"),
            "p99": ratio(results, broker, floor, c, "p99_ms"),
            "throughput": ratio(results, broker, floor, c, "rps"),
        }
        for c in CONCURRENCIES
    }


def configurations(results: dict[str, Any], name: str, c: int) -> dict[str, dict[str, Any]]:
    """`name`'s figures at `c` for each worker count measured: `{"workers_1": ..., ...}`."""
    found = {}
    for workers in WORKER_COUNTS:
        figures = results.get(named(name, workers))
        if figures is not None:
            found[f"workers_{workers}"] = figures[f"c{c}"]
    return found


# -- summary ----------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Every figure of issue 18, from this run's measurements; "not run" where not selected."""
    return {
        "sections_run": results.get("sections_run", []),
        "sections_not_run": results.get("sections_not_run", []),
        "section_errors": results.get("section_errors", {}),
        "targets": targets(results),
        "generator_check": generator_check(results),
        "fetch_floor": _when(results, FLOOR, _fetch_floor),
        "fetch": _when(results, FETCH, _fetch),
        "settings_get": _when(results, SETTINGS_GET, lambda r: _by_workers(r, SETTINGS_GET)),
        "settings_patch": _when(results, SETTINGS_PATCH, lambda r: _by_workers(r, SETTINGS_PATCH)),
        "rotation": _when(results, "rotation", _rotation),
        "legacy_migration": _when(results, "legacy_migration", _legacy),
        "scale": _when(results, "scale", _scale),
        "memory_soak": _when(results, "memory_soak", _soak),
        "workers": results.get("workers", NOT_RUN),
    }


def _when(results: dict[str, Any], key: str, figures: Callable[[dict[str, Any]], Any]) -> Any:
    return figures(results) if key in results else NOT_RUN


def _figure(result: dict[str, Any]) -> dict[str, Any]:
    cpu = result.get("cpu_ms_per_request")
    return {
        **{k: result[k] for k in ("rps", "p50_ms", "p99_ms")},
        **({"cpu_ms_per_request": cpu} if cpu else {}),
    }


def _by_workers(results: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        f"c{c}": {k: _figure(f) for k, f in configurations(results, name, c).items()}
        for c in CONCURRENCIES
    }


def _fetch_floor(results: dict[str, Any]) -> dict[str, Any]:
    """The in-series floor and each of its parts."""
    return {f"c{c}": _floor(results[FLOOR][f"c{c}"]) for c in CONCURRENCIES}


def _floor(result: dict[str, Any]) -> dict[str, Any]:
    parts = {p["call"]: _figure(p) for p in result.get("parts", [])}
    return {"in_series": _figure(result), "parts": parts}


def _fetch(results: dict[str, Any]) -> dict[str, Any]:
    """Fetch per worker count with its ratio to the floor; the ratio quoted is the best."""
    return {f"c{c}": fetch_at(results, c) for c in CONCURRENCIES}


def fetch_at(results: dict[str, Any], c: int) -> dict[str, Any]:
    """Each configuration's fetch and ratio at `c`, the best ratio and which one it is.

    Beside the throughput ratio, `cpu_ratio_to_floor`: the floor's CPU per fetch
    over the fetch's, every process counted (broker, OpenBao, PostgreSQL). With
    every process on the same cores, that is the throughput ratio a CPU-bound
    machine would show, and other load on the machine barely moves it.
    """
    floor = results[FLOOR][f"c{c}"]
    shown = {
        k: {
            **_figure(f),
            "ratio_to_floor": round(f["rps"] / floor["rps"], 3) if floor["rps"] else None,
            "cpu_ratio_to_floor": _cpu_ratio(floor, f),
        }
        for k, f in configurations(results, FETCH, c).items()
    }
    best = max(shown, key=lambda k: shown[k]["rps"])
    return {**shown, "ratio_to_floor": shown[best]["ratio_to_floor"], "ratio_uses": best}


def _cpu_ratio(floor: dict[str, Any], fetch: dict[str, Any]) -> float | None:
    """All the CPU a floor iteration costs over all a fetch costs, when both were read."""
    floor_ms = sum((floor.get("cpu_ms_per_request") or {}).values())
    fetch_ms = sum(v or 0.0 for v in (fetch.get("cpu_ms_per_request") or {}).values())
    return round(floor_ms / fetch_ms, 3) if floor_ms and fetch_ms else None


def _rotation(results: dict[str, Any]) -> dict[str, Any]:
    keys = ("secrets_rewrapped", "secrets_per_tenant", "seconds", "secrets_per_s")
    return {k: results["rotation"].get(k) for k in (*keys, "seconds_per_10000", "failed")}


def _legacy(results: dict[str, Any]) -> dict[str, Any]:
    keys = ("tenants", "seconds", "tenants_per_second", "migrated", "failed")
    return {k: results["legacy_migration"].get(k) for k in keys}


def _scale(results: dict[str, Any]) -> dict[str, Any]:
    scale = results["scale"]
    return {
        "tenants": [scale["small_tenants"], scale["large_tenants"]],
        **{
            f"c{c}_{k}": scale[f"c{c}"].get(k)
            for c in CONCURRENCIES
            for k in ("p50_ratio", "p99_ratio", "first_visit_p50_ratio", "fetch_section_p50_ratio")
        },
    }


def _soak(results: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "requests",
        "complete",
        "tenants",
        "seconds",
        "rss_after_first_round_kb",
        "rss_after_full_pass_kb",
        "rss_last_kb",
        "growth_after_first_round_kb",
        "growth_after_full_pass_kb",
        "peak_rss_kb",
    )
    return {k: results["memory_soak"].get(k) for k in keys}


def generator_check(results: dict[str, Any]) -> dict[str, Any]:
    """Whether wrk had room to spare: its ceiling far above every figure, its CPU low."""
    measured = [r for r in results.get("rows", []) if r["name"] != CEILING]
    check: dict[str, Any] = {}
    for c in CONCURRENCIES:
        ceiling = results[CEILING][f"c{c}"]["rps"]
        fastest = max((r["rps"] for r in measured if r["concurrency"] == c), default=0.0)
        check[f"c{c}"] = {
            "ceiling_rps": ceiling,
            "fastest_measured_rps": fastest,
            "headroom": round(ceiling / fastest, 1) if fastest else None,
        }
    # The floors' rows are in series; wrk ran each of their parts alone.
    parts = [
        part
        for figure in results.values()
        if isinstance(figure, dict)
        for at in figure.values()
        if isinstance(at, dict)
        for part in at.get("parts", [])
    ]
    check["max_gen_cpu"] = max(
        [r["loadgen_cpu"] for r in measured] + [p["loadgen_cpu"] for p in parts], default=0.0
    )
    check["ok"] = check["max_gen_cpu"] <= GEN_CPU_LIMIT and all(
        (check[f"c{c}"]["headroom"] or 0) >= CEILING_HEADROOM for c in CONCURRENCIES
    )
    return check


# -- targets ----------------------------------------------------------------------------


def _target(
    item: str, target: str, measured: str | None = None, met: bool | None = None, **more: Any
) -> dict[str, Any]:
    """One of issue 18's targets; `measured` None: its section did not run."""
    if measured is None:
        return {"item": item, "target": target, "measured": NOT_RUN, "met": None}
    return {"item": item, "target": target, "measured": measured, "met": met, **more}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's targets, each with this run's figure and whether it was met.

    A target whose section was selected but failed says "failed" instead of "not run".
    """
    by_section = [
        ("", _generator_target(results)),
        *(("fetch", _fetch_target(results, c)) for c in CONCURRENCIES),
        ("settings", _settings_get_target(results)),
        ("settings", _settings_patch_target(results)),
        ("rotation", _rotation_target(results)),
        ("legacy", _legacy_target(results)),
        *(("scale", _scale_target(results, c)) for c in CONCURRENCIES),
        ("soak", _soak_target(results)),
        ("workers", _cores_target(results)),
    ]
    failed = results.get("section_errors", {})
    return [
        {**found, "measured": FAILED}
        if found["measured"] == NOT_RUN and section in failed
        else found
        for section, found in by_section
    ]


def _generator_target(results: dict[str, Any]) -> dict[str, Any]:
    check = generator_check(results)
    headroom = ", ".join(f"x{check[f'c{c}']['headroom']} at c{c}" for c in CONCURRENCIES)
    measured = f"ceiling {headroom} the fastest figure; wrk at most {check['max_gen_cpu']:.0%}"
    target = (
        f"floor and broker both driven by wrk; ceiling >= x{CEILING_HEADROOM} every figure, "
        f"wrk <= {GEN_CPU_LIMIT:.0%} of a core"
    )
    return _target("generator not the bottleneck", target, measured, check["ok"])


def _fetch_target(results: dict[str, Any], c: int) -> dict[str, Any]:
    item, target = f"fetch / floor at c={c}", f">= {FETCH_RATIO_MIN}x (throughput)"
    if FETCH not in results:
        return _target(item, target)
    fetch = fetch_at(results, c)
    shown = ", ".join(
        f"{k.replace('_', ' ')} x{fetch[k]['ratio_to_floor']} ({fetch[k]['rps']:.0f} rps; "
        f"by CPU x{fetch[k]['cpu_ratio_to_floor']})"
        for k in fetch
        if k.startswith("workers_")
    )
    measured = f"x{fetch['ratio_to_floor']} with {fetch['ratio_uses'].replace('_', ' ')} [{shown}]"
    best = fetch["ratio_to_floor"]
    return _target(item, target, measured, best is not None and best >= FETCH_RATIO_MIN)


def _settings_get_target(results: dict[str, Any]) -> dict[str, Any]:
    item = "settings GET at c=8"
    target = f">= {SETTINGS_GET_MIN_RPS:.0f} rps with p99 < {SETTINGS_GET_MAX_P99_MS:.0f} ms"
    if SETTINGS_GET not in results:
        return _target(item, target)
    shown = configurations(results, SETTINGS_GET, 8)
    met = any(
        f["rps"] >= SETTINGS_GET_MIN_RPS and f["p99_ms"] < SETTINGS_GET_MAX_P99_MS
        for f in shown.values()
    )
    measured = "; ".join(
        f"{k.replace('_', ' ')}: {f['rps']:.0f} rps, p99 {f['p99_ms']:.1f} ms"
        for k, f in shown.items()
    )
    return _target(item, target, measured, met)


def _settings_patch_target(results: dict[str, Any]) -> dict[str, Any]:
    item, target = "settings PATCH at c=8", f">= {SETTINGS_PATCH_MIN_RPS:.0f} rps"
    if SETTINGS_PATCH not in results:
        return _target(item, target)
    shown = configurations(results, SETTINGS_PATCH, 8)
    measured = "; ".join(f"{k.replace('_', ' ')}: {f['rps']:.0f} rps" for k, f in shown.items())
    met = max(f["rps"] for f in shown.values()) >= SETTINGS_PATCH_MIN_RPS
    return _target(item, target, measured, met)


def _rotation_target(results: dict[str, Any]) -> dict[str, Any]:
    item = "key rotation"
    target = f"{ROTATION_SECRETS:,} secrets in < {ROTATION_MAX_S:.0f} s"
    rot = results.get("rotation")
    if rot is None:
        return _target(item, target)
    secrets, per_10k = rot.get("secrets_rewrapped") or 0, rot.get("seconds_per_10000")
    # Several distributions of the secrets over tenants: the top level is the headline.
    measured = "; ".join(
        _rotation_figure(name, figure)
        for name, figure in (rot.get("distributions") or {"": rot}).items()
    )
    met = per_10k is not None and per_10k < ROTATION_MAX_S and not rot.get("failed")
    full = secrets >= ROTATION_SECRETS
    return _target(item, target, measured, met, full_size=full)


def _rotation_figure(name: str, figure: dict[str, Any]) -> str:
    label = f"{name.replace('_', ' ')}: " if name else ""
    return (
        f"{label}{figure.get('secrets_rewrapped')} secrets in {figure.get('seconds')} s "
        f"({figure.get('seconds_per_10000')} s per 10,000, {figure.get('failed', 0)} failed)"
    )


def _legacy_target(results: dict[str, Any]) -> dict[str, Any]:
    item = "legacy migration"
    target = f">= {LEGACY_MIN_PER_S:.0f} tenants/s on {LEGACY_ROWS:,} rows"
    legacy = results.get("legacy_migration")
    if legacy is None:
        return _target(item, target)
    rate = legacy.get("tenants_per_second")
    measured = (
        f"{legacy.get('tenants')} rows, {rate} tenants/s "
        f"({legacy.get('migrated')} migrated, {legacy.get('failed')} failed)"
    )
    met = rate is not None and rate >= LEGACY_MIN_PER_S and not legacy.get("failed")
    full = (legacy.get("tenants") or 0) >= LEGACY_ROWS
    return _target(item, target, measured, met, full_size=full)


def _scale_target(results: dict[str, Any], c: int) -> dict[str, Any]:
    item = f"fetch p50 at many vs few tenants, c={c}"
    target = f"within {SCALE_MAX_RATIO - 1:.0%} (ratio <= {SCALE_MAX_RATIO})"
    scale = results.get("scale")
    if scale is None:
        return _target(item, target)
    p50 = scale[f"c{c}"].get("p50_ratio")
    measured = (
        f"x{p50} ({scale['large_tenants']} vs {scale['small_tenants']} tenants, back to back, "
        f"each fetched before; Vault floor alone x{scale[f'c{c}'].get('floor_p50_ratio')}; "
        f"first visits x{scale[f'c{c}'].get('first_visit_p50_ratio')}; against the fetch "
        f"section's figure x{scale[f'c{c}'].get('fetch_section_p50_ratio')})"
    )
    met = p50 is not None and p50 <= SCALE_MAX_RATIO
    full = scale["large_tenants"] >= 10_000
    return _target(item, target, measured, met, full_size=full)


def _soak_target(results: dict[str, Any]) -> dict[str, Any]:
    item = "flat memory under the soak"
    target = (
        f"{SOAK_REQUESTS:,} fetches; VmRSS at the end within {SOAK_FLAT_SHARE:.0%} of where "
        "one pass over every tenant left it"
    )
    soaked = results.get("memory_soak")
    if soaked is None:
        return _target(item, target)
    growth, base = soaked.get("growth_after_full_pass_kb"), soaked.get("rss_after_full_pass_kb")
    measured = (
        f"{soaked['requests']} fetches over {soaked.get('tenants')} tenants: "
        + ("too short to tell" if growth is None else f"{growth:+d} KiB after a full pass")
        + f" ({soaked['growth_after_first_round_kb']:+d} KiB after the first round)"
    )
    met = None if growth is None or not base else growth <= SOAK_FLAT_SHARE * base
    full = soaked["requests"] >= SOAK_REQUESTS
    return _target(item, target, measured, met, full_size=full)


def _cores_target(results: dict[str, Any]) -> dict[str, Any]:
    item, target = "throughput from 1 to 2 workers", "grows (2 workers over 1, at c=8, > 1x)"
    gains = results.get("workers")
    if gains is None:
        return _target(item, target)
    measured_gains = {
        name: at["c8"] for name, at in gains.items() if isinstance(at, dict) and "c8" in at
    }
    measured = "; ".join(f"{name} x{g}" for name, g in measured_gains.items())
    met = bool(measured_gains) and all(g is not None and g > 1 for g in measured_gains.values())
    return _target(item, target, measured, met)


# -- table ------------------------------------------------------------------------------


def table(rows: list[Row], results: dict[str, Any]) -> str:
    """The figures as a plain-text table, then the targets, then the derived figures."""
    lines = [
        f"{'measurement':<38} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'gen cpu':>7} {'brk ms':>7} {'bao ms':>7} {'pg ms':>7}  note",
        "-" * 124,
    ]
    for r in rows:
        lines.append(
            f"{r.name:<38} {r.concurrency:>4} {r.rps:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.loadgen_cpu:>6.0%} "
            + " ".join(_ms(r.cpu_ms.get(n)) for n in ("broker", "vault", "postgres"))
            + f"  {r.note}"
        )
    lines.append(
        "brk/bao/pg ms: CPU per request of the broker (all its processes), OpenBao, PostgreSQL"
    )
    lines.append("")
    lines.extend(_generator_lines(results))
    lines.extend(_target_lines(results["summary"]["targets"]))
    lines.append("")
    for key, describe in (
        ("ratios", _fetch_lines),
        ("wrapped_ratios", _wrapped_lines),
        ("scale", _scale_lines),
        ("rotation", lambda r: [rotation.describe(r["rotation"])]),
        ("oauth_refresh", _oauth_lines),
        ("legacy_migration", lambda r: [_legacy_line(r["legacy_migration"])]),
        ("dynamic_leases", _dynamic_lines),
        ("events", lambda r: events.describe(r["events"])),
        ("memory", _memory_lines),
        ("memory_soak", lambda r: [soak.describe(r["memory_soak"])]),
        ("workers", lambda r: [_workers_line(r["workers"])]),
    ):
        if key in results:
            lines.extend(describe(results))
    not_run = results.get("sections_not_run", [])
    if not_run:
        lines.append(f"not run (BENCH_ONLY): {', '.join(not_run)}")
    for section, error in results.get("section_errors", {}).items():
        lines.append(f"FAILED section {section}: {error}")
    m = results["machine"]
    lines.append(f"machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.3f}"


def _target_lines(found: list[dict[str, Any]]) -> list[str]:
    lines = ["issue 18 targets:"]
    for t in found:
        verdict = {True: "met", False: "UNMET", None: "-"}[t["met"]]
        if t["measured"] in (NOT_RUN, FAILED):
            verdict = t["measured"].split(" (")[0]
        size = "" if t.get("full_size", True) else " [reduced size]"
        measured = "" if t["measured"] in (NOT_RUN, FAILED) else f": {t['measured']}"
        lines.append(f"  {verdict:>7}  {t['item']}{measured} (target {t['target']}){size}")
    return lines


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
    for config, by_c in results["ratios"].items():
        for c, r in by_c.items():
            lines.append(
                f"fetch broker/floor at {c}, {config.replace('_', ' ')}: p50 x{r['p50']}, "
                f"p99 x{r['p99']}, throughput x{r['throughput']}"
            )
    return lines


def _wrapped_lines(results: dict[str, Any]) -> list[str]:
    return [
        f"wrapped fetch broker/floor at {c}: p50 x{r['p50']}, p99 x{r['p99']}, "
        f"throughput x{r['throughput']}"
        for c, r in results["wrapped_ratios"].items()
    ]


def _scale_lines(results: dict[str, Any]) -> list[str]:
    scale = results["scale"]
    lines = []
    for c in CONCURRENCIES:
        s = scale[f"c{c}"]
        lines.append(
            f"fetch latency, {scale['large_tenants']} vs {scale['small_tenants']} tenants at "
            f"c{c}: p50 x{s.get('p50_ratio')}, p99 x{s.get('p99_ratio')} "
            f"(Vault floor alone: p50 x{s.get('floor_p50_ratio')}; tenants this broker had not "
            f"fetched before: p50 x{s.get('first_visit_p50_ratio')}; against the fetch section's "
            f"figure: p50 x{s.get('fetch_section_p50_ratio')})"
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
        f"(idle {mem['idle_rss_kb'] / 1024:.1f} MiB)"
    ]


def _workers_line(workers: dict[str, Any]) -> str:
    counts = workers.get("counts", [1, 2])
    gains = "; ".join(
        f"{name} " + ", ".join(f"x{g} at {c}" for c, g in by_c.items())
        for name, by_c in workers.items()
        if isinstance(by_c, dict)
    )
    return f"broker workers {counts[-1]} over {counts[0]} (throughput): {gains}"
