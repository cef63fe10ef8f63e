"""Measurements with wrk, the one load generator for the broker and for the Vault floor.

A Python generator adds its own time to every call, and adds it unevenly: it
made Vault look about twice as slow as it is, so the broker/floor ratios were
flattering. wrk (C, epoll, the Debian `wrk` package, which `make bench`
installs) drives both sides here, with the same settings, so a ratio compares
like with like.

`measure(spec)` takes the spec `bench.run` builds:

    {"name": ..., "base_url": "http://127.0.0.1:8000", "concurrency": 8,
     "duration_s": 8, "warmup_s": 1,
     "targets": [{"method": "GET", "path": "/v1/...", "headers": {...}, "body": null}]}

and runs wrk in a closed loop, one keep-alive connection per unit of
concurrency, cycling through the targets. wrk's threads start evenly spread
over the list (with two, one at its start and one half-way), so no two walk
the same targets one step apart, and the warm-up starts them half a spread
further on: with many targets (10,000 tenants) the measured run begins at
targets the warm-up did not just visit. A `{n}` in a body becomes a counter
unique per thread and request, so writes differ. wrk first runs `warmup_s`
unrecorded, then `duration_s`.

The targets carry bearer tokens and Vault tokens: they go into a Lua script in a
private temporary directory (mode 0700), never into argv.

The result has the shape every figure in `bench/results.json` has: requests,
rps, p50/p99 in ms, the share of one core wrk itself used while measuring
(from the kernel's accounting of the child), and non-2xx answers and socket
errors as wrk counts them.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

WRK = "wrk"
# wrk runs this many threads at most: one per core of the bench machine is plenty for a
# generator that spends a few microseconds per request.
MAX_THREADS = 2
# A request unanswered for this long counts as a timeout, not as a latency.
TIMEOUT_S = 10

_SCRIPT = """
local targets = {%(targets)s}
local out = %(out)s
local nthreads, offset = %(threads)d, %(offset)d
local i, n = 0, 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  i = (offset + math.floor(tid * #targets / nthreads)) %% #targets
end

function request()
  i = i %% #targets + 1
  local t = targets[i]
  local body = t.body
  if body ~= nil then
    n = n + 1
    body = string.gsub(body, "{n}", tid .. "-" .. n)
  end
  return wrk.format(t.method, t.path, t.headers, body)
end

function done(summary, latency, requests)
  if out == nil then return end
  local e = summary.errors
  local f = io.open(out, "w")
  f:write(string.format(
    '{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"non_2xx_3xx": %%d, "connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout))
  f:close()
end
"""


class WrkMissing(RuntimeError):
    """wrk is not installed (`make bench` installs the Debian package)."""


def _lua(value: str) -> str:
    """A Lua string literal for `value`: printable ASCII kept, every other byte escaped."""
    out = []
    for byte in value.encode():
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _target(target: dict[str, Any], host: str) -> str:
    headers = {"Host": host, **target.get("headers", {})}
    fields = ", ".join(f"[{_lua(k)}] = {_lua(str(v))}" for k, v in headers.items())
    body = target.get("body")
    return (
        f"{{method = {_lua(target['method'])}, path = {_lua(target['path'])}, "
        f"headers = {{{fields}}}, body = {_lua(body) if body is not None else 'nil'}}}"
    )


def script(
    targets: list[dict[str, Any]], host: str, out: Path | None, *, threads: int, offset: int = 0
) -> str:
    """The Lua script that cycles through `targets` and, if `out` is set, writes figures there.

    Thread `t` of `threads` starts at target `offset + t * len(targets) / threads`.
    """
    return _SCRIPT % {
        "targets": ",\n".join(_target(t, host) for t in targets),
        "out": _lua(str(out)) if out is not None else "nil",
        "threads": threads,
        "offset": offset,
    }


def threads_for(concurrency: int) -> int:
    """wrk's threads for `concurrency` connections: one each, at most MAX_THREADS."""
    return max(1, min(concurrency, MAX_THREADS))


def _run(base_url: str, concurrency: int, seconds: float, script_path: Path) -> None:
    threads = threads_for(concurrency)
    subprocess.run(
        [
            WRK,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, math.ceil(seconds))}s",
            f"--timeout={TIMEOUT_S}s",
            "-s",
            str(script_path),
            base_url,
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 120,
    )


def measure(
    spec: dict[str, Any], *, cpu: dict[str, Callable[[], float]] | None = None
) -> dict[str, Any]:
    """Run one measurement as `spec` describes, with wrk; return its figures.

    `cpu` names processes (the broker, OpenBao) by a function that reads the CPU
    seconds each has used so far: read just before and after the measured run,
    they give each one's CPU per request in ms (`cpu_ms_per_request`), a figure
    that other load on the machine moves far less than the throughput.
    """
    if shutil.which(WRK) is None:
        raise WrkMissing("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    url = urlsplit(spec["base_url"])
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the benchmark only targets loopback addresses")
    concurrency = int(spec["concurrency"])
    host = url.netloc
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as private:
        work = Path(private)  # mode 0700: the script holds tokens
        figures = work / "figures.json"
        targets, threads = spec["targets"], threads_for(concurrency)
        warm = work / "warmup.lua"
        ahead = len(targets) // (2 * threads)
        warm.write_text(script(targets, host, None, threads=threads, offset=ahead))
        measured = work / "measure.lua"
        measured.write_text(script(targets, host, figures, threads=threads))
        warmup_s = float(spec.get("warmup_s", 1.0))
        if warmup_s > 0:
            _run(spec["base_url"], concurrency, warmup_s, warm)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        readers = cpu or {}
        cpu_before = {name: read() for name, read in readers.items()}
        started = time.perf_counter()
        _run(spec["base_url"], concurrency, float(spec["duration_s"]), measured)
        wall = time.perf_counter() - started
        cpu_used = {name: read() - cpu_before[name] for name, read in readers.items()}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        raw = json.loads(figures.read_text())
    seconds = raw["duration_us"] / 1e6
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    errors = {k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]}
    return {
        "generator": "wrk",
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 3),
        "non_2xx_3xx": raw["non_2xx_3xx"],
        "errors": errors,
        # Share of one core wrk used while measuring (its start and exit included).
        "loadgen_cpu": round(wrk_cpu / wall, 3) if wall else 0.0,
        "cpu_ms_per_request": {
            name: round(used * 1000 / raw["requests"], 3) if raw["requests"] else None
            for name, used in cpu_used.items()
        },
    }


def in_series(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures for calls made one after the other, from each call measured alone.

    An iteration takes the sum of its calls' times, so its rate is the harmonic
    combination of their rates and its latency the sum of their latencies (for the
    p99 an upper bound: the slowest of each rarely meet).
    """
    rps = 1 / sum(1 / p["rps"] for p in parts) if all(p["rps"] for p in parts) else 0.0
    return {
        "generator": "wrk",
        "concurrency": parts[0]["concurrency"],
        "calls": len(parts),
        "rps": round(rps, 1),
        "p50_ms": round(sum(p["p50_ms"] for p in parts), 3),
        "p99_ms": round(sum(p["p99_ms"] for p in parts), 3),
        "non_2xx_3xx": sum(p["non_2xx_3xx"] for p in parts),
        "errors": {k: v for p in parts for k, v in p["errors"].items()},
        "loadgen_cpu": max(p["loadgen_cpu"] for p in parts),
        "cpu_ms_per_request": _cpu_in_series(parts),
        "parts": parts,
    }


def _cpu_in_series(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Each process's CPU per iteration: the sum over the calls, where every call has it."""
    per_call = [p.get("cpu_ms_per_request") or {} for p in parts]
    names = set.intersection(*(set(c) for c in per_call)) if per_call else set()
    return {
        name: round(sum(c[name] for c in per_call), 3)
        for name in sorted(names)
        if all(c[name] is not None for c in per_call)
    }
