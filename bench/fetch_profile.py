"""Credential-fetch cost, A/B across source trees, on one stack: CPU per fetch and rate.

    python -m bench.fetch_profile --trees /tmp/base,/work/wt/fetch --rounds 2
    python -m bench.fetch_profile --pyspy /tmp/fetch.txt    # a py-spy profile at c=1

With five helpers sharing two cores, throughput alone is too noisy to judge one
change by, so each figure here also carries the broker's CPU per fetch: the
utime+stime the kernel accounted to the broker's processes (every worker) over
the measured run, divided by the requests wrk counted, and OpenBao's CPU per fetch
the same way (a change may move work between the two). Each tree in `--trees`
serves the broker in turn (`PYTHONPATH=<tree>`) against the same OpenBao,
PostgreSQL and tenants, and the rounds alternate between trees, so the A/B is
back to back. `--floor` adds the Vault floor (KV read + Transit decrypt in
series with the broker's policy, `bench.run.Bench.floor`). It measures; it
asserts nothing about time.

    python -m bench.fetch_profile --trees /tmp/base,/work/wt/fetch --instructions 200

`--instructions N` counts instead the CPU instructions one fetch takes, with valgrind's
callgrind (`apt-get install valgrind`): N fetches through the app in one process
(`bench/asgi_fetch.py`), instrumented only while they run. On a shared machine CPU time
moves by a fifth from one run to the next; the count moves by well under one percent, so
a change of a few percent is seen in one round. It leaves out uvicorn and the sockets, and
a count is not a time (a cache miss costs more than an add); it says what work a change
removed. BENCH_LOG_LEVEL=INFO counts the access line as well (the bench serves at WARNING).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import oauth_refresh, wrk
from bench.process import own_stack, progress_logging
from bench.run import ROOT, Bench, BrokerProcess, Plan, tenant_ids
from tests.fakes.providers import FakeProviders
from tests.fakes.shopify_oauth import FakeClock

log = logging.getLogger("bench.fetch_profile")
_TICKS = os.sysconf("SC_CLK_TCK")
# The broker's cheapest route: its fixed cost per request (uvicorn, middleware, routing).
HEALTHZ: list[dict[str, Any]] = [{"method": "GET", "path": "/healthz", "headers": {}, "body": None}]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _family(root: int) -> list[int]:
    """`root` and every process descended from it (a `--workers` supervisor's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, ValueError):
                continue
    family, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        family += frontier
    return family


def cpu_seconds(root: int) -> tuple[float, float]:
    """User and system CPU time of `root` and its descendants so far."""
    user = system = 0
    for pid in _family(root):
        try:
            fields = _stat(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / _TICKS, system / _TICKS


@dataclass(frozen=True)
class Figure:
    tree: str
    concurrency: int
    rps: float
    p50_ms: float
    cpu_ms_per_fetch: float
    sys_ms_per_fetch: float
    vault_ms_per_fetch: float
    load: float
    failed: int

    def line(self) -> str:
        return (
            f"{self.tree:28} c={self.concurrency}  {self.rps:7.1f} rps  p50 {self.p50_ms:6.2f} ms"
            f"  cpu/fetch {self.cpu_ms_per_fetch:5.3f} ms (sys {self.sys_ms_per_fetch:5.3f})"
            f"  openbao {self.vault_ms_per_fetch:5.3f} ms"
            f"  load {self.load:4.2f}"
            f"  failed {self.failed}"
        )


def measure_fetch(
    bench: Bench,
    broker: BrokerProcess,
    tree: str,
    targets: list[dict[str, Any]],
    concurrencies: tuple[int, ...] = (1, 8),
) -> list[Figure]:
    """Figures for `targets` (fetches) at each concurrency, with the broker's CPU per request."""
    figures = []
    for concurrency in concurrencies:
        spec = {
            "base_url": broker.url,
            "concurrency": concurrency,
            "targets": targets,
            "warmup_s": 0,
        }
        wrk.measure(spec | {"duration_s": bench.plan.warmup_s or 1})
        vault = bench.servers["vault"]
        before, vault_before = cpu_seconds(broker.pid), sum(cpu_seconds(vault))
        result = wrk.measure(spec | {"duration_s": bench.plan.duration_s})
        after, vault_after = cpu_seconds(broker.pid), sum(cpu_seconds(vault))
        user, system = after[0] - before[0], after[1] - before[1]
        requests = max(1, result["requests"])
        figures.append(
            Figure(
                tree=tree,
                concurrency=concurrency,
                rps=result["rps"],
                p50_ms=result["p50_ms"],
                cpu_ms_per_fetch=round((user + system) / requests * 1000, 3),
                sys_ms_per_fetch=round(system / requests * 1000, 3),
                vault_ms_per_fetch=round((vault_after - vault_before) / requests * 1000, 3),
                load=os.getloadavg()[0],
                failed=result["non_2xx_3xx"] + sum(result["errors"].values()),
            )
        )
        log.info(figures[-1].line())
    return figures


def count_instructions(
    broker: BrokerProcess, tree: str, targets: list[dict[str, Any]], count: int
) -> float:
    """Instructions per fetch of the app from `tree`, in-process, under callgrind."""
    go = broker.work / "fetch-go"
    out = broker.work / "callgrind.out"
    go.unlink(missing_ok=True)
    env = broker.env | {
        "PYTHONPATH": tree,
        "FETCH_TARGETS": json.dumps(targets),
        "FETCH_GO": str(go),
        "BROKER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    child = subprocess.Popen(  # noqa: S603  # fixed argv: valgrind, this Python, our script
        [*argv, sys.executable, str(ROOT / "bench" / "asgi_fetch.py"), str(count)],
        env=env,
        cwd=broker.work,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{tree}: the in-process broker did not start")
        _instrument(child.pid, "on")
        go.touch()
        done = child.stdout.readline().strip()
        _instrument(child.pid, "off")
        if done != "DONE":
            raise RuntimeError(f"{tree}: the fetches failed")
    finally:
        go.unlink(missing_ok=True)
        child.wait(120)
    return _collected(out) / count


def _instrument(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)  # noqa: S603, S607


def _collected(out: Path) -> int:
    """The instructions a callgrind output file counted (its `totals:` line)."""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def profile(bench: Bench, broker: BrokerProcess, tenants: list[str], out: Path) -> None:
    """py-spy's raw stacks of the broker while wrk fetches at c=1 (for flame graphs)."""
    seconds = int(bench.plan.duration_s)
    spy = subprocess.Popen(  # noqa: S603  # fixed argv, our own child's pid
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            "250",
            "--nonblocking",
            "--gil",  # only samples holding the GIL: Python work, not waits
            "-d",
            str(seconds + 1),
            "-o",
            str(out),
            "-p",
            str(broker.pid),
        ]
    )
    bench.measure("fetch profiled", broker.url, 1, targets=bench.fetch_targets(tenants))
    spy.wait(seconds + 60)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=str(ROOT), help="comma-separated source trees")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--healthz", action="store_true", help="GET /healthz at c=1 too")
    parser.add_argument("--floor", action="store_true", help="measure the Vault floor too")
    parser.add_argument("--pyspy", type=Path, help="write a py-spy profile of the first tree")
    parser.add_argument(
        "--instructions", type=int, metavar="N", help="count instructions over N fetches instead"
    )
    return parser.parse_args()


def main() -> None:
    progress_logging(log)
    args = _arguments()
    trees = args.trees.split(",")
    plan = Plan.from_env()
    tenants = tenant_ids(0, args.tenants)
    lines: list[str] = []
    with own_stack("broker-bench-fetch-") as (stack, settings, work):
        shopify = stack.enter_context(oauth_refresh.fake_shopify(FakeClock()))
        providers = stack.enter_context(FakeProviders())
        oauth_refresh.store_platform_app(work / "data", settings, shopify)
        env: dict[str, Any] = oauth_refresh.egress_env(shopify) | {
            "BROKER_WORKERS": str(args.workers)
        }
        for round_ in range(args.rounds):
            for tree in trees:
                with BrokerProcess(settings, work, env | {"PYTHONPATH": tree}) as broker:
                    bench = Bench(plan, settings, broker, shopify, providers)
                    if round_ == 0 and tree == trees[0]:
                        bench.create(tenants)
                        if args.pyspy:
                            profile(bench, broker, tenants, args.pyspy)
                    lines += _measure_tree(args, bench, broker, tree, tenants)
        if args.floor:
            for concurrency in (1, 8):
                floor = bench.floor("floor", concurrency, tenants, "KV read + Transit decrypt")
                print(f"floor c={concurrency}: {floor['rps']:.1f} rps p50 {floor['p50_ms']} ms")  # noqa: T201
    for line in lines:
        print(line)  # noqa: T201


def _measure_tree(
    args: argparse.Namespace, bench: Bench, broker: BrokerProcess, tree: str, tenants: list[str]
) -> list[str]:
    """One tree's figures for this round, as lines to print at the end."""
    targets = bench.fetch_targets(tenants)
    if args.instructions:
        per_fetch = count_instructions(broker, tree, targets, args.instructions)
        line = f"{tree:28} {per_fetch / 1000:8.1f}k instructions per fetch"
        log.info(line)
        return [line]
    figures = measure_fetch(bench, broker, tree, targets)
    if args.healthz:
        figures += measure_fetch(bench, broker, f"{tree} healthz", HEALTHZ, (1,))
    return [figure.line() for figure in figures]


if __name__ == "__main__":
    main()
