"""`broker migrate legacy`: a real legacy table in PostgreSQL, real OpenBao, no mocks.

Covers the issue's list: dirty data, 1,000 tenants that all decrypt back to
their source, nothing left in plaintext after finalize, reruns that change
nothing, conflicts that overwrite nothing, Vault killed mid-run, dry runs that
write nothing, and retired columns that refuse to be read.
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import typer
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from broker.core.config import get_settings
from broker.core.errors import BrokerError
from broker.devstack.openbao import OpenBaoServer
from broker.integrations.service import read_credentials
from broker.legacy.cli import migrate_app
from broker.legacy.migrate import (
    finalize_legacy,
    map_metadata,
    migrate_legacy,
    normalise_tenant_id,
)
from broker.legacy.source import LegacyColumnsRetired, LegacyKey
from broker.models import AuditEvent, IntegrationCredential, LegacyMigration, Tenant
from broker.settings.schemas import default_group
from broker.vault.bootstrap import bootstrap, create_policy_token
from broker.vault.errors import VaultUnavailable, WriteOutcomeUnknown
from broker.vault.gateway import VaultGateway
from tests.conftest import VaultEndpoint, bearer, make_tenant, token
from tests.fakes.providers import VALID
from tests.legacy.conftest import LegacyDb, twilio_pair

T = TypeVar("T")

# Registered the way broker.cli registers it.
root = typer.Typer()
root.add_typer(migrate_app, name="migrate")


@root.command()
def _other() -> None:
    """A sibling command, so `migrate` is a real sub-group as in the `broker` app."""


def run_cli(*args: str) -> Any:
    # The CLI points the root logger at its (captured, then closed) stderr: put it back.
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    try:
        return CliRunner().invoke(root, ["migrate", "legacy", *args])
    finally:
        root_logger.handlers, root_logger.level = handlers, level


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    database_url: str,
) -> Iterator[None]:
    """The broker's configuration for the CLI: the session's PostgreSQL and Vault."""
    import os

    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("BROKER_ENV", "test")
    monkeypatch.setenv("BROKER_DATABASE_URL", database_url)
    monkeypatch.setenv("BROKER_VAULT_ADDRS", vault_endpoint.addr)
    monkeypatch.setenv("BROKER_VAULT_TOKEN", broker_vault_token)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def parallel(fn: Callable[[str], T], items: list[str]) -> list[T]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(fn, items))


def kv_version(vault: VaultGateway, tenant_id: str) -> int:
    meta = vault.kv.metadata(f"tenants/{tenant_id}/integrations/twilio")
    return int(meta["current_version"]) if meta else 0


def decrypted(vault: VaultGateway, tenant_id: str) -> tuple[str | None, str | None]:
    creds, _ = read_credentials(vault, tenant_id=tenant_id, provider="twilio")
    return creds.reveal("account_sid"), creds.reveal("auth_token")


def progress(engine: Engine, source: str) -> dict[str, LegacyMigration]:
    with Session(engine) as session:
        rows = session.exec(select(LegacyMigration).where(LegacyMigration.source == source))
        return {row.legacy_id: row for row in rows}


def tenant_exists(engine: Engine, tenant_id: str) -> bool:
    with Session(engine) as session:
        return session.get(Tenant, tenant_id) is not None


def settings_of(client: TestClient, tenant_id: str) -> dict[str, Any]:
    response = client.get(
        "/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id=tenant_id))
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_tenant(report: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {t["tenant_id"]: t for t in report["tenants"] if t["tenant_id"]}


_HEX_RUN = re.compile(r"[0-9a-f]{32,}")


def plaintext_in_postgres(engine: Engine, secrets: set[str]) -> set[str]:
    """Which of `secrets` (32 lowercase hex each) appear anywhere in the database."""
    found: set[str] = set()
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_type = 'BASE TABLE'"
                " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
        ).all()
        for schema, table in tables:
            for (row,) in conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t')):
                for run in _HEX_RUN.findall(row):
                    found.update(run[i : i + 32] for i in range(len(run) - 31))
    return found & secrets


# -- pure rules ---------------------------------------------------------------------------


def test_legacy_ids_become_tenant_ids_deterministically() -> None:
    assert normalise_tenant_id("acme-shop") == "acme-shop"
    assert normalise_tenant_id("  Acme Shop  ") == "acme-shop"
    assert normalise_tenant_id("ACME__Shop!!") == "acme-shop"
    assert normalise_tenant_id("Café Olé") == "cafe-ole"
    assert normalise_tenant_id("42") == "42"
    assert normalise_tenant_id("settings") == "settings-legacy"
    assert normalise_tenant_id("x" * 80) == "x" * 63
    assert normalise_tenant_id("a" * 62 + "-b") == "a" * 62
    assert normalise_tenant_id("!!!") is None
    assert normalise_tenant_id("   ") is None
    # Different spellings of one shop land on one tenant: the migration must notice.
    assert normalise_tenant_id("Beta_Shop") == normalise_tenant_id("beta shop") == "beta-shop"


def test_metadata_keys_map_onto_settings_groups_and_the_rest_is_reported() -> None:
    metadata = {
        "business_hours": {"timezone": "Africa/Nairobi", "monday": {"open": "08:00"}},
        "branding.logo_url": "https://cdn.example.com/logo.png",
        "branding.primary_color": "blue",
        "notifications": {"sms": {"payment_failed": False}},
        "currency": "KES",
        "integrations_status": {"twilio": {"enabled": True}},
        "feature_flags": "all",
        "legacy_plan": "gold",
        "api_key=sk-live-123": "x",
        "catalog": None,
    }
    patches, unmapped = map_metadata(metadata, default_group)
    assert patches == {
        "business_hours": {"timezone": "Africa/Nairobi", "monday": {"open": "08:00"}},
        "branding": {"logo_url": "https://cdn.example.com/logo.png"},
        "notification_settings": {"sms": {"payment_failed": False}},
        "localization": {"currency": "KES"},
    }
    reasons = {u.key: u.reason for u in unmapped}
    assert reasons["branding.primary_color"].startswith("not valid for branding: primary_color")
    assert "maintained by the broker" in reasons["integrations_status"]
    assert reasons["feature_flags"] == "feature_flags must be an object"
    assert reasons["legacy_plan"] == "no settings group for this key"
    assert reasons["catalog"].startswith("the value is null")
    # A key that might be a pasted secret is reported, but not by name.
    assert "(a key that is not shown)" in reasons
    assert not any("sk-live" in key for key in reasons)
    assert len(unmapped) == 6
    # Not an object at all: reported as a whole, never dropped.
    assert map_metadata("free text", default_group)[1][0].key == "(metadata)"
    assert map_metadata(None, default_group) == ({}, [])


# -- the scenarios ----------------------------------------------------------------


def test_dirty_legacy_data_through_the_cli(
    cli_env: None,
    legacy: LegacyDb,
    engine: Engine,
    client: TestClient,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    vault_endpoint: VaultEndpoint,
    prefix: str,
) -> None:
    p = prefix
    sid_a, tok_a = twilio_pair()
    sid_c, _ = twilio_pair()
    _, tok_d = twilio_pair()
    sid_e, tok_e = twilio_pair()
    sid_f, tok_f1 = twilio_pair()
    _, tok_f2 = twilio_pair()
    sid_g, tok_g = twilio_pair()
    _, tok_h = twilio_pair()
    sid_i, tok_i = twilio_pair()
    bad_sid = "ACZZ" + "9" * 30
    legacy.insert(
        [
            {
                "id": f"  Acme Shop {p} ",
                "name": " Acme Shop ",
                "twilio_sid": f"  {sid_a}  ",
                "twilio_token": f"\t{tok_a}\n",
                "metadata": {
                    "business_hours": {
                        "timezone": "Africa/Nairobi",
                        "monday": {"open": "08:00", "close": "18:00"},
                    },
                    "branding.logo_url": "https://cdn.example.com/acme.png",
                    "branding.primary_color": "blue",
                    "notifications": {"email": {"daily_summary": False}},
                    "integrations_status": {"twilio": {"enabled": True}},
                    "legacy_plan": "gold",
                },
            },
            {
                "id": f"empty-{p}",
                "name": "Empty Strings",
                "twilio_sid": "",
                "twilio_token": "   ",
                "metadata": {
                    "features": {"ai_responses_enabled": False},
                    "timezone": "Africa/Lagos",
                },
            },
            {
                "id": f"sid-only-{p}",
                "twilio_sid": sid_c,
                "twilio_token": "",
                "metadata": {"language": "sw"},
            },
            {"id": f"token-only-{p}", "twilio_token": tok_d},
            {"id": f"twins-{p}", "name": "Twins", "twilio_sid": sid_e, "twilio_token": tok_e},
            {"id": f"twins-{p}", "name": "Twins", "twilio_sid": sid_e, "twilio_token": tok_e},
            {"id": f"dup-{p}", "twilio_sid": sid_f, "twilio_token": tok_f1},
            {"id": f"dup-{p}", "twilio_sid": sid_f, "twilio_token": tok_f2},
            {"id": f"Beta_Shop-{p}", "twilio_sid": sid_g, "twilio_token": tok_g},
            {
                "id": f"beta shop-{p}",
                "twilio_sid": sid_g,
                "twilio_token": tok_g,
                "metadata": {"x": 1},
            },
            {"id": f"bad-sid-{p}", "twilio_sid": bad_sid, "twilio_token": tok_h},
            {
                "id": f"text-meta-{p}",
                "twilio_sid": sid_i,
                "twilio_token": tok_i,
                "metadata": "notes",
            },
            {"id": "!!!", "name": "Punctuation"},
            {"id": None, "name": "No id at all"},
        ]
    )
    acme, empty, sid_only = f"acme-shop-{p}", f"empty-{p}", f"sid-only-{p}"
    result = run_cli("--source-dsn", legacy.url, "--table", legacy.table, "--batch", "3", "--json")
    every_secret = [sid_a, tok_a, sid_c, tok_d, sid_e, tok_e, sid_f, tok_f1, tok_f2, sid_g, tok_g]
    every_secret += [bad_sid, tok_h, sid_i, tok_i]
    assert not [s for s in every_secret if s in result.output]
    assert result.exit_code == 1, result.output  # conflicts and failures
    report = json.loads(result.stdout)
    assert report["summary"] == {
        "tenants": 11,
        "migrated": 4,
        "already_migrated": 0,
        "skipped": 2,
        "conflicts": 2,
        "failed": 3,
        "unmapped_keys": 4,
        "not_reached": 0,
    }
    tenants = by_tenant(report)

    # Whitespace stripped, metadata routed into the right groups, the rest reported.
    assert tenants[acme]["status"] == "migrated"
    assert tenants[acme]["credential"] == "stored"
    assert tenants[acme]["settings_groups"] == [
        "branding",
        "business_hours",
        "notification_settings",
    ]
    unmapped = {u["key"]: u["reason"] for u in tenants[acme]["unmapped_keys"]}
    assert set(unmapped) == {"branding.primary_color", "integrations_status", "legacy_plan"}
    assert report["id_changes"][f"  Acme Shop {p} "] == acme
    assert decrypted(broker_vault, acme) == (sid_a, tok_a)
    settings = settings_of(client, acme)
    assert settings["business_hours"]["timezone"] == "Africa/Nairobi"
    assert settings["business_hours"]["monday"] == {
        "open": "08:00",
        "close": "18:00",
        "closed": False,
    }
    assert settings["branding"]["logo_url"] == "https://cdn.example.com/acme.png"
    assert settings["branding"]["primary_color"] == "#007bff"  # "blue" was refused, not guessed
    assert settings["notification_settings"]["email"]["daily_summary"] is False
    assert settings["integrations_status"]["twilio"]["enabled"] is True  # the broker's own
    with Session(engine) as session:
        tenant = session.get(Tenant, acme)
        assert tenant is not None
        assert tenant.name == "Acme Shop"
        row = session.get(IntegrationCredential, (acme, "twilio"))
        assert row is not None
        assert row.connection_test_skipped is True  # the skipped live test is recorded
        events = session.exec(
            select(AuditEvent).where(
                AuditEvent.tenant_id == acme, AuditEvent.action == "legacy.migrate"
            )
        ).all()
        assert [e.detail["connection_test"] for e in events] == ["skipped"]
        assert events[0].actor == f"user:legacy-migration:{getpass.getuser()}"
    entry = vault_admin.kv.read(f"tenants/{acme}/integrations/twilio")
    assert entry is not None
    assert entry.data["public"]["connection_test"] == "skipped"

    # Empty strings are missing values; metadata still moves.
    assert tenants[empty]["status"] == "migrated"
    assert tenants[empty]["credential"] == "absent"
    assert settings_of(client, empty)["feature_flags"]["ai_responses_enabled"] is False
    assert settings_of(client, empty)["localization"]["timezone"] == "Africa/Lagos"
    assert kv_version(vault_admin, empty) == 0

    # A sid without a token (and the reverse) is skipped, not failed; metadata moves.
    for tenant_id, missing in ((sid_only, "auth token"), (f"token-only-{p}", "account SID")):
        assert tenants[tenant_id]["status"] == "skipped"
        assert tenants[tenant_id]["credential"] == "incomplete"
        assert missing in tenants[tenant_id]["reason"]
        assert kv_version(vault_admin, tenant_id) == 0
    assert settings_of(client, sid_only)["localization"]["default_language"] == "sw"

    # Identical duplicates are one tenant; disagreeing ones are a conflict, nothing written.
    assert tenants[f"twins-{p}"]["status"] == "migrated"
    assert decrypted(broker_vault, f"twins-{p}") == (sid_e, tok_e)
    assert tenants[f"dup-{p}"]["status"] == "conflict"
    assert tenants[f"beta-shop-{p}"]["status"] == "conflict"
    assert tenants[f"beta-shop-{p}"]["legacy_ids"] == [f"Beta_Shop-{p}", f"beta shop-{p}"]
    assert not tenant_exists(engine, f"dup-{p}")
    assert not tenant_exists(engine, f"beta-shop-{p}")

    # A malformed sid fails that tenant only, and the report names the field, not the value.
    assert tenants[f"bad-sid-{p}"]["status"] == "failed"
    assert "account_sid must be 'AC'" in tenants[f"bad-sid-{p}"]["reason"]
    assert not tenant_exists(engine, f"bad-sid-{p}")
    assert tenants[f"text-meta-{p}"]["unmapped_keys"][0]["key"] == "(metadata)"
    failed = [t for t in report["tenants"] if t["status"] == "failed" and not t["tenant_id"]]
    assert sorted(t["reason"] for t in failed) == [
        "1 legacy row(s) have no id and cannot be migrated",
        "the legacy id has no letters or digits to make a tenant id from",
    ]

    # Every Vault call named the migration and the tenant in Vault's own audit log.
    if vault_endpoint.audit_log is not None:
        entries = [
            json.loads(line)
            for line in vault_endpoint.audit_log.read_text().splitlines()
            if acme in line and '"legacy-' in line
        ]
        requests = [e["request"] for e in entries if e["type"] == "request"]
        assert {r["path"] for r in requests} >= {
            f"transit/keys/tenant-{acme}",
            f"transit/encrypt/tenant-{acme}",
            f"secret/data/tenants/{acme}/integrations/twilio",
            f"transit/decrypt/tenant-{acme}",
        }
        for request in requests:
            assert request["headers"]["x-broker-actor"] == [
                f"user:legacy-migration:{getpass.getuser()}"
            ]
            assert request["headers"]["x-broker-tenant"] == [acme]

    # A rerun changes nothing and says so.
    before = (kv_version(vault_admin, acme), settings_of(client, acme)["version"])
    code, again = cli_json("--source-dsn", legacy.url, "--table", legacy.table)
    assert code == 1
    assert again["summary"]["migrated"] == 0
    # Counted apart: migrated by the first run, and skipped again for missing data.
    assert (again["summary"]["already_migrated"], again["summary"]["skipped"]) == (4, 2)
    assert (again["summary"]["conflicts"], again["summary"]["failed"]) == (2, 3)
    assert by_tenant(again)[acme]["reason"] == "already migrated"
    assert by_tenant(again)[acme]["unmapped_keys"] == tenants[acme]["unmapped_keys"]
    assert (kv_version(vault_admin, acme), settings_of(client, acme)["version"]) == before


def test_a_thousand_tenants_migrate_verify_and_finalize(
    legacy: LegacyDb,
    engine: Engine,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    rows = []
    for i in range(1000):
        sid, tok = twilio_pair()
        padded = i % 10 == 0  # some with whitespace around the values
        rows.append(
            {
                "id": f"Shop-{prefix}-{i:04d}",
                "name": f"Shop {i}",
                "twilio_sid": f" {sid} " if padded else sid,
                "twilio_token": f"{tok}\n" if padded else tok,
                "metadata": {"branding.logo_url": f"https://cdn.example.com/{i}.png"},
            }
        )
    legacy.insert(rows)
    expected = {
        f"shop-{prefix}-{i:04d}": (r["twilio_sid"].strip(), r["twilio_token"].strip())
        for i, r in enumerate(rows)
    }
    tenant_ids = sorted(expected)
    source = legacy.source(engine)

    report = migrate_legacy(engine, broker_vault, source, batch_size=100)
    assert report.ok, report.as_dict()["summary"]
    assert report.count("migrated") == 1000
    # Every credential decrypts back to its source value.
    assert parallel(lambda t: decrypted(broker_vault, t), tenant_ids) == [
        expected[t] for t in tenant_ids
    ]
    records = progress(engine, source.label)
    assert {r.status for r in records.values()} == {"verified"}
    assert {r.connection_test for r in records.values()} == {"skipped"}

    # A rerun changes nothing: no Vault writes, no settings or progress updates.
    with engine.connect() as conn:
        snapshot = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM audit_events),"
                " (SELECT sum(version) FROM tenant_settings),"
                " (SELECT max(updated_at) FROM legacy_migrations)"
            )
        ).one()
    again = migrate_legacy(engine, broker_vault, source, batch_size=100)
    assert (again.count("skipped"), again.count("migrated"), again.ok) == (1000, 0, True)
    with engine.connect() as conn:
        assert (
            conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM audit_events),"
                    " (SELECT sum(version) FROM tenant_settings),"
                    " (SELECT max(updated_at) FROM legacy_migrations)"
                )
            ).one()
            == snapshot
        )
    # Exactly one KV version each: stored once, never duplicated.
    assert set(parallel(lambda t: kv_version(vault_admin, t), tenant_ids)) == {1}

    final = finalize_legacy(engine, broker_vault, source, batch_size=250)
    assert final.ok
    assert (final.count("finalized"), final.rows_nulled) == (1000, 1000)
    assert {(r["twilio_sid"], r["twilio_token"]) for r in legacy.rows()} == {(None, None)}
    secrets = {value[-32:] for pair in expected.values() for value in pair}
    assert plaintext_in_postgres(engine, secrets) == set()
    # The broker still has them, and the retired columns refuse to be read.
    assert decrypted(broker_vault, tenant_ids[0]) == expected[tenant_ids[0]]
    with pytest.raises(LegacyColumnsRetired, match="retired"):
        source.rows([LegacyKey(f"Shop-{prefix}-0000", f"Shop-{prefix}-0000")])
    after = migrate_legacy(engine, broker_vault, source, batch_size=500)
    assert (after.count("skipped"), after.ok) == (1000, True)


def test_existing_credentials_are_compared_by_fingerprint_and_never_overwritten(
    legacy: LegacyDb,
    engine: Engine,
    client: TestClient,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    differs, same = f"differs-{prefix}", f"same-{prefix}"
    for tenant_id in (differs, same):
        make_tenant(client, tenant_id)
        response = client.put(
            "/v1/tenants/settings/integrations/twilio",
            json={"fields": VALID["twilio"], "skip_connection_test": True},
            headers=bearer(token("tenant:admin", tenant_id=tenant_id)),
        )
        assert response.status_code == 200, response.text
    theirs = (VALID["twilio"]["account_sid"], VALID["twilio"]["auth_token"])
    mine = twilio_pair()
    legacy.insert(
        [
            {
                "id": differs,
                "twilio_sid": mine[0],
                "twilio_token": mine[1],
                "metadata": {"branding.logo_url": "https://cdn.example.com/other.png"},
            },
            # Same sid and token, but the stored set also has a webhook secret: different.
            {"id": same, "twilio_sid": theirs[0], "twilio_token": theirs[1]},
        ]
    )
    settings_before = settings_of(client, differs)
    report = migrate_legacy(engine, broker_vault, legacy.source(engine))
    outcomes = {o.tenant_id: o for o in report.outcomes}
    assert outcomes[differs].status == "conflict"
    assert outcomes[same].status == "conflict"
    assert not report.ok
    # Both sides untouched: Vault, the tenant's settings, the legacy row.
    assert kv_version(vault_admin, differs) == 1
    creds, _ = read_credentials(broker_vault, tenant_id=differs, provider="twilio")
    assert (creds.reveal("account_sid"), creds.reveal("auth_token")) == theirs
    assert settings_of(client, differs) == settings_before
    assert legacy.rows()[0]["twilio_token"] == mine[1]

    # The tenant saves exactly the legacy set through the API (no webhook secret):
    # now the fingerprints agree and the migration has nothing to do.
    response = client.put(
        "/v1/tenants/settings/integrations/twilio",
        json={
            "fields": {"account_sid": theirs[0], "auth_token": theirs[1]},
            "skip_connection_test": True,
        },
        headers=bearer(token("tenant:admin", tenant_id=same)),
    )
    assert response.status_code == 200, response.text
    version = kv_version(vault_admin, same)
    again = migrate_legacy(engine, broker_vault, legacy.source(engine), tenants=[same])
    assert [(o.status, o.credential, o.reason) for o in again.outcomes] == [
        ("skipped", "unchanged", "already in the broker")
    ]
    assert again.ok
    assert kv_version(vault_admin, same) == version  # nothing written

    final = finalize_legacy(engine, broker_vault, legacy.source(engine))
    statuses = {o.tenant_id: (o.status, o.reason or "") for o in final.outcomes}
    assert statuses[same] == ("finalized", "")
    assert statuses[differs][0] == "left_alone"
    assert "conflict" in statuses[differs][1]
    assert legacy.rows()[0]["twilio_token"] == mine[1]  # left alone means left alone


def test_dry_run_writes_nothing(
    cli_env: None,
    legacy: LegacyDb,
    engine: Engine,
    client: TestClient,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    taken = make_tenant(client, f"taken-{prefix}")
    response = client.put(
        "/v1/tenants/settings/integrations/twilio",
        json={"fields": VALID["twilio"], "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=taken)),
    )
    assert response.status_code == 200, response.text
    rows = [
        {
            "id": f"Dry {prefix} {i}",
            "twilio_sid": sid,
            "twilio_token": tok,
            "metadata": {"branding.logo_url": "https://cdn.example.com/x.png", "odd": 1},
        }
        for i, (sid, tok) in enumerate(twilio_pair() for _ in range(5))
    ]
    sid, tok = twilio_pair()
    rows.append({"id": taken, "twilio_sid": sid, "twilio_token": tok})
    legacy.insert(rows)
    new = [f"dry-{prefix}-{i}" for i in range(5)]

    def state() -> Any:
        with engine.connect() as conn:
            counts = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM tenant_settings),"
                    " (SELECT count(*) FROM legacy_migrations),"
                    " (SELECT count(*) FROM audit_events),"
                    " (SELECT count(*) FROM integration_credentials)"
                )
            ).one()
        vault = [
            (kv_version(vault_admin, t), vault_admin.transit.key_info(f"tenant-{t}")) for t in new
        ]
        return counts, vault, kv_version(vault_admin, taken), legacy.rows()

    before = state()
    code, report = cli_json("--source-dsn", legacy.url, "--table", legacy.table, "--dry-run")
    assert code == 1  # it would meet a conflict
    assert report["dry_run"] is True
    assert report["summary"]["migrated"] == 5
    assert report["summary"]["conflicts"] == 1
    assert report["summary"]["unmapped_keys"] == 5
    assert by_tenant(report)[new[0]]["created"] is True
    assert by_tenant(report)[new[0]]["settings_groups"] == ["branding"]
    assert state() == before

    code, report = cli_json("--source-dsn", legacy.url, "--table", legacy.table)
    assert (code, report["summary"]["migrated"]) == (1, 5)
    after_migration = state()
    code, report = cli_json(
        "--source-dsn", legacy.url, "--table", legacy.table, "--finalize", "--dry-run"
    )
    assert code == 0
    assert (report["summary"]["finalized"], report["summary"]["left_alone"]) == (5, 1)
    assert report["summary"]["rows_nulled"] == 0
    assert state() == after_migration


def test_finalize_retires_only_verified_tenants_and_reading_them_raises(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    pairs = {name: twilio_pair() for name in ("ok1", "ok2", "changes", "partial", "bad")}
    legacy.insert(
        [
            {"id": f"ok1-{prefix}", "twilio_sid": pairs["ok1"][0], "twilio_token": pairs["ok1"][1]},
            {"id": f"ok2-{prefix}", "twilio_sid": pairs["ok2"][0], "twilio_token": pairs["ok2"][1]},
            {
                "id": f"changes-{prefix}",
                "twilio_sid": pairs["changes"][0],
                "twilio_token": pairs["changes"][1],
            },
            {"id": f"partial-{prefix}", "twilio_sid": pairs["partial"][0]},
            {"id": f"bad-{prefix}", "twilio_sid": "AC-nope", "twilio_token": pairs["bad"][1]},
        ]
    )
    source = legacy.source(engine)
    migrate_legacy(engine, broker_vault, source)
    _, newer = twilio_pair()
    # The old application is still live: one tenant's token changes after migration,
    # and a new tenant appears.
    legacy.execute(
        f"UPDATE {legacy.table} SET twilio_token = :t WHERE id = :i", t=newer, i=f"changes-{prefix}"
    )
    late = twilio_pair()
    legacy.insert([{"id": f"late-{prefix}", "twilio_sid": late[0], "twilio_token": late[1]}])

    report = finalize_legacy(engine, broker_vault, source)
    outcomes = {o.tenant_id: o for o in report.outcomes}
    assert outcomes[f"ok1-{prefix}"].status == "finalized"
    assert outcomes[f"ok2-{prefix}"].status == "finalized"
    assert outcomes[f"changes-{prefix}"].status == "failed"
    assert "changed" in (outcomes[f"changes-{prefix}"].reason or "")
    assert outcomes[f"partial-{prefix}"].status == "left_alone"
    assert "auth token" in (outcomes[f"partial-{prefix}"].reason or "")
    assert outcomes[f"bad-{prefix}"].status == "left_alone"
    assert outcomes[f"late-{prefix}"].status == "left_alone"
    assert outcomes[f"late-{prefix}"].reason == "not migrated yet"
    assert not report.ok  # the changed tenant needs attention
    rows = {r["id"]: r for r in legacy.rows()}
    assert rows[f"ok1-{prefix}"]["twilio_sid"] is None
    assert rows[f"ok1-{prefix}"]["twilio_token"] is None
    assert rows[f"changes-{prefix}"]["twilio_token"] == newer
    assert rows[f"partial-{prefix}"]["twilio_sid"] == pairs["partial"][0]
    assert rows[f"late-{prefix}"]["twilio_token"] == late[1]

    # Reading retired columns through the broker's reader is a clear deprecation error.
    retired = LegacyKey(f"ok1-{prefix}", f"ok1-{prefix}")
    with pytest.raises(LegacyColumnsRetired) as caught:
        source.rows([retired])
    assert isinstance(caught.value, DeprecationWarning)
    assert f"ok1-{prefix}" in caught.value.message
    assert "GET /v1/credentials/<tenant>/twilio" in caught.value.message
    assert source.rows([retired], secrets=False)[0].name is None  # the rest stays readable

    # The changed tenant is now a conflict for the migration, not a silent overwrite.
    rerun = migrate_legacy(engine, broker_vault, source)
    assert {o.tenant_id: o.status for o in rerun.outcomes}[f"changes-{prefix}"] == "conflict"
    assert {o.tenant_id: o.status for o in rerun.outcomes}[f"late-{prefix}"] == "migrated"

    # A crash between "finalized" and the UPDATE: the next finalize nulls what is left.
    legacy.execute(
        f"UPDATE {legacy.table} SET twilio_sid = :s, twilio_token = :t WHERE id = :i",
        s=pairs["ok2"][0],
        t=pairs["ok2"][1],
        i=f"ok2-{prefix}",
    )
    again = finalize_legacy(engine, broker_vault, source)
    assert {o.tenant_id: o.status for o in again.outcomes}[f"ok2-{prefix}"] == "already_finalized"
    assert {o.tenant_id: o.status for o in again.outcomes}[f"late-{prefix}"] == "finalized"
    assert again.rows_nulled == 2
    assert {r["id"]: r["twilio_token"] for r in legacy.rows()}[f"ok2-{prefix}"] is None


class VaultThatDiesAfterWrites(VaultGateway):
    """A gateway to a real Vault that accepts the n-th KV write, then never answers again.

    The write lands in Vault, but the broker only sees the connection drop: the
    nastiest place for a migration to be interrupted.
    """

    def __init__(self, *, die_after_writes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.die_after_writes = die_after_writes
        self.writes = 0
        self.dead = False
        self._lock = threading.Lock()

    def call(self, operation: str, fn: Any) -> Any:
        if self.dead:
            raise VaultUnavailable(f"Vault is unreachable ({operation})")
        result = super().call(operation, fn)
        if operation == "write a secret":
            with self._lock:
                self.writes += 1
                if self.writes == self.die_after_writes:
                    self.dead = True
                    # What the real gateway raises when a sent write is never answered.
                    raise WriteOutcomeUnknown(f"Vault did not confirm the write ({operation})")
        return result


def test_a_write_whose_answer_was_lost_is_settled_by_the_rerun(
    legacy: LegacyDb,
    engine: Engine,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    pairs = [twilio_pair() for _ in range(12)]
    legacy.insert(
        [
            {"id": f"lost-{prefix}-{i:02d}", "twilio_sid": s, "twilio_token": t}
            for i, (s, t) in enumerate(pairs)
        ]
    )
    tenant_ids = [f"lost-{prefix}-{i:02d}" for i in range(12)]
    dying = VaultThatDiesAfterWrites(
        die_after_writes=5, addrs=[vault_endpoint.addr], token=broker_vault_token
    )
    source = legacy.source(engine)
    first = migrate_legacy(engine, dying, source, batch_size=4, workers=1)
    dying.close()
    assert not first.ok
    assert first.stopped is not None
    assert "rerun to resume" in first.stopped
    assert (first.count("migrated"), first.count("failed"), first.remaining) == (4, 1, 7)
    victim = tenant_ids[4]
    with Session(engine) as session:
        row = session.get(IntegrationCredential, (victim, "twilio"))
        assert row is not None
        assert row.vault_sync_pending
    assert progress(engine, source.label)[victim].status == "failed"
    assert kv_version(vault_admin, victim) == 1

    second = migrate_legacy(engine, broker_vault, source, batch_size=4)
    assert second.ok, second.as_dict()
    assert {o.tenant_id: o.credential for o in second.outcomes}[victim] == "unchanged"
    assert [kv_version(vault_admin, t) for t in tenant_ids] == [1] * 12
    assert [decrypted(broker_vault, t) for t in tenant_ids] == pairs
    with Session(engine) as session:
        row = session.get(IntegrationCredential, (victim, "twilio"))
        assert row is not None
        assert (row.vault_sync_pending, row.kv_version, row.configured) == (False, 1, True)


@pytest.fixture
def persistent_bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    """An OpenBao with raft storage that this test may kill and start again."""
    bao = OpenBaoServer(tmp_path / "bao", ephemeral=False)
    bao.start()
    try:
        admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
        try:
            bootstrap(admin)
        finally:
            admin.close()
        yield bao
    finally:
        bao.stop()


def test_vault_killed_mid_run_then_rerun_completes_with_nothing_lost_or_duplicated(
    legacy: LegacyDb, engine: Engine, persistent_bao: OpenBaoServer, prefix: str
) -> None:
    bao = persistent_bao
    admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
    vault = VaultGateway(
        addrs=[bao.addr], token=create_policy_token(admin, "broker"), retry_budget_s=1.0
    )
    try:
        pairs = [twilio_pair() for _ in range(200)]
        legacy.insert(
            [
                {"id": f"Kill {prefix} {i:03d}", "twilio_sid": s, "twilio_token": t}
                for i, (s, t) in enumerate(pairs)
            ]
        )
        tenant_ids = [f"kill-{prefix}-{i:03d}" for i in range(200)]
        source = legacy.source(engine)

        def kill_after_first_batch(number: int, outcomes: list[Any]) -> None:
            if number == 1:
                bao.kill()

        first = migrate_legacy(
            engine, vault, source, batch_size=50, on_batch_done=kill_after_first_batch
        )
        assert not first.ok
        assert first.count("migrated") == 50
        assert first.count("failed") >= 1
        assert first.remaining > 0
        assert first.stopped is not None
        assert "Vault" in first.stopped
        with pytest.raises(BrokerError):
            vault.kv.metadata("tenants/x/integrations/twilio")

        bao.start()  # same raft data, unsealed again
        second = migrate_legacy(engine, vault, source, batch_size=50)
        assert second.ok, second.as_dict()["summary"]
        assert second.count("migrated") + second.count("skipped") == 200
        assert second.count("skipped") == 50
        # Nothing lost, nothing written twice.
        assert parallel(lambda t: kv_version(admin, t), tenant_ids) == [1] * 200
        assert parallel(lambda t: decrypted(vault, t), tenant_ids) == pairs
        statuses = {r.status for r in progress(engine, source.label).values()}
        assert statuses == {"verified"}
    finally:
        vault.close()
        admin.close()


def test_another_database_other_column_names_text_summary_and_one_tenant_at_a_time(
    cli_env: None, legacy_elsewhere: LegacyDb, engine: Engine, broker_vault: VaultGateway
) -> None:
    legacy = legacy_elsewhere
    pairs = [twilio_pair() for _ in range(3)]
    suffix = legacy.url.rsplit("/", 1)[-1][-10:]
    ids = [f"Old Shop {suffix} {i}" for i in range(3)]
    legacy.insert(
        [
            {
                "id": legacy_id,
                "name": f"Old shop {i}",
                "twilio_sid": sid,
                "twilio_token": tok,
                "metadata": {"legacy_plan": "gold"},
            }
            for i, (legacy_id, (sid, tok)) in enumerate(zip(ids, pairs, strict=True))
        ]
    )
    tenant_ids = [normalise_tenant_id(i) for i in ids]
    columns = legacy.columns
    options = [
        "--source-dsn",
        legacy.url.replace("postgresql+psycopg://", "postgresql://"),  # a plain libpq-style DSN
        "--table",
        legacy.table,
        "--id-column",
        columns.id,
        "--name-column",
        columns.name,
        "--sid-column",
        columns.twilio_sid,
        "--token-column",
        columns.twilio_token,
        "--metadata-column",
        columns.metadata,
    ]
    result = run_cli(*options, "--tenant", ids[1])
    assert result.exit_code == 0, result.output
    assert "migrated          1" in result.stdout
    assert f"{tenant_ids[1]} (legacy {ids[1]!r}): legacy_plan (no settings group" in result.stdout
    assert f"{ids[1]!r} -> {tenant_ids[1]}" in result.stdout
    assert not any(s in result.output for pair in pairs for s in pair)
    assert [tenant_exists(engine, str(t)) for t in tenant_ids] == [False, True, False]

    result = run_cli(*options)
    assert result.exit_code == 0, result.output
    assert "migrated          2" in result.stdout
    assert "already migrated  1" in result.stdout
    assert "skipped           0" in result.stdout
    assert [decrypted(broker_vault, str(t)) for t in tenant_ids] == pairs

    result = run_cli(*options, "--finalize")
    assert result.exit_code == 0, result.output
    assert "finalized          3" in result.stdout
    assert {(r["twilio_sid"], r["twilio_token"]) for r in legacy.rows()} == {(None, None)}

    unknown = run_cli(*options, "--tenant", "no-such-shop")
    assert unknown.exit_code == 1
    assert "no-such-shop" in unknown.stdout
    assert "no legacy tenant has this id" in unknown.stdout


def test_a_wrong_table_or_column_is_a_clear_usage_error(cli_env: None, legacy: LegacyDb) -> None:
    result = run_cli("--source-dsn", legacy.url, "--table", legacy.table, "--sid-column", "sms")
    assert result.exit_code == 2
    assert f"legacy table '{legacy.table}' has no column(s) sms" in result.output
    result = run_cli("--source-dsn", legacy.url, "--table", "nowhere.tenants")
    assert result.exit_code == 2
    assert "legacy table 'nowhere.tenants' does not exist" in result.output
    password_dsn = "postgresql://u:hunter2-secret@127.0.0.1:1/x"
    result = run_cli("--source-dsn", password_dsn, "--table", legacy.table)
    assert result.exit_code == 1
    assert "the legacy database is unavailable" in result.output
    assert "hunter2" not in result.output


def test_progress_rows_hold_nothing_secret(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    sid, tok = twilio_pair()
    legacy.insert([{"id": f"quiet-{prefix}", "twilio_sid": sid, "twilio_token": tok}])
    source = legacy.source(engine)
    migrate_legacy(engine, broker_vault, source)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT l::text FROM legacy_migrations l WHERE source = :s"), {"s": source.label}
        ).scalar_one()
    assert sid[2:] not in stored
    assert tok not in stored
    record = progress(engine, source.label)[f"quiet-{prefix}"]
    assert (record.status, record.credential, record.kv_version, record.attempts) == (
        "verified",
        "stored",
        1,
        1,
    )
    with Session(engine) as session:
        assert (
            session.exec(
                select(col(AuditEvent.detail)).where(
                    AuditEvent.tenant_id == f"quiet-{prefix}", AuditEvent.action == "legacy.migrate"
                )
            ).one()["credential"]
            == "stored"
        )


def test_progress_is_reported_from_the_start_then_per_tenant(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    """A terminal shows the bar before the first tenant is done, not after a whole batch."""
    legacy.insert(
        [
            {"id": f"prog-{prefix}-{i}", "twilio_sid": s, "twilio_token": t}
            for i, (s, t) in enumerate(twilio_pair() for _ in range(3))
        ]
    )
    calls: list[tuple[int, int]] = []
    source = legacy.source(engine)
    report = migrate_legacy(
        engine,
        broker_vault,
        source,
        tenants=[f"prog-{prefix}-{i}" for i in range(3)],
        on_progress=lambda advanced, total: calls.append((advanced, total)),
    )
    assert report.ok, report.as_dict()["summary"]
    assert calls[0] == (0, 3)
    assert sum(advanced for advanced, _ in calls) == 3


def test_the_progress_bar_shows_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.legacy.cli import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = _Progress("migrating")
    for _ in range(4):
        bar(1, 4)
    bar.close()
    assert "migrating" in terminal.getvalue()
    assert "100%" in terminal.getvalue()

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    quiet = _Progress("migrating")
    quiet(1, 1)
    quiet.close()
    assert pipe.getvalue() == ""


def test_unmapped_keys_and_invalid_values_are_never_stored_verbatim(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    # Secrets an old admin form let people paste anywhere: as keys, as nested keys, as values.
    sid, tok = twilio_pair()
    stripe_key = "sk_live_" + "a1b2c3d4" * 3
    meta_token = "EAAB" + "0f1e2d3c4b5a" * 4
    pasted = [stripe_key, tok, meta_token, "4242 4242 4242 4242", "de89370400440532013000"]
    legacy.insert(
        [
            {
                "id": f"pasted-{prefix}",
                "twilio_sid": sid,
                "twilio_token": tok,
                "metadata": {
                    stripe_key: "x",
                    tok: True,
                    "de89370400440532013000": 1,
                    "branding": {meta_token: "#ffffff"},
                    "business_hours": {"timezone": stripe_key},
                    "branding.primary_color": "4242 4242 4242 4242",
                    "legacy_plan": "gold",
                },
            }
        ]
    )
    source = legacy.source(engine)

    report = migrate_legacy(engine, broker_vault, source)

    [outcome] = report.outcomes
    reasons = {u.key: u.reason for u in outcome.unmapped}
    assert reasons["legacy_plan"] == "no settings group for this key"
    assert reasons["branding"].startswith("not valid for branding: (field 1): unknown field; ")
    assert reasons["business_hours"].startswith("not valid for business_hours: timezone: ")
    assert "(a key that is not shown)" in reasons
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT l::text FROM legacy_migrations l WHERE source = :s"), {"s": source.label}
        ).scalar_one()
    with Session(engine) as session:
        [event] = session.exec(
            select(AuditEvent).where(
                AuditEvent.tenant_id == f"pasted-{prefix}", AuditEvent.action == "legacy.migrate"
            )
        ).all()
    kept = {
        "report": json.dumps(report.as_dict()),
        "legacy_migrations": stored,
        "trail": json.dumps([event.resource, event.detail]),
    }
    for where, text_kept in kept.items():
        for secret in pasted:
            assert secret not in text_kept, (where, secret)
