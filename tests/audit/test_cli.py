"""`broker audit` end to end: real requests through the broker, real OpenBao audit log,
real PostgreSQL trail, then the CLI's report checked request by request."""

from __future__ import annotations

import contextvars
import csv
import gzip
import io
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from broker.audit import vault_log
from broker.audit.cli import audit_app
from broker.core import context
from broker.core.config import get_settings
from broker.vault.bootstrap import create_policy_token
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders
from tests.support.apps import VaultEndpoint
from tests.support.cli import broker_env
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

# Registered the way broker.cli registers it.
root = typer.Typer()
root.add_typer(audit_app, name="audit")


@root.command()
def _other() -> None:
    """A sibling command, so `audit` is a real sub-group as in the `broker` app."""


def run(*args: str, input: str | None = None) -> Any:  # noqa: A002 - CliRunner's name
    return CliRunner().invoke(root, ["audit", *args], input=input)


def jsonl(result: Any) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def in_fresh_context(fn: Callable[[], Any], ctx: context.RequestContext | None = None) -> Any:
    """Run `fn` with no request context (or exactly `ctx`), leaking nothing afterwards."""

    def call() -> Any:
        if ctx is not None:
            context.bind(ctx)
        return fn()

    return contextvars.Context().run(call)


def rid(name: str) -> str:
    return f"audit-{name}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Scenario:
    """Requests made through the broker (and one straight to Vault), by request id."""

    tenant: str
    other_tenant: str
    save: str  # alice saves Shopify credentials: Vault writes + a trail event
    patch: str  # alice edits settings: a trail event only
    denied: str  # mallory lacks the scope: a trail denial that never reaches Vault
    vault_denied: str  # a service token without the policy: Vault says permission denied
    other_save: str  # bob, another tenant
    bob: str
    fetch: str  # a service fetches the credentials: Vault reads only
    outside: str  # a service not serving the tenant: a recorded 404, never reaches Vault
    service: str
    log: Path
    database_url: str


BRANDING = {"branding": {"business_name": "Audited Shop"}}
TWILIO = "/v1/tenants/settings/integrations/twilio"


def _denied_by_vault(
    vault_endpoint: VaultEndpoint, vault_admin: VaultGateway, tenant: str, request_id: str
) -> None:
    """A service whose Vault token lacks the broker policy reads the tenant's secret."""
    rogue = VaultGateway(
        addrs=[vault_endpoint.addr], token=create_policy_token(vault_admin, "service-reader")
    )
    try:
        with pytest.raises(VaultMisconfigured):
            in_fresh_context(
                lambda: rogue.kv.read(f"tenants/{tenant}/integrations/shopify"),
                context.RequestContext(
                    request_id=request_id, actor="service:rogue", action="credentials.fetch"
                ),
            )
    finally:
        rogue.close()


@pytest.fixture(scope="module")
def scenario(
    client: TestClient,
    vault_endpoint: VaultEndpoint,
    vault_admin: VaultGateway,
    database_url: str,
    providers: FakeProviders,
) -> Scenario:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    tenant = make_tenant(client)
    other = make_tenant(client)
    ids = {
        name: rid(name)
        for name in ("save", "patch", "denied", "vdeny", "other", "fetch", "outside")
    }

    alice = bearer(token("tenant:admin", tenant_id=tenant, subject="alice"))
    mallory = bearer(token("integrations:view", tenant_id=tenant, subject="mallory"))
    bob_name = f"bob-{uuid.uuid4().hex[:8]}"
    bob = bearer(token("tenant:admin", tenant_id=other, subject=bob_name))
    service_name = f"catalog-{uuid.uuid4().hex[:8]}"
    worker = bearer(
        token("credentials:read", kind="service", tenants=(tenant,), subject=service_name)
    )
    stranger = bearer(token("credentials:read", kind="service", tenants=(other,), subject="nosy"))
    shopify, fields = "/v1/tenants/settings/integrations/shopify", dict(VALID["shopify"])
    fetch = f"/v1/credentials/{tenant}/shopify"
    calls: list[tuple[str, str, dict[str, str], str, int, Any]] = [
        ("PUT", shopify, alice, ids["save"], 200, {"fields": fields}),
        ("PATCH", "/v1/tenants/settings", alice, ids["patch"], 200, BRANDING),
        ("PUT", shopify, mallory, ids["denied"], 403, {"fields": fields}),
        ("PUT", TWILIO, bob, ids["other"], 200, {"fields": dict(VALID["twilio"])}),
        ("GET", fetch, worker, ids["fetch"], 200, None),
        ("GET", fetch, stranger, ids["outside"], 404, None),
    ]
    for method, path, headers, request_id, status, body in calls:
        answer = client.request(
            method, path, json=body, headers=headers | {"X-Request-Id": request_id}
        )
        assert answer.status_code == status, answer.text
    _denied_by_vault(vault_endpoint, vault_admin, tenant, ids["vdeny"])
    return Scenario(
        tenant=tenant,
        other_tenant=other,
        save=ids["save"],
        patch=ids["patch"],
        denied=ids["denied"],
        vault_denied=ids["vdeny"],
        other_save=ids["other"],
        bob=bob_name,
        fetch=ids["fetch"],
        outside=ids["outside"],
        service=service_name,
        log=vault_endpoint.audit_log,
        database_url=database_url,
    )


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean BROKER_* environment for commands that read the configuration."""
    with broker_env(monkeypatch, tmp_path):
        yield monkeypatch


def by_request(rows: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    out: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["request_id"], []).append(row)
    return out


# -- the report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(scenario: Scenario) -> dict[str | None, list[dict[str, Any]]]:
    """The tenant's report as JSON lines, grouped by request id."""
    s = scenario
    rows = jsonl(
        run(str(s.log), "--tenant", s.tenant, "--format", "jsonl", "--database-url", s.database_url)
    )
    assert rows == sorted(rows, key=lambda r: r["time"])
    assert {row["tenant"] for row in rows} == {s.tenant}
    return by_request(rows)


