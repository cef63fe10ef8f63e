"""`broker serve` as operators run it: the real uvicorn in front of the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.cli import WORKER_HEALTHCHECK_S
from broker.core.config import Settings
from broker.devstack.openbao import free_port
from broker.models import AuditEvent
from tests.support.metrics import metric_value
from tests.support.redis import redis_server
from tests.support.tokens import TEST_SIGNING_KEY, bearer, token

STARTUP_DEADLINE_S = 60
# Several workers each import and build the broker; on a small shared machine that is slow.
WORKERS_STARTUP_DEADLINE_S = 240
SLACK_S = 30


@contextmanager
def broker_serve(
    settings: Settings,
    vault_token: str,
    where: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    startup_deadline_s: float = STARTUP_DEADLINE_S,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`broker serve` on a free loopback port, with no trusted proxies configured."""
    assert settings.database_url is not None
    port = free_port()
    own = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    own |= {
        "BROKER_ENV": "test",
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(port),
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_DATABASE_URL": settings.database_url.get_secret_value(),
        "BROKER_VAULT_ADDRS": ",".join(settings.vault_addrs),
        "BROKER_VAULT_TOKEN": vault_token,
        "BROKER_JWT_HS256_SECRET": TEST_SIGNING_KEY,
        "BROKER_RATE_LIMIT_AUTH_FAILURES": "2/hour",
        **(env or {}),
    }
    log = where / "serve.log"
    with log.open("w") as output:
        # A file, not a pipe nobody reads while it serves: workers log too.
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", *args],
            env=own,
            cwd=where,  # no stray .env
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        _until_healthy(proc, f"http://127.0.0.1:{port}", log, startup_deadline_s)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _until_healthy(proc: subprocess.Popen[str], url: str, log: Path, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"broker serve never answered: {log.read_text()}"
        time.sleep(0.2)


def two_workers(
    settings: Settings, vault_token: str, where: Path, env: dict[str, str] | None = None
) -> AbstractContextManager[tuple[subprocess.Popen[str], int]]:
    """`broker serve --workers 2`, as `broker_serve`."""
    return broker_serve(
        settings,
        vault_token,
        where,
        env=env,
        args=("--workers", "2"),
        startup_deadline_s=WORKERS_STARTUP_DEADLINE_S,
    )


@pytest.fixture
def served(settings: Settings, broker_vault_token: str, tmp_path: Path) -> Iterator[str]:
    """`broker serve` with one worker."""
    with broker_serve(settings, broker_vault_token, tmp_path) as (_, port):
        yield f"http://127.0.0.1:{port}"


def test_forwarded_for_from_loopback_is_ignored_without_trusted_proxies(
    served: str, engine: Engine, tenant: str
) -> None:
    bad = bearer(
        token("tenant:admin", tenant_id=tenant, key="not-the-key-but-long-enough-for-hs256")
    )
    statuses = [
        httpx.get(
            f"{served}/v1/tenants/settings",
            headers=bad | {"X-Forwarded-For": f"203.0.113.{i}"},
        ).status_code
        for i in range(3)
    ]
    # A new forged address per request does not buy a new failure budget.
    assert statuses == [401, 401, 429]

    request_id = f"forged-{tenant}"
    denied = httpx.get(
        f"{served}/v1/tenants/settings",
        headers=bearer(token("finance:view", tenant_id=tenant))
        | {"X-Forwarded-For": "198.51.100.77", "X-Request-Id": request_id},
    )
    assert denied.status_code == 403
    with Session(engine) as session:
        row = session.exec(select(AuditEvent).where(AuditEvent.request_id == request_id)).one()
    # The trail names the real peer, not the address the caller claimed.
    assert row.client_addr == "127.0.0.1"


def test_two_workers_share_the_failure_limit_through_redis(
    settings: Settings, broker_vault_token: str, tmp_path: Path
) -> None:
    bad = {
        "Authorization": "Bearer "
        + token("tenant:admin", key="not-the-key-but-long-enough-for-hs256")
    }
    with (
        redis_server() as (_, redis_url),
        two_workers(
            settings,
            broker_vault_token,
            tmp_path,
            env={
                "BROKER_RATE_LIMIT_STORAGE": redis_url,
                "BROKER_RATE_LIMIT_AUTH_FAILURES": "3/hour",
            },
        ) as (proc, port),
    ):
        first, second = _one_connection_per_worker(proc.pid, port)
        statuses = []
        for i in range(6):  # alternately to each worker
            http = (first, second)[i % 2]
            http.request("GET", "/v1/tenants/settings", headers=bad)
            answer = http.getresponse()
            answer.read()
            statuses.append(answer.status)
        metrics = _get(first, "/metrics")
        first.close()
        second.close()
    # One budget of three failures for the replica: alone, each worker would allow three.
    assert statuses == [401, 401, 401, 429, 429, 429]
    # Refused by both workers, counted once each in either worker's answer.
    assert metric_value(metrics, "broker_rate_limit_rejections_total", limit="auth_failures") == 3


def _one_connection_per_worker(supervisor: int, port: int) -> tuple[HTTPConnection, HTTPConnection]:
    """Keep-alive connections to the broker, one served by each of its two workers.

    Which worker accepts a connection is the kernel's choice: open connections until
    the workers' own sockets (in /proc) show that each holds one of them.
    """
    opened: list[HTTPConnection] = []
    for attempt in range(200):
        if attempt:
            # On a busy machine the worker that accepted last can win every accept; a
            # short pause lets the other one's loop reach its accept too.
            time.sleep(0.02)
        http = HTTPConnection("127.0.0.1", port, timeout=SLACK_S)
        http.request("GET", "/healthz")  # answered: accepted by a worker
        http.getresponse().read()
        opened.append(http)
        owners = _serving_workers(supervisor, port)
        by_worker = {owners.get(h.sock.getsockname()[1]): h for h in opened}
        by_worker.pop(None, None)
        if len(by_worker) == 2:
            first, second = by_worker.values()
            for other in opened:
                if other not in (first, second):
                    other.close()
            return first, second
    raise AssertionError("every connection went to the same worker; is --workers 2 serving?")


def _serving_workers(supervisor: int, port: int) -> dict[int, int]:
    """Client port -> pid of the worker holding that connection to the broker's `port`."""
    inodes = {}
    for pid in _children(supervisor):
        with suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    owners = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == port and inode in inodes:
            owners[int(remote.split(":")[1], 16)] = inodes[inode]
    return owners


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def _workers(supervisor: int) -> set[int]:
    """The supervisor's live worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for pid in _children(supervisor):
        with suppress(OSError):  # a worker reaped since it was listed
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return found


def test_metrics_add_up_what_every_worker_counted(
    settings: Settings, broker_vault_token: str, tmp_path: Path
) -> None:
    admin = bearer(token("tenant:admin", tenant_id="metrics-of-two-workers"))
    with two_workers(settings, broker_vault_token, tmp_path) as (proc, port):
        files = _environment(min(_workers(proc.pid)))["PROMETHEUS_MULTIPROC_DIR"]
        connections = _one_connection_per_worker(proc.pid, port)
        for http in connections:
            for _ in range(2):  # the token verified, then found in this worker's cache
                _get(http, "/v1/tenants/settings", admin)
        _get(connections[0], "/readyz")
        scrapes = [_get(http, "/metrics") for http in connections]
        for http in connections:
            http.close()
    # Whichever worker answers the scrape, it tells every worker's counts.
    route = {"route": "/v1/tenants/settings", "method": "GET"}
    for scrape in scrapes:
        assert metric_value(scrape, "broker_http_requests_total", **route) == 4
        assert metric_value(scrape, "broker_http_request_duration_seconds_count", **route) == 4
        assert metric_value(scrape, "broker_token_cache_lookups_total", result="miss") == 2
        assert metric_value(scrape, "broker_token_cache_lookups_total", result="hit") == 2
        # A state gauge: what the latest probe of any worker found.
        assert metric_value(scrape, "broker_vault_state", state="ok") == 1
        # Read at scrape time from the answering worker alone: one pool, one process.
        assert metric_value(scrape, "process_resident_memory_bytes") > 0
    assert not Path(files).exists(), "the run's metric files outlived it"


def _get(http: HTTPConnection, path: str, headers: dict[str, str] | None = None) -> str:
    http.request("GET", path, headers=headers or {})
    return http.getresponse().read().decode()


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(entry.partition("=")[::2] for entry in raw.split("\0") if entry)


def test_a_worker_that_dies_is_replaced_and_the_server_keeps_serving(
    settings: Settings, broker_vault_token: str, tmp_path: Path
) -> None:
    with two_workers(settings, broker_vault_token, tmp_path) as (proc, port):
        victim = min(_workers(proc.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + WORKERS_STARTUP_DEADLINE_S
        while victim in (workers := _workers(proc.pid)) or len(workers) < 2:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the dead worker was never replaced"
            time.sleep(0.2)
        _until_healthy(proc, f"http://127.0.0.1:{port}", tmp_path / "serve.log", SLACK_S)


def test_workers_that_cannot_start_stop_the_server_instead_of_restarting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"BROKER_ENV": "test", "BROKER_PORT": str(free_port()), "BROKER_WORKERS": "2"}
    # No database configured: every worker fails to build the app.
    served = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # A worker that exits is seen at once: uvicorn alone waited out its ping's timeout.
        timeout=WORKER_HEALTHCHECK_S,
        check=False,
    )
    assert served.returncode == 3, served.stderr
    assert "error: no database: set BROKER_DATABASE_URL" in served.stderr
    assert "Traceback" not in served.stderr
