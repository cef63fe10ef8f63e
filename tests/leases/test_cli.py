"""`broker leases list | revoke | sweep` on the session's PostgreSQL and Vault and the fakes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.cli import app as cli
from broker.leases import service as leases
from tests.fakes.providers import VALID, FakeProviders
from tests.leases.conftest import dynamic_tenant, fetch, leasing
from tests.leases.test_dynamic import twilio_works
from tests.support.cli import LOOPBACK_EGRESS, broker_env, invoke


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cli_services: dict[str, str],
    providers: FakeProviders,
) -> Iterator[None]:
    """The broker's configuration for the CLI, provider calls pointed at the fakes."""
    with broker_env(
        monkeypatch,
        tmp_path,
        **cli_services,
        **LOOPBACK_EGRESS,
        TWILIO_BASE_URL=providers.base_url,
        OPENAI_BASE_URL=providers.base_url,
    ):
        yield


def _run(*args: str) -> tuple[int, str, str]:
    result = invoke(cli, args)
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
