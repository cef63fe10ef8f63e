"""`broker dev` itself: start it as a user would, use a printed token, stop it, restart it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from broker.devstack.openbao import free_port

STARTUP_DEADLINE_S = 120


def _processes_mentioning(text: str) -> list[str]:
    # -ww: without it ps may cut lines to a terminal's width, and a long data dir
    # path (PostgreSQL's -D) would no longer be found.
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if text in line and "ps -ww" not in line]


class DevProcess:
    """A `broker dev` child process and what it printed."""

    def __init__(self, data_dir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env["BROKER_LOG_LEVEL"] = "WARNING"
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "dev",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=data_dir.parent,
        )
        self.output: list[str] = []

    def tokens(self) -> dict[str, str]:
        """Read output until the tokens are printed."""
        assert self.proc.stdout is not None
        found: dict[str, str] = {}
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline and not any("Ctrl-C" in o for o in self.output):
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = re.match(r"export (\w+_TOKEN)=(\S+)", line.strip())
            if match:
                found[match.group(1)] = match.group(2)
        assert "PLATFORM_ADMIN_TOKEN" in found, "".join(self.output[-40:])
        return found

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "".join(self.output[-40:])
            time.sleep(0.2)
        raise AssertionError("broker dev never became ready")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Ctrl-C, as a developer would (or another signal, as a supervisor would)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            if self.proc.stdout is not None:
                self.output.append(self.proc.stdout.read())
                self.proc.stdout.close()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp dir: pgserver (as root) opens up the parent
    # directories' permissions, and any overlapping pytest run resets its tmp
    # root to 0700, after which PostgreSQL cannot start (see tests/conftest.py).
    root = Path(tempfile.mkdtemp(prefix="broker-test-dev-"))
    path = root / ".broker"
    try:
        yield path
    finally:
        for line in _processes_mentioning(str(path)):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_broker_dev_serves_prints_tokens_stops_cleanly_and_keeps_its_data(data_dir: Path) -> None:
    port = free_port()
    dev = DevProcess(data_dir, port)
    try:
        tokens = dev.tokens()
        dev.wait_ready()
        printed = "".join(dev.output)
        assert f"http://127.0.0.1:{port}/docs" in printed
        assert "curl" in printed
        assert "/v1/tenants/settings" in printed
        admin = {"Authorization": f"Bearer {tokens['TENANT_ADMIN_TOKEN']}"}
        settings = httpx.get(f"{dev.url}/v1/tenants/settings", headers=admin)
        assert settings.status_code == 200
        assert settings.json()["tenant_id"] == "demo"
        patched = httpx.patch(
            f"{dev.url}/v1/tenants/settings",
            json={"branding": {"business_name": "Survives restarts"}},
            headers=admin,
        )
        assert patched.status_code == 200
        assert httpx.get(f"{dev.url}/docs").status_code == 200
        finance = {"Authorization": f"Bearer {tokens['FINANCE_TOKEN']}"}
        assert httpx.get(f"{dev.url}/v1/tenants/settings", headers=finance).status_code == 403
        first_workers = _wait_for_job_workers(data_dir, other_than=set())
        assert len(first_workers) == 1  # one job worker runs in-process
    finally:
        dev.stop()
    assert dev.proc.returncode == 0, "".join(dev.output[-40:])
    assert _processes_mentioning(str(data_dir)) == []
    assert (data_dir / "vault" / "audit.log").stat().st_size > 0

    again = DevProcess(data_dir, port)
    try:
        tokens = again.tokens()
        again.wait_ready()
        admin = {"Authorization": f"Bearer {tokens['TENANT_ADMIN_TOKEN']}"}
        body = httpx.get(f"{again.url}/v1/tenants/settings", headers=admin).json()
        assert body["branding"]["business_name"] == "Survives restarts"
        # The first worker deregistered when Ctrl-C stopped it: a clean stop, not a crash.
        assert len(_wait_for_job_workers(data_dir, other_than=first_workers)) == 1
    finally:
        again.stop()
    assert _processes_mentioning(str(data_dir)) == []


def _job_workers(data_dir: Path) -> set[int]:
    """The job workers registered in the dev stack's own PostgreSQL."""
    (socket,) = (data_dir / "postgres").glob("**/.s.PGSQL.*[0-9]")
    engine = create_engine(
        f"postgresql+psycopg://postgres@/postgres?host={socket.parent}", poolclass=NullPool
    )
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SELECT id FROM procrastinate_workers")).scalars())
    finally:
        engine.dispose()


def _wait_for_job_workers(data_dir: Path, other_than: set[int]) -> set[int]:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while not (workers := _job_workers(data_dir)) - other_than:
        assert time.monotonic() < deadline, "no job worker registered"
        time.sleep(0.2)
    return workers


def test_broker_dev_stopped_with_sigterm_stops_everything_it_started(data_dir: Path) -> None:
    dev = DevProcess(data_dir, free_port())
    try:
        dev.tokens()
        dev.wait_ready()
        assert any("postgres" in line for line in _processes_mentioning(str(data_dir)))
    finally:
        dev.stop(signal.SIGTERM)  # what a process manager, an IDE or `kill` sends
    assert dev.proc.returncode == 0, "".join(dev.output[-40:])
    assert _processes_mentioning(str(data_dir)) == []