def _subset(row: dict[str, Any], **expected: Any) -> dict[str, Any]:
    return {name: row[name] for name in expected}


def test_a_save_shows_its_vault_calls_and_its_broker_event(
    scenario: Scenario, report: dict[str | None, list[dict[str, Any]]]
) -> None:
    s = scenario
    save = report[s.save]
    vault = [r for r in save if r["source"] == "vault"]
    assert vault, "the save left no Vault audit entries"
    expected: dict[str, Any] = {
        "actor": "user:alice",
        "tenant": s.tenant,
        "provider": "shopify",  # Transit calls inherit it from the KV path
        "outcome": "allowed",
        "allowed": True,
        "from": "testclient",  # the caller's address, from the broker trail
        "remote_address": "127.0.0.1",  # what Vault saw: the broker
    }
    for row in vault:
        assert _subset(row, **expected) == expected
    kv_path = f"secret/data/tenants/{s.tenant}/integrations/shopify"
    assert any(r["path"] == kv_path and r["operation"] in ("create", "update") for r in vault)
    assert any(r["path"] == f"transit/encrypt/tenant-{s.tenant}" for r in vault)
    [event] = [r for r in save if r["source"] == "broker"]
    expected = {
        "action": "integration.save",
        "actor": "user:alice",
        "path": f"tenants/{s.tenant}/integrations/shopify",
        "outcome": "allowed",
    }
    assert _subset(event, **expected) == expected
    assert event["detail"]["kv_version"] == 1


def test_a_settings_change_and_a_broker_denial_are_trail_only(
    scenario: Scenario, report: dict[str | None, list[dict[str, Any]]]
) -> None:
    s = scenario
    [patch] = report[s.patch]  # a settings change never touches Vault
    expected: dict[str, Any] = {
        "source": "broker",
        "action": "settings.update",
        "actor": "user:alice",
        "path": f"tenants/{s.tenant}/settings",
        "outcome": "allowed",
        "from": "testclient",
    }
    assert _subset(patch, **expected) == expected
    [denied] = report[s.denied]  # a missing scope: it never reached Vault
    expected = {
        "source": "broker",
        "actor": "user:mallory",
        "tenant": s.tenant,
        "outcome": "denied",
        "allowed": False,
        "provider": "shopify",
    }
    assert _subset(denied, **expected) == expected
    assert "integrations:manage" in (denied["error"] or "")


