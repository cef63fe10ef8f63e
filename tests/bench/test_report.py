"""The bench's summary carries every issue-18 figure from the run's own measurements, each
target with met/unmet, "not run" for what BENCH_ONLY left out, flags a generator without
headroom, and the memory soak compares the first round (and the first full pass) with the
last."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report, soak, workers
from bench.run import SECTIONS, Row, selection


def _figure(rps: float, cpu: float = 0.05, p99: float = 5.0) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": 1.0, "p99_ms": p99, "loadgen_cpu": cpu, "concurrency": 1}


def _row(name: str, c: int, rps: float, cpu: float = 0.05) -> dict[str, Any]:
    return {"name": name, "concurrency": c, "rps": rps, "loadgen_cpu": cpu}


def _generator_only(ceiling: float) -> dict[str, Any]:
    return {
        "sections_run": [],
        "sections_not_run": list(SECTIONS),
        report.CEILING: {f"c{c}": _figure(ceiling) for c in (1, 8)},
        report.HEALTHZ: {f"c{c}": _figure(ceiling / 10) for c in (1, 8)},
        "rows": [_row(report.CEILING, c, ceiling) for c in (1, 8)]
        + [_row(report.HEALTHZ, c, ceiling / 10) for c in (1, 8)],
        "machine": {"nproc": 2, "cpu_model": "test", "python": "3.11"},
    }


def _results(ceiling: float, fetch_cpu: float = 0.05) -> dict[str, Any]:
    by_c = {f"c{c}": _figure(100.0 * c) for c in (1, 8)}
    two = {"c1": _figure(90.0), "c8": _figure(1600.0, p99=15.0)}
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
    results = _generator_only(ceiling)
    results["rows"] += [_row(report.FETCH, c, 100.0 * c, fetch_cpu) for c in (1, 8)]
    results |= {
        report.FETCH: by_c,
        report.named(report.FETCH, 2): two,
        report.FLOOR: floor,
        report.SETTINGS_GET: by_c,
        report.named(report.SETTINGS_GET, 2): two,
        report.SETTINGS_PATCH: by_c,
        "rotation": {
            "tenants": 100,
            "secrets_rewrapped": 100,
            "seconds": 2.0,
            "secrets_per_s": 50.0,
            "seconds_per_10000": 200.0,
            "failed": 0,
            "workers": 8,
        },
        "legacy_migration": {"tenants": 10_000, "tenants_per_second": 120.0, "failed": 0},
        "scale": {
            "small_tenants": 10,
            "large_tenants": 10_000,
            **{
                f"c{c}": {"p50_ratio": 1.05 * c, "p99_ratio": 1.1, "first_visit_p50_ratio": 1.3}
                for c in (1, 8)
            },
        },
        "memory_soak": soak.summarise(
            {"VmRSS": 1000},
            [{"requests": 1000, "rss_kb": 1200}, {"requests": 5000, "rss_kb": 1210}],
            0,
            True,
            {"VmHWM": 1300},
        ),
    }
    results["workers"] = workers.gains(results)
    return results


def _verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    return {t["item"]: t["met"] for t in summary["targets"]}


def test_the_summary_holds_every_figure_of_the_issue() -> None:
    summary = report.summary(_results(ceiling=100_000.0))
    floor = summary["fetch_floor"]["c8"]
    assert floor["in_series"]["rps"] == 1600.0
    assert set(floor["parts"]) == {"kv read", "transit decrypt"}
    assert summary["fetch"]["c1"]["workers_1"] == {
        "rps": 100.0,
        "p50_ms": 1.0,
        "p99_ms": 5.0,
        "ratio_to_floor": 0.5,
        "cpu_ratio_to_floor": None,  # no CPU figures in this run
    }
    assert summary["settings_get"]["c8"]["workers_2"]["p99_ms"] == 15.0
    assert summary["settings_patch"]["c1"]["workers_1"]["rps"] == 100.0
    assert summary["rotation"]["seconds_per_10000"] == 200.0
    assert summary["legacy_migration"]["tenants_per_second"] == 120.0
    assert summary["scale"]["c8_p50_ratio"] == 8.4
    assert summary["scale"]["c1_first_visit_p50_ratio"] == 1.3
    assert summary["memory_soak"]["growth_after_first_round_kb"] == 10
    assert summary["workers"][report.FETCH]["c8"] == 2.0
    assert summary["generator_check"]["ok"] is True


def test_the_fetch_ratio_uses_the_faster_worker_count_and_shows_both() -> None:
    fetch = report.summary(_results(ceiling=100_000.0))["fetch"]
    # c=1: one worker is faster (100 against 90 rps); c=8: two (1,600 against 800).
    assert (fetch["c1"]["ratio_uses"], fetch["c1"]["ratio_to_floor"]) == ("workers_1", 0.5)
    assert (fetch["c8"]["ratio_uses"], fetch["c8"]["ratio_to_floor"]) == ("workers_2", 1.0)
    assert fetch["c8"]["workers_1"]["ratio_to_floor"] == 0.5


def test_the_fetch_ratio_by_cpu_counts_every_process_of_both() -> None:
    results = _results(ceiling=100_000.0)
    results[report.FLOOR]["c1"]["cpu_ms_per_request"] = {"vault": 1.0, "postgres": 0.0}
    results[report.FETCH]["c1"] = {
        **results[report.FETCH]["c1"],
        "cpu_ms_per_request": {"broker": 2.0, "vault": 1.5, "postgres": 0.5},
    }
    fetch = report.summary(results)["fetch"]["c1"]
    assert fetch["workers_1"]["cpu_ratio_to_floor"] == 0.25
    assert fetch["workers_1"]["cpu_ms_per_request"]["broker"] == 2.0


def test_every_target_says_whether_it_was_met() -> None:
    verdicts = _verdicts(report.summary(_results(ceiling=100_000.0)))
    assert verdicts == {
        "generator not the bottleneck": True,
        "fetch / floor at c=1": False,
        "fetch / floor at c=8": True,
        "settings GET at c=8": True,  # two workers: 1,600 rps with p99 15 ms
        "settings PATCH at c=8": True,  # 800 rps with one worker
        "key rotation": False,  # 200 s per 10,000
        "legacy migration": True,
        "fetch p50 at many vs few tenants, c=1": True,  # x1.05
        "fetch p50 at many vs few tenants, c=8": False,  # x8.4
        "flat memory under the soak": None,  # no sample after a full pass: cannot tell
        "throughput from 1 to 2 workers": True,  # fetch and settings GET doubled at c=8
    }


def test_what_was_not_run_has_no_figure_and_says_so() -> None:
    results = _generator_only(ceiling=100_000.0)
    summary = report.summary(results)
    for key in ("fetch", "fetch_floor", "settings_get", "rotation", "scale", "memory_soak"):
        assert summary[key] == report.NOT_RUN
    not_run = [t for t in summary["targets"] if t["measured"] == report.NOT_RUN]
    assert len(not_run) == len(summary["targets"]) - 1  # all but the generator check
    assert all(t["met"] is None for t in not_run)
    rows = [Row(r["name"], r["concurrency"], r["rps"], 1.0, 2.0, 0.05) for r in results["rows"]]
    printed = report.table(rows, {**results, "summary": summary})
    assert "not run  key rotation" in printed
    assert "not run (BENCH_ONLY): fetch, settings" in printed


def test_a_section_that_failed_says_so_not_that_it_was_not_run() -> None:
    results = _generator_only(ceiling=100_000.0)
    results["sections_run"] = ["rotation"]
    results["section_errors"] = {"rotation": "RuntimeError"}
    summary = report.summary(results)
    rotation = next(t for t in summary["targets"] if t["item"] == "key rotation")
    assert (rotation["measured"], rotation["met"]) == (report.FAILED, None)
    assert summary["rotation"] == report.NOT_RUN  # no figure
    printed = report.table([], {**results, "summary": summary})
    assert "FAILED section rotation: RuntimeError" in printed


def test_the_table_prints_every_target() -> None:
    results = _results(ceiling=100_000.0)
    rows = [Row(r["name"], r["concurrency"], r["rps"], 1.0, 2.0, 0.05) for r in results["rows"]]
    printed = report.table(rows, {**results, "summary": report.summary(results)})
    assert "UNMET  key rotation: 100 secrets in 2.0 s" in printed
    assert "met  settings GET at c=8: workers 1: 800 rps" in printed


def test_rotation_in_several_distributions_is_judged_on_its_headline_and_shows_each() -> None:
    results = _results(ceiling=100_000.0)
    one = {"secrets_rewrapped": 10_000, "seconds": 20.0, "seconds_per_10000": 20.0, "failed": 0}
    worst = {**one, "seconds": 90.0, "seconds_per_10000": 90.0}
    results["rotation"] = {**one, "distributions": {"realistic": one, "worst_case": worst}}
    found = next(t for t in report.targets(results) if t["item"] == "key rotation")
    assert (found["met"], found["full_size"]) == (True, True)
    assert "realistic: 10000 secrets in 20.0 s" in found["measured"]
    assert "worst case: 10000 secrets in 90.0 s" in found["measured"]


def test_a_generator_without_headroom_or_busy_is_flagged() -> None:
    low_ceiling = report.summary(_results(ceiling=1000.0))["generator_check"]
    assert low_ceiling["c8"]["headroom"] == 1.2
    assert low_ceiling["ok"] is False
    busy = report.summary(_results(ceiling=100_000.0, fetch_cpu=0.9))["generator_check"]
    assert busy["max_gen_cpu"] == 0.9
    assert busy["ok"] is False


def test_bench_only_picks_sections_in_run_order() -> None:
    assert selection("") == SECTIONS
    assert selection("soak, FETCH") == ("fetch", "soak")
    assert selection("issue18") == (
        "fetch",
        "settings",
        "workers",
        "scale",
        "soak",
        "rotation",
        "legacy",
    )
    # Workers compare fetch and settings; scale compares with the fetch at a few tenants.
    assert selection("workers") == ("fetch", "settings", "workers")
    assert selection("settings,workers") == ("settings", "workers")
    assert selection("scale") == ("fetch", "scale")
    with pytest.raises(SystemExit, match="unknown section"):
        selection("fetch,oath")


def test_the_soak_compares_the_first_round_and_the_first_full_pass_with_the_last() -> None:
    samples = [
        {"requests": 10_000, "rss_kb": 1000},
        {"requests": 60_000, "rss_kb": 1050},
        {"requests": 110_000, "rss_kb": 1100},
    ]
    figures = soak.summarise({"VmRSS": 900}, samples, 3, True, {"VmHWM": 1150})
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
    # A full pass over 40,000 tenants.
    assert soak.full_pass(samples, 40_000) == {
        "rss_after_full_pass_kb": 1050,
        "growth_after_full_pass_kb": 50,
    }
    assert soak.full_pass(samples, 100_000)["growth_after_full_pass_kb"] is None
