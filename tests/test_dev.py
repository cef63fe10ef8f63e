"""`broker dev` itself: start it as a user would, use a printed token, stop it, restart it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
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


# -- operator commands against the running stack (issue 14) ------------------------------

VENV_BIN = Path(sys.executable).parent


def _broker(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `broker ARGS` as a user would in the directory of `make dev`: no BROKER_* set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "BAO_", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_clean_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


def _check_banner_and_env_file(dev: DevProcess, data_dir: Path, tokens: dict[str, str]) -> None:
    # The banner comes last and alone: no JSON log line before it on the terminal.
    assert not [line for line in dev.output if line.lstrip().startswith("{")]
    (broker_log,) = [line for line in dev.output if line.startswith("Logs:")]
    assert (data_dir / "broker.log").is_file()
    assert "broker.log" in broker_log

    env_file = data_dir / "dev.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    vault_line = next(line for line in dev.output if line.startswith("Vault:"))
    assert values["BAO_ADDR"] in vault_line
    assert ".broker/vault/init.json" in vault_line
    assert tokens["PLATFORM_ADMIN_TOKEN"] not in env_file.read_text()


def _bao_kv_put_as_the_readme_says(workdir: Path, stripe_key: str) -> None:
    """The README's bao line, as written, after loading the env file the banner names."""
    bao = subprocess.run(
        [
            "sh",
            "-c",
            "set -a; . .broker/dev.env; set +a; "
            f"bao kv put secret/platform/stripe api_key={stripe_key}",
        ],
        cwd=workdir,
        env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": str(workdir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bao.returncode == 0, bao.stderr


def _check_operator_commands(
    dev: DevProcess, data_dir: Path, tokens: dict[str, str], stripe_key: str
) -> None:
    workdir = data_dir.parent
    admin = {"Authorization": f"Bearer {tokens['TENANT_ADMIN_TOKEN']}"}
    stored = httpx.put(
        f"{dev.url}/v1/tenants/settings/integrations/openai",
        json={"fields": {"api_key": "sk-" + "a1" * 16}, "skip_connection_test": True},
        headers=admin,
    )
    assert stored.status_code == 200, stored.text

    audit = _broker(workdir, "audit", "--tenant", "demo", "--since", "1h")
    assert audit.returncode == 0, audit.stderr
    assert "demo" in audit.stdout
    assert "without the broker's trail" not in audit.stderr  # it found the database

    rotated = _broker(workdir, "keys", "rotate", "--all")
    assert rotated.returncode == 0, rotated.stderr
    totals = json.loads(rotated.stdout)
    assert totals["tenants"] >= 1
    assert totals["rewrapped"] >= 1
    assert totals["failed"] == 0

    found = _broker(workdir, "audit", "find-value", stdin=stripe_key + "\n")
    assert found.returncode == 0, found.stderr
    count = re.search(r"(\d+) audit entries touched the value", found.stderr)
    assert count is not None, found.stderr
    assert int(count.group(1)) >= 1
    assert stripe_key not in found.stdout + found.stderr

    # From elsewhere, told where the data dir is.
    elsewhere = _broker(
        Path("/"), "--data-dir", str(data_dir), "keys", "rotate", "--tenant", "demo"
    )
    assert elsewhere.returncode == 0, elsewhere.stderr

    # A broker error is one line, not a traceback.
    missing = _broker(workdir, "keys", "rotate", "--tenant", "no-such-tenant")
    assert "tenant" in _one_clean_line(missing)


def _check_a_second_dev_leaves_it_alone(dev: DevProcess, data_dir: Path) -> None:
    """A second `make dev` in the same directory says who runs and leaves it alone."""
    config = (data_dir / "vault" / "config.hcl").read_bytes()
    second = DevProcess(data_dir, free_port())
    assert second.proc.wait(timeout=60) == 1
    second.stop()
    said = "".join(second.output)
    assert f"already running (pid {dev.proc.pid}, {dev.url})" in said, said
    assert "Traceback" not in said
    assert (data_dir / "vault" / "config.hcl").read_bytes() == config
    assert httpx.get(f"{dev.url}/readyz").status_code == 200


def test_operator_commands_and_bao_work_against_the_running_dev_stack(data_dir: Path) -> None:
    dev = DevProcess(data_dir, free_port())
    stripe_key = "sk_test_" + "Canary" * 6
    try:
        tokens = dev.tokens()
        dev.wait_ready()
        _check_banner_and_env_file(dev, data_dir, tokens)
        _bao_kv_put_as_the_readme_says(data_dir.parent, stripe_key)
        _check_operator_commands(dev, data_dir, tokens, stripe_key)
        _check_a_second_dev_leaves_it_alone(dev, data_dir)
    finally:
        dev.stop()
    assert dev.proc.returncode == 0, "".join(dev.output[-40:])
    # The env file's addresses and token die with the stack.
    assert not (data_dir / "dev.env").exists()


def test_broker_dev_with_a_busy_port_stops_before_starting_anything(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dev = DevProcess(data_dir, port)
        assert dev.proc.wait(timeout=60) == 1
        dev.stop()
    said = "".join(dev.output)
    assert f"port {port} on 127.0.0.1 is in use" in said
    assert "--port" in said
    assert "Traceback" not in said
    assert not (data_dir / "vault").exists()  # neither OpenBao nor PostgreSQL was started
    assert not (data_dir / "postgres").exists()


def test_operator_commands_without_a_stack_fail_in_one_line(tmp_path: Path) -> None:
    rotate = _broker(tmp_path, "keys", "rotate", "--all")
    assert "BROKER_DATABASE_URL" in _one_clean_line(rotate)
    find = _broker(tmp_path, "audit", "find-value", str(tmp_path), stdin="x")
    assert find.returncode == 2
    no_vault = subprocess.run(
        [sys.executable, "-m", "broker.cli", "keys", "backfill"],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
            "BROKER_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:1/x",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "BROKER_VAULT_TOKEN" in _one_clean_line(no_vault)


def test_broker_dev_that_cannot_start_says_so_in_one_line(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "vault").write_text("not a directory")  # OpenBao cannot keep its files here
    dev = DevProcess(data_dir, free_port())
    assert dev.proc.wait(timeout=60) == 1
    dev.stop()
    said = [line for line in "".join(dev.output).splitlines() if line.strip()]
    assert "Traceback" not in "".join(said)
    assert said[-1].startswith("error: the dev stack did not start: ")
    assert str(data_dir / "broker.log") in said[-1]
    assert "Traceback" in (data_dir / "broker.log").read_text()  # for whoever debugs it