def test_service_fetches_are_named_after_the_service(
    scenario: Scenario, report: dict[str | None, list[dict[str, Any]]]
) -> None:
    s = scenario
    fetch = report[s.fetch]
    assert {r["source"] for r in fetch} == {"vault"}
    expected: dict[str, Any] = {
        "actor": f"service:{s.service}",
        "tenant": s.tenant,
        "provider": "shopify",
        "outcome": "allowed",
        "action": "credentials.fetch:shopify",
    }
    for row in fetch:
        assert _subset(row, **expected) == expected
    kv_path = f"secret/data/tenants/{s.tenant}/integrations/shopify"
    assert any(r["path"] == kv_path and r["operation"] == "read" for r in fetch)
    assert any(r["path"] == f"transit/decrypt/tenant-{s.tenant}" for r in fetch)
    # A service that does not serve this tenant: refused (as a 404) before Vault.
    [outside] = report[s.outside]
    expected = {
        "source": "broker",
        "actor": "service:nosy",
        "tenant": s.tenant,
        "provider": "shopify",
        "outcome": "denied",
        "from": "testclient",
    }
    assert _subset(outside, **expected) == expected


def test_vault_denials_show_and_other_tenants_stay_out(
    scenario: Scenario, report: dict[str | None, list[dict[str, Any]]]
) -> None:
    s = scenario
    [vault_denied] = report[s.vault_denied]
    expected: dict[str, Any] = {
        "source": "vault",
        "actor": "service:rogue",
        "tenant": s.tenant,
        "path": f"secret/data/tenants/{s.tenant}/integrations/shopify",
        "operation": "read",
        "outcome": "denied",
        "error": "permission denied",
        "action": "credentials.fetch",
    }
    assert _subset(vault_denied, **expected) == expected
    assert vault_denied["detail"]["policies"] == ["service-reader"]
    assert s.other_save not in report


