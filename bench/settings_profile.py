"""Settings GET and PATCH alone: rps, latency and the broker's CPU per request.

    python -m bench.settings_profile              # 1 and 2 workers
    SETTINGS_PROFILE_WORKERS=1 python -m bench.settings_profile
    SETTINGS_PROFILE_PYSPY=out.svg python -m bench.settings_profile   # a flame graph of GET
    SETTINGS_PROFILE_PYSPY=out.txt SETTINGS_PROFILE_PYSPY_PATCH=1 ...  # collapsed stacks, PATCH

It sets up its own stack (`bench.process.own_stack`), serves the broker with
`broker serve --workers N`, creates a few tenants through the API and drives
`GET` and `PATCH /v1/tenants/settings` with wrk (`bench/wrk.py`). The CPU per
request is the broker's processes' utime+stime (/proc/PID/stat, the supervisor
and every worker) over the measured run, divided by the requests wrk made: a
figure that noise on a shared machine moves far less than rps. Nothing here
asserts a time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.process import own_stack, progress_logging
from bench.run import BrokerProcess, Tokens, tenant_ids

log = logging.getLogger("bench")

TENANTS = 10
DURATION_S = float(os.environ.get("SETTINGS_PROFILE_DURATION_S", "6"))
CONCURRENCIES = (1, 8)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes(pid: int) -> list[int]:
    """`pid` and its children (the workers of `broker serve --workers N`)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(child) for child in children)]


def cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and its children so far."""
    total = 0
    for one in _processes(pid):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def create(base_url: str, tokens: Tokens, tenants: list[str]) -> None:
    auth = {"Authorization": f"Bearer {tokens.platform()}"}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for tenant in tenants:
            made = client.post("/v1/tenants", json={"id": tenant, "name": tenant}, headers=auth)
            if made.status_code not in (201, 409):
                raise RuntimeError(f"creating {tenant}: {made.status_code}")


def measure(
    broker: BrokerProcess, name: str, targets: list[dict[str, Any]], c: int
) -> dict[str, Any]:
    spec = {
        "name": name,
        "base_url": broker.url,
        "concurrency": c,
        "duration_s": DURATION_S,
        "warmup_s": 1,
        "targets": targets,
    }
    load = loadavg()
    before = cpu_seconds(broker.pid)
    result = wrk.measure(spec)
    used = cpu_seconds(broker.pid) - before
    # wrk's warm-up runs before `before`; its start and exit are in `used` (a few ms).
    return {
        "rps": result["rps"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "cpu_ms_per_request": round(used * 1000 / max(result["requests"], 1), 3),
        "non_2xx": result["non_2xx_3xx"],
        "errors": result["errors"],
        "load_before": load,
    }


def targets(tokens: Tokens, tenants: list[str]) -> tuple[list[Any], list[Any]]:
    auth = [{"Authorization": f"Bearer {tokens.admin(t)}"} for t in tenants]
    reads = [{"method": "GET", "path": "/v1/tenants/settings", "headers": h} for h in auth]
    change = '{"branding": {"footer_text": "bench {n}"}}'
    writes = [
        {
            "method": "PATCH",
            "path": "/v1/tenants/settings",
            "headers": {**h, "Content-Type": "application/json"},
            "body": change,
        }
        for h in auth
    ]
    return reads, writes


def flame_graph(broker: BrokerProcess, targets: list[Any], out: str) -> None:
    """py-spy over every broker process while wrk drives `targets` at c=8."""
    spy = Path(sys.executable).parent / "py-spy"
    seconds = str(int(DURATION_S))
    form = "raw" if out.endswith(".txt") else "flamegraph"  # raw: collapsed stacks
    command = [str(spy), "record", "--subprocesses", "-r", "250", "-d", seconds, "-f", form]
    command += ["-o", out]
    with subprocess.Popen([*command, "-p", str(broker.pid)]) as recording:
        time.sleep(0.5)
        measure(broker, "under py-spy", targets, 8)
        recording.wait(120)


def run_workers(workers: int) -> dict[str, Any]:
    with own_stack("settings-profile-") as (stack, settings, work):
        broker = BrokerProcess(settings, work, {"BROKER_WORKERS": str(workers)}).start()
        stack.callback(broker.stop)
        assert settings.jwt_hs256_secret is not None
        tokens = Tokens(
            settings.jwt_hs256_secret.get_secret_value(),
            settings.jwt_issuer,
            settings.jwt_audience,
        )
        tenants = tenant_ids(0, TENANTS)
        create(broker.url, tokens, tenants)
        reads, writes = targets(tokens, tenants)
        figures: dict[str, Any] = {}
        # The cheapest route: what the middleware and the server cost every request.
        health = [{"method": "GET", "path": "/healthz", "headers": {}}]
        figures["healthz c=8"] = measure(broker, "healthz", health, 8)
        log.info("workers=%d healthz c=8 %s", workers, figures["healthz c=8"])
        for c in CONCURRENCIES:
            figures[f"GET c={c}"] = measure(broker, "GET", reads, c)
            log.info("workers=%d GET c=%d %s", workers, c, figures[f"GET c={c}"])
        for c in CONCURRENCIES:
            figures[f"PATCH c={c}"] = measure(broker, "PATCH", writes, c)
            log.info("workers=%d PATCH c=%d %s", workers, c, figures[f"PATCH c={c}"])
        if out := os.environ.get("SETTINGS_PROFILE_PYSPY"):
            profiled = writes if os.environ.get("SETTINGS_PROFILE_PYSPY_PATCH") else reads
            flame_graph(broker, profiled, out)
        return figures


def main() -> None:
    progress_logging(log)
    counts = [int(n) for n in os.environ.get("SETTINGS_PROFILE_WORKERS", "1,2").split(",")]
    results = {f"workers={n}": run_workers(n) for n in counts}
    print(json.dumps(results, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
