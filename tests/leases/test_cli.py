"""`broker leases list | revoke | sweep` on the session's PostgreSQL and Vault and the fakes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from broker.cli import app as cli
from broker.core.config import get_settings
from broker.leases import service as leases
from tests.fakes.providers import VALID, FakeProviders
from tests.leases.conftest import dynamic_tenant, fetch, leasing
from tests.leases.test_dynamic import twilio_works
from tests.support.apps import VaultEndpoint


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
    providers: FakeProviders,
) -> Iterator[None]:
    """The broker's configuration for the CLI, provider calls pointed at the fakes."""
    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {
        "ENV": "test",
        "DATABASE_URL": database_url,
        "VAULT_ADDRS": vault_endpoint.addr,
        "VAULT_TOKEN": broker_vault_token,
        "EGRESS_ALLOW_HTTP": "true",
        "EGRESS_ALLOW_LOOPBACK": "true",
        "TWILIO_BASE_URL": providers.base_url,
        "OPENAI_BASE_URL": providers.base_url,
    }.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _run(*args: str) -> tuple[int, str, str]:
    # The CLI points the root logger at its (captured, then closed) stderr: put it back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(cli, list(args))
    finally:
        root.handlers, root.level = handlers, level
    return result.exit_code, result.stdout, result.stderr


def test_list_revoke_by_service_and_by_tenant(
    dyn: TestClient, providers: FakeProviders, cli_env: None
) -> None:
    tenant = dynamic_tenant(dyn)
    bot = fetch(dyn, tenant, subject="cli-bot")
    sync = fetch(dyn, tenant, subject="cli-sync")

    code, out, _ = _run("leases", "list", "--tenant", tenant, "--json")
    assert code == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert {item["id"] for item in listed} == {bot["lease_id"], sync["lease_id"]}
    for secret in (VALID["twilio"]["auth_token"], bot["fields"]["api_key_secret"]):
        assert secret not in out

    code, out, _ = _run("leases", "revoke", "--service", "cli-bot", "--tenant", tenant)
    assert code == 0, out
    assert json.loads(out)["revoked"] == 1
    assert not twilio_works(providers, bot["fields"])
    assert twilio_works(providers, sync["fields"])

    code, out, _ = _run("leases", "revoke", "--tenant", tenant, "--provider", "twilio")
    assert code == 0
    assert json.loads(out) == {"revoked": 1, "failed": 0, "already": 0, "queued": 0}
    assert not twilio_works(providers, sync["fields"])

    code, _, err = _run("leases", "revoke")
    assert code == 2
    assert "--service" in err


def test_sweep_revokes_what_is_overdue_and_reports_failures(
    dyn: TestClient, providers: FakeProviders, cli_env: None
) -> None:
    tenant = dynamic_tenant(dyn)
    lease = fetch(dyn, tenant)
    # The CLI judges time by the real clock: the lease is made due now (as a rotation does).
    leases.retire_for_root(leasing(dyn), tenant_id=tenant, provider="twilio", reason="test")
    providers.go_down("twilio")
    code, out, err = _run("leases", "sweep")
    assert code == 3
    assert json.loads(out)["failed"] >= 1
    code, out, _ = _run("leases", "list", "--tenant", tenant, "--state", "failing")
    assert lease["lease_id"] in out
    assert "error=unreachable" in out
    providers.come_back("twilio")
    assert twilio_works(providers, lease["fields"])
