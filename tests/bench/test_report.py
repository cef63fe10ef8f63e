"""The bench's summary carries every issue-18 figure from the run's own measurements, flags a
generator without headroom, and the memory soak compares the first round with the last."""

from __future__ import annotations

from typing import Any

from bench import report, soak


def _figure(rps: float, cpu: float = 0.05) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": 1.0, "p99_ms": 5.0, "loadgen_cpu": cpu, "concurrency": 1}


def _row(name: str, c: int, rps: float, cpu: float = 0.05) -> dict[str, Any]:
    return {"name": name, "concurrency": c, "rps": rps, "loadgen_cpu": cpu}


def _results(ceiling: float, fetch_cpu: float = 0.05) -> dict[str, Any]:
    by_c = {f"c{c}": _figure(100.0 * c) for c in (1, 8)}
    floor = {
        f"c{c}": {
            **_figure(200.0 * c),
            "parts": [
                {"call": "kv read", **_figure(400.0 * c)},
                {"call": "transit decrypt", **_figure(400.0 * c)},
            ],
        }
        for c in (1, 8)
    }
    rows = [_row(report.CEILING, c, ceiling) for c in (1, 8)]
    rows += [_row(report.FETCH, c, 100.0 * c, fetch_cpu) for c in (1, 8)]
    return {
        report.CEILING: {f"c{c}": _figure(ceiling) for c in (1, 8)},
        report.FETCH: by_c,
        report.FLOOR: floor,
        report.SETTINGS_GET: by_c,
        report.SETTINGS_PATCH: by_c,
        "ratios": {f"c{c}": {"throughput": 0.5, "p50": 2.0, "p99": 1.5} for c in (1, 8)},
        "rotation": {
            "secrets_rewrapped": 100,
            "seconds": 2.0,
            "secrets_per_s": 50.0,
            "seconds_per_10000": 200.0,
        },
        "legacy_migration": {"tenants": 100, "tenants_per_second": 80.0},
        "scale": {
            "small_tenants": 10,
            "large_tenants": 200,
            **{f"c{c}": {"p50_ratio": 1.05, "p99_ratio": 1.1} for c in (1, 8)},
        },
        "memory_soak": soak.summarise(
            {"VmRSS": 1000},
            [{"requests": 1000, "rss_kb": 1200}, {"requests": 5000, "rss_kb": 1210}],
            0,
            True,
            {"VmHWM": 1300},
        ),
        "workers": {"skipped": "no bench/workers.py in this tree"},
        "rows": rows,
    }


def test_the_summary_holds_every_figure_of_the_issue() -> None:
    summary = report.summary(_results(ceiling=10_000.0))
    floor = summary["fetch_floor"]["c8"]
    assert floor["in_series"]["rps"] == 1600.0
    assert set(floor["parts"]) == {"kv read", "transit decrypt"}
    assert summary["fetch"]["c1"] == {
        "rps": 100.0,
        "p50_ms": 1.0,
        "p99_ms": 5.0,
        "ratio_to_floor": 0.5,
    }
    assert summary["settings_get"]["c8"]["p99_ms"] == 5.0
    assert summary["settings_patch"]["c1"]["rps"] == 100.0
    assert summary["rotation"]["seconds_per_10000"] == 200.0
    assert summary["legacy_migration"]["tenants_per_second"] == 80.0
    assert summary["scale"]["c8_p50_ratio"] == 1.05
    assert summary["memory_soak"]["growth_after_first_round_kb"] == 10
    assert "skipped" in summary["workers"]
    assert summary["generator_check"]["ok"] is True


def test_a_generator_without_headroom_or_busy_is_flagged() -> None:
    low_ceiling = report.summary(_results(ceiling=1000.0))["generator_check"]
    assert low_ceiling["c8"]["headroom"] == 1.2
    assert low_ceiling["ok"] is False
    busy = report.summary(_results(ceiling=10_000.0, fetch_cpu=0.9))["generator_check"]
    assert busy["max_gen_cpu"] == 0.9
    assert busy["ok"] is False


def test_the_soak_compares_the_first_round_with_the_last() -> None:
    figures = soak.summarise(
        {"VmRSS": 900},
        [
            {"requests": 10_000, "rss_kb": 1000},
            {"requests": 60_000, "rss_kb": 1050},
            {"requests": 110_000, "rss_kb": 1100},
        ],
        3,
        True,
        {"VmHWM": 1150},
    )
    assert figures["rss_before_kb"] == 900
    assert figures["rss_after_first_round_kb"] == 1000
    assert figures["rss_last_kb"] == 1100
    assert figures["growth_after_first_round_kb"] == 100
    assert figures["growth_per_100k_requests_kb"] == 100.0
    assert (figures["requests"], figures["rounds"], figures["unexpected_answers"]) == (
        110_000,
        3,
        3,
    )
    assert "+100 KiB" in soak.describe(figures)
