"""A closed-loop HTTP/1.1 load generator on raw asyncio streams, run as its own process.

    python -m bench.loadgen < spec.json > result.json
    python -m bench.loadgen serve PORT     # a trivial server, to show the ceiling

Each of `concurrency` workers holds one keep-alive connection and sends its
next request as soon as the previous answer is read, for `warmup_s` (not
recorded) and then `duration_s`. The result is throughput, latency
percentiles, the status codes seen, and the CPU this process used, so a run
shows whether the generator itself was near its limit.

A spec is JSON on stdin (it carries bearer tokens, so never argv or a file):

    {"base_url": "http://127.0.0.1:8000", "concurrency": 8, "duration_s": 5,
     "warmup_s": 1, "scenario": "requests",
     "targets": [{"method": "GET", "path": "/v1/...", "headers": {...}, "body": null}]}

Scenarios:
- `requests`: one request per iteration, cycling through `targets`; a
  `{n}` in a body is replaced by a counter, so writes differ.
- `vault_fetch`: what the broker does for one credential fetch, straight to
  Vault: a KV v2 read, then a Transit decrypt of the ciphertext it returned
  (plus a response-wrap when `wrap_ttl` is set). One iteration is one
  "request": its latency covers every call. Targets carry `kv_path`,
  `transit_key` and `context` (base64), and the spec a Vault `token`.

Plain asyncio keeps the generator cheap: it parses only the status line, the
headers it needs and the body length, so it is far from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """The server answered something this small client does not understand."""


@dataclass
class Answer:
    """One HTTP response: status and body (headers are not kept)."""

    status: int
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """Send one request and read the whole answer."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        status_line = await self.reader.readline()
        if not status_line:
            raise ProtocolError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length: int | None = None
        chunked = False
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            data = await self._read_chunked()
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data = await self.reader.read()
            close = True
        if close:
            await self.close()
        return Answer(status, data)

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()

    async def close(self) -> None:
        """Close the socket (a later request opens a new one)."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


@dataclass
class Recorder:
    """Latencies and status codes of the measured window."""

    recording: bool = False
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, seconds: float, status: int) -> None:
        if self.recording:
            self.latencies.append(seconds)
            self.statuses[status] += 1


class Scenario:
    """One iteration of work; returns the status that counts for it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.targets = spec["targets"]
        self._next: Iterator[int] = itertools.cycle(range(len(self.targets)))
        self._counter = itertools.count()

    def target(self) -> dict[str, Any]:
        target: dict[str, Any] = self.targets[next(self._next)]
        return target

    async def run(self, conn: Connection) -> int:
        raise NotImplementedError


class Requests(Scenario):
    """One HTTP request per iteration."""

    async def run(self, conn: Connection) -> int:
        target = self.target()
        body = target.get("body")
        data = None
        if body is not None:
            data = body.replace("{n}", str(next(self._counter))).encode()
        answer = await conn.request(target["method"], target["path"], target["headers"], data)
        return answer.status


class VaultFetch(Scenario):
    """KV v2 read + Transit decrypt (+ wrap): the Vault work of one credential fetch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.headers = {"X-Vault-Token": spec["token"], "Content-Type": "application/json"}
        self.kv_mount = spec.get("kv_mount", "secret")
        self.transit_mount = spec.get("transit_mount", "transit")
        self.wrap_ttl = spec.get("wrap_ttl")

    async def run(self, conn: Connection) -> int:
        target = self.target()
        read = await conn.request(
            "GET", f"/v1/{self.kv_mount}/data/{target['kv_path']}", self.headers, None
        )
        if read.status != 200:
            return read.status
        ciphertext = json.loads(read.body)["data"]["data"]["ciphertext"]
        payload = json.dumps({"ciphertext": ciphertext, "context": target["context"]})
        decrypt = await conn.request(
            "POST",
            f"/v1/{self.transit_mount}/decrypt/{target['transit_key']}",
            self.headers,
            payload.encode(),
        )
        if decrypt.status != 200 or not self.wrap_ttl:
            return decrypt.status
        plaintext = json.loads(decrypt.body)["data"]["plaintext"]
        wrap = await conn.request(
            "POST",
            "/v1/sys/wrapping/wrap",
            {**self.headers, "X-Vault-Wrap-TTL": str(self.wrap_ttl)},
            json.dumps({"lease": plaintext}).encode(),
        )
        return wrap.status


SCENARIOS: dict[str, type[Scenario]] = {"requests": Requests, "vault_fetch": VaultFetch}


async def worker(scenario: Scenario, conn: Connection, recorder: Recorder, stop: float) -> None:
    """Send iterations back to back until `stop` (loop time)."""
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < stop:
            started = time.perf_counter()
            try:
                status = await scenario.run(conn)
            except (OSError, ProtocolError, asyncio.IncompleteReadError, ValueError) as exc:
                recorder.errors[type(exc).__name__] += 1
                await conn.close()
                continue
            recorder.add(time.perf_counter() - started, status)
    finally:
        await conn.close()


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement as the spec describes; return its figures."""
    url = urlsplit(spec["base_url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets loopback addresses")
    concurrency = int(spec["concurrency"])
    duration = float(spec["duration_s"])
    warmup = float(spec.get("warmup_s", 1.0))
    scenario = SCENARIOS[spec.get("scenario", "requests")](spec)
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop = start + warmup + duration
    conns = [Connection(host, port) for _ in range(concurrency)]
    tasks = [asyncio.create_task(worker(scenario, c, recorder, stop)) for c in conns]
    await asyncio.sleep(warmup)
    recorder.recording = True
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    measured_from = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - measured_from
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    ordered = sorted(recorder.latencies)
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests": len(ordered),
        "rps": round(len(ordered) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
        "statuses": {str(k): v for k, v in sorted(recorder.statuses.items())},
        "errors": dict(recorder.errors),
        # Share of one core the generator used while measuring.
        "loadgen_cpu": round(cpu / elapsed, 3) if elapsed else 0.0,
        "loadgen_pid": os.getpid(),
    }


_STATIC = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            writer.write(_STATIC)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve_static(port: int) -> None:
    """A trivial keep-alive HTTP server on loopback: the generator's own ceiling."""
    server = await asyncio.start_server(_answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Read a spec on stdin and print the result as one JSON line (or `serve PORT`)."""
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve_static(int(sys.argv[2])))
        return
    spec = json.load(sys.stdin)
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