def test_who_accessed_tenant_x_in_the_last_24_hours_in_one_command(scenario: Scenario) -> None:
    s = scenario
    result = run(
        str(s.log), "--tenant", s.tenant, "--since", "24h", "--database-url", s.database_url
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["TIME", "SOURCE", "ACTOR", "TENANT"]
    assert "FROM" in header
    assert "OUTCOME" in header

    def line_of(request_id: str, needle: str) -> str:
        found = [line for line in lines if request_id in line and needle in line]
        assert found, f"no line for {request_id} with {needle!r}:\n{result.stdout}"
        return str(found[0])

    save = line_of(s.save, f"secret/data/tenants/{s.tenant}/integrations/shopify")
    for word in ("vault", "user:alice", s.tenant, "testclient", "allowed"):
        assert word in save
    vault_denied = line_of(s.vault_denied, "service:rogue")
    for word in (s.tenant, f"read secret/data/tenants/{s.tenant}/integrations/shopify", "denied"):
        assert word in vault_denied
    denied = line_of(s.denied, "user:mallory")
    for word in ("broker", s.tenant, "testclient", "denied"):
        assert word in denied
    fetch = line_of(s.fetch, f"read secret/data/tenants/{s.tenant}/integrations/shopify")
    for word in ("vault", f"service:{s.service}", s.tenant, "allowed"):
        assert word in fetch
    outside = line_of(s.outside, "service:nosy")
    for word in ("broker", s.tenant, "testclient", "denied"):
        assert word in outside
    patch = line_of(s.patch, "settings.update")
    assert "allowed" in patch
    assert s.other_save not in result.stdout
    assert "denied" in result.stderr  # the summary line

    # The window really bounds the report.
    future = run(str(s.log), "--tenant", s.tenant, "--since", "2999-01-01", "--no-trail")
    assert future.exit_code == 0
    assert "no matching entries" in future.stderr
    assert s.save not in future.stdout
    earlier = jsonl(
        run(
            str(s.log),
            "--tenant",
            s.tenant,
            "--until",
            "1h",
            "-f",
            "jsonl",
            "--database-url",
            s.database_url,
        )
    )
    assert earlier == []


def test_denied_actor_and_provider_filters(scenario: Scenario) -> None:
    s = scenario
    common = (str(s.log), "--tenant", s.tenant, "-f", "jsonl", "--database-url", s.database_url)
    denied = jsonl(run(*common, "--denied"))
    assert {r["request_id"] for r in denied} == {s.denied, s.vault_denied, s.outside}
    assert all(r["outcome"] == "denied" for r in denied)

    rogue = jsonl(run(*common, "--actor", "rogue"))
    assert {r["request_id"] for r in rogue} == {s.vault_denied}
    alice = jsonl(run(*common, "--actor", "user:alice"))
    assert {r["request_id"] for r in alice} == {s.save, s.patch}

    shopify = jsonl(run(*common, "--provider", "shopify"))
    assert {r["request_id"] for r in shopify} == {
        s.save,
        s.denied,
        s.vault_denied,
        s.fetch,
        s.outside,
    }
    services = jsonl(run(*common, "--actor", s.service))
    assert {r["request_id"] for r in services} == {s.fetch}
    assert jsonl(run(*common, "--provider", "twilio")) == []

    # Across tenants, an actor filter alone finds bob's request only.
    bob = jsonl(run(str(s.log), "--actor", f"user:{s.bob}", "-f", "jsonl", "--no-trail"))
    assert {r["request_id"] for r in bob} == {s.other_save}
    assert {r["tenant"] for r in bob} == {s.other_tenant}
    assert {r["provider"] for r in bob} == {"twilio"}


def test_csv_and_jsonl_carry_the_same_rows(scenario: Scenario) -> None:
    s = scenario
    common = (str(s.log), "--tenant", s.tenant, "--database-url", s.database_url)
    as_json = jsonl(run(*common, "--format", "jsonl"))
    result = run(*common, "--format", "csv")
    assert result.exit_code == 0, result.output
    as_csv = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(as_csv) == len(as_json) > 0
    for from_csv, from_json in zip(as_csv, as_json, strict=True):
        for name in ("time", "source", "request_id", "actor", "tenant", "path", "outcome"):
            assert from_csv[name] == (from_json[name] or ""), name
        assert from_csv["allowed"] == ("true" if from_json["allowed"] else "false")
        assert from_csv["from"] == (from_json["from"] or "")
        if from_json["detail"]:
            assert json.loads(from_csv["detail"]) == from_json["detail"]


def test_rotated_gzipped_logs_are_read_too(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    lines = s.log.read_bytes().splitlines(keepends=True)
    # Rotate in the middle of the saved request, so a request and its response
    # sit in different files.
    cut = next(i for i, line in enumerate(lines) if s.save.encode() in line) + 1
    rotated = tmp_path / "audit.log.1.gz"
    rotated.write_bytes(gzip.compress(b"".join(lines[:cut])))
    live = tmp_path / "audit.log"
    live.write_bytes(b"".join(lines[cut:]))
    whole = tmp_path / "whole.log.gz"
    whole.write_bytes(gzip.compress(b"".join(lines)))

    args = ("--tenant", s.tenant, "-f", "jsonl", "--no-trail")
    plain = jsonl(run(str(s.log), *args))
    assert plain
    assert jsonl(run(str(whole), *args)) == plain
    assert jsonl(run(str(rotated), str(live), *args)) == plain
    split = vault_log.load([rotated, live], vault_log.Filters(tenant=s.tenant))
    assert all(call.outcome != "unknown" for call in split if call.broker_request_id == s.save)


def test_default_log_paths_and_database_come_from_the_configuration(
    scenario: Scenario, cli_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s = scenario
    data_dir = tmp_path / "data"
    (data_dir / "vault").mkdir(parents=True)
    shutil.copy(s.log, data_dir / "vault" / "audit.log")
    cli_env.setenv("BROKER_DATA_DIR", str(data_dir))

    without_db = run("--tenant", s.tenant, "-f", "jsonl")
    rows = jsonl(without_db)
    assert "without the broker's trail" in without_db.stderr
    assert {r["source"] for r in rows} == {"vault"}
    assert s.save in {r["request_id"] for r in rows}

    cli_env.setenv("BROKER_DATABASE_URL", s.database_url)
    get_settings.cache_clear()
    rows = jsonl(run("--tenant", s.tenant, "-f", "jsonl"))
    assert {r["source"] for r in rows} == {"vault", "broker"}
    assert s.patch in {r["request_id"] for r in rows}
    # `report` by name works the same
    assert jsonl(run("report", "--tenant", s.tenant, "-f", "jsonl")) == rows


def test_usage_errors(scenario: Scenario, cli_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = run(str(tmp_path / "nope.log"))
    assert missing.exit_code == 2
    assert "no such audit log" in missing.stderr
    bad_time = run(str(scenario.log), "--since", "last tuesday", "--no-trail")
    assert bad_time.exit_code == 2
    assert "not a time" in bad_time.output
    cli_env.setenv("BROKER_DATA_DIR", str(tmp_path / "empty"))
    nothing = run("--no-trail")
    assert nothing.exit_code == 2
    assert "no audit log under" in nothing.stderr
    bad_db = run(
        str(scenario.log), "--database-url", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"
    )
    assert bad_db.exit_code == 1
    assert "--no-trail" in bad_db.stderr
    assert "hunter2" not in bad_db.output
    helped = run("--help")
    assert helped.exit_code == 0
    assert "find-value" in helped.stdout
    assert "security team" in helped.stdout


# -- find-value ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    value: str
    path: str
    writer_id: str
    reader_id: str


@pytest.fixture(scope="module")
def planted(scenario: Scenario, vault_admin: VaultGateway, broker_vault: VaultGateway) -> Planted:
    """A secret written to KV as is (as a leaked key might be), then read by a service."""
    value = f"sk-leaked-{uuid.uuid4().hex}"
    path = f"tenants/{scenario.tenant}/integrations/openai"
    writer_id, reader_id = rid("plant"), rid("read")
    in_fresh_context(
        lambda: vault_admin.kv.write(path, {"api_key": value}, cas=None),
        context.RequestContext(request_id=writer_id),
    )
    in_fresh_context(
        lambda: broker_vault.kv.read(path),
        context.RequestContext(
            request_id=reader_id, actor="service:catalog-sync", tenant_id=scenario.tenant
        ),
    )
    return Planted(value=value, path=path, writer_id=writer_id, reader_id=reader_id)


@pytest.fixture
def auditor_env(
    cli_env: pytest.MonkeyPatch, vault_endpoint: VaultEndpoint, vault_admin: VaultGateway
) -> pytest.MonkeyPatch:
    cli_env.setenv("BROKER_VAULT_ADDRS", vault_endpoint.addr)
    cli_env.setenv("BROKER_VAULT_TOKEN", create_policy_token(vault_admin, "security-auditor"))
    return cli_env


def test_find_value_lists_every_entry_that_touched_it(
    scenario: Scenario, planted: Planted, auditor_env: pytest.MonkeyPatch
) -> None:
    result = run("find-value", str(scenario.log), "-f", "jsonl", input=planted.value + "\n")
    rows = jsonl(result)
    assert planted.value not in result.output
    kv_path = f"secret/data/{planted.path}"
    assert {r["request_id"] for r in rows} == {planted.writer_id, planted.reader_id}
    [write] = [r for r in rows if r["request_id"] == planted.writer_id]
    assert write["path"] == kv_path
    assert write["operation"] in ("create", "update")
    assert write["vault_identity"] == "root"  # straight to Vault, not through the broker
    [read] = [r for r in rows if r["request_id"] == planted.reader_id]
    assert read["path"] == kv_path
    assert read["operation"] == "read"
    assert read["actor"] == "service:catalog-sync"
    assert read["tenant"] == scenario.tenant
    assert read["outcome"] == "allowed"
    assert "2 audit entries touched the value (hmac-sha256:" in result.stderr

    # The lookups themselves are audited, named after whoever ran them.
    table = run("find-value", str(scenario.log), "--include-lookups", input=planted.value)
    assert table.exit_code == 0, table.output
    assert planted.value not in table.output
    assert "sys/audit-hash/broker" in table.stdout
    lookups = [line for line in table.stdout.splitlines() if "sys/audit-hash/broker" in line]
    assert all("user:cli:" in line for line in lookups)
    assert planted.reader_id in table.stdout

    # A value that was never stored touches nothing.
    none = run("find-value", str(scenario.log), "-f", "jsonl", input="never-stored-" + "x" * 20)
    assert jsonl(none) == []


def test_find_value_refuses_without_input_or_permission(
    scenario: Scenario,
    planted: Planted,
    auditor_env: pytest.MonkeyPatch,
    vault_admin: VaultGateway,
) -> None:
    empty = run("find-value", str(scenario.log), input="")
    assert empty.exit_code == 2
    assert "no value on stdin" in empty.stderr
    just_newline = run("find-value", str(scenario.log), input="\n")
    assert just_newline.exit_code == 2

    # The value is never an argument: a stray one is taken as a log and not echoed.
    stray = run("find-value", planted.value, input=planted.value)
    assert stray.exit_code == 2
    assert planted.value not in stray.output

    auditor_env.setenv("BROKER_VAULT_TOKEN", create_policy_token(vault_admin, "service-reader"))
    get_settings.cache_clear()
    refused = run("find-value", str(scenario.log), input=planted.value)
    assert refused.exit_code == 1
    assert "security-auditor" in refused.stderr
    assert planted.value not in refused.output


def test_find_value_with_an_unknown_device(
    scenario: Scenario, planted: Planted, auditor_env: pytest.MonkeyPatch
) -> None:
    result = run("find-value", str(scenario.log), "--device", "nope", input=planted.value)
    assert result.exit_code == 1
    assert "'nope'" in result.stderr
    assert planted.value not in result.output
