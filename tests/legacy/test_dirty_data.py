"""Dirty legacy data through `broker migrate legacy`, then a rerun that changes nothing.

One migration of a table holding every kind of dirt the old application left:
padded values, empty strings, half a credential, duplicate and near-duplicate
ids, a malformed SID, text metadata, ids without letters and rows without ids.
Each helper below checks one kind.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.models import AuditEvent, IntegrationCredential, Tenant
from broker.vault.gateway import VaultGateway
from tests.legacy.conftest import LegacyDb, twilio_pair
from tests.legacy.support import (
    by_tenant,
    cli_json,
    decrypted,
    kv_version,
    run_cli,
    settings_of,
    tenant_exists,
)
from tests.support.apps import VaultEndpoint

Report = dict[str, Any]


@dataclass
class DirtyTable:
    """The dirty legacy rows of one test, and the credentials they hold."""

    p: str
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    bad_sid: str = "ACZZ" + "9" * 30

    def __post_init__(self) -> None:
        names = ("acme", "sid_only", "token_only", "twins", "dup1", "dup2", "beta", "bad", "text")
        self.pairs = {name: twilio_pair() for name in names}
        self.pairs["dup2"] = (self.pairs["dup1"][0], self.pairs["dup2"][1])  # same sid

    @property
    def acme(self) -> str:
        """The tenant id the padded `Acme Shop` legacy id becomes."""
        return f"acme-shop-{self.p}"

    def secrets(self) -> list[str]:
        """Every secret value in the table."""
        return [value for pair in self.pairs.values() for value in pair] + [self.bad_sid]

    def rows(self) -> list[dict[str, Any]]:
        """The legacy rows."""
        p, pairs = self.p, self.pairs
        return [
            self._acme_row(),
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
                "twilio_sid": pairs["sid_only"][0],
                "twilio_token": "",
                "metadata": {"language": "sw"},
            },
            {"id": f"token-only-{p}", "twilio_token": pairs["token_only"][1]},
            *[self._row(f"twins-{p}", "twins", name="Twins") for _ in range(2)],
            self._row(f"dup-{p}", "dup1"),
            self._row(f"dup-{p}", "dup2"),
            self._row(f"Beta_Shop-{p}", "beta"),
            {**self._row(f"beta shop-{p}", "beta"), "metadata": {"x": 1}},
            {"id": f"bad-sid-{p}", "twilio_sid": self.bad_sid, "twilio_token": pairs["bad"][1]},
            {**self._row(f"text-meta-{p}", "text"), "metadata": "notes"},
            {"id": "!!!", "name": "Punctuation"},
            {"id": None, "name": "No id at all"},
        ]

    def _row(self, legacy_id: str, pair: str, **extra: Any) -> dict[str, Any]:
        sid, tok = self.pairs[pair]
        return {"id": legacy_id, "twilio_sid": sid, "twilio_token": tok, **extra}

    def _acme_row(self) -> dict[str, Any]:
        sid, tok = self.pairs["acme"]
        return {
            "id": f"  Acme Shop {self.p} ",
            "name": " Acme Shop ",
            "twilio_sid": f"  {sid}  ",
            "twilio_token": f"\t{tok}\n",
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
        }


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
    table = DirtyTable(prefix)
    legacy.insert(table.rows())

    result = run_cli("--source-dsn", legacy.url, "--table", legacy.table, "--batch", "3", "--json")

    assert not [s for s in table.secrets() if s in result.output]
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
    check_padded_values_and_metadata(table, report, engine, client, broker_vault, vault_admin)
    check_missing_values(table, report, client, vault_admin)
    check_duplicates(table, report, engine, broker_vault)
    check_failures(table, report, engine)
    check_vault_audit(table, vault_endpoint)
    check_rerun_changes_nothing(table, report, legacy, client, vault_admin)


def check_padded_values_and_metadata(
    table: DirtyTable,
    report: Report,
    engine: Engine,
    client: TestClient,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
) -> None:
    """Whitespace stripped, metadata routed into the right groups, the rest reported."""
    acme = by_tenant(report)[table.acme]
    assert (acme["status"], acme["credential"]) == ("migrated", "stored")
    assert acme["settings_groups"] == ["branding", "business_hours", "notification_settings"]
    unmapped = {u["key"] for u in acme["unmapped_keys"]}
    assert unmapped == {"branding.primary_color", "integrations_status", "legacy_plan"}
    assert report["id_changes"][f"  Acme Shop {table.p} "] == table.acme
    assert decrypted(broker_vault, table.acme) == table.pairs["acme"]
    settings = settings_of(client, table.acme)
    assert settings["business_hours"]["timezone"] == "Africa/Nairobi"
    monday = {"open": "08:00", "close": "18:00", "closed": False}
    assert settings["business_hours"]["monday"] == monday
    assert settings["branding"]["logo_url"] == "https://cdn.example.com/acme.png"
    assert settings["branding"]["primary_color"] == "#007bff"  # "blue" was refused, not guessed
    assert settings["notification_settings"]["email"]["daily_summary"] is False
    assert settings["integrations_status"]["twilio"]["enabled"] is True  # the broker's own
    with Session(engine) as session:
        tenant = session.get(Tenant, table.acme)
        assert tenant is not None
        assert tenant.name == "Acme Shop"
        row = session.get(IntegrationCredential, (table.acme, "twilio"))
        assert row is not None
        assert row.connection_test_skipped is True  # the skipped live test is recorded
        events = session.exec(
            select(AuditEvent).where(
                AuditEvent.tenant_id == table.acme, AuditEvent.action == "legacy.migrate"
            )
        ).all()
        assert [e.detail["connection_test"] for e in events] == ["skipped"]
        assert events[0].actor == f"user:legacy-migration:{getpass.getuser()}"
    entry = vault_admin.kv.read(f"tenants/{table.acme}/integrations/twilio")
    assert entry is not None
    assert entry.data["public"]["connection_test"] == "skipped"


def check_missing_values(
    table: DirtyTable, report: Report, client: TestClient, vault_admin: VaultGateway
) -> None:
    """Empty strings are missing values; half a credential is skipped; metadata still moves."""
    tenants, p = by_tenant(report), table.p
    assert (tenants[f"empty-{p}"]["status"], tenants[f"empty-{p}"]["credential"]) == (
        "migrated",
        "absent",
    )
    empty_settings = settings_of(client, f"empty-{p}")
    assert empty_settings["feature_flags"]["ai_responses_enabled"] is False
    assert empty_settings["localization"]["timezone"] == "Africa/Lagos"
    assert kv_version(vault_admin, f"empty-{p}") == 0
    for tenant_id, missing in ((f"sid-only-{p}", "auth token"), (f"token-only-{p}", "account SID")):
        assert tenants[tenant_id]["status"] == "skipped"
        assert tenants[tenant_id]["credential"] == "incomplete"
        assert missing in tenants[tenant_id]["reason"]
        assert kv_version(vault_admin, tenant_id) == 0
    assert settings_of(client, f"sid-only-{p}")["localization"]["default_language"] == "sw"


def check_duplicates(
    table: DirtyTable, report: Report, engine: Engine, broker_vault: VaultGateway
) -> None:
    """Identical duplicates are one tenant; disagreeing ones are a conflict, nothing written."""
    tenants, p = by_tenant(report), table.p
    assert tenants[f"twins-{p}"]["status"] == "migrated"
    assert decrypted(broker_vault, f"twins-{p}") == table.pairs["twins"]
    assert tenants[f"dup-{p}"]["status"] == "conflict"
    assert tenants[f"beta-shop-{p}"]["status"] == "conflict"
    assert tenants[f"beta-shop-{p}"]["legacy_ids"] == [f"Beta_Shop-{p}", f"beta shop-{p}"]
    assert not tenant_exists(engine, f"dup-{p}")
    assert not tenant_exists(engine, f"beta-shop-{p}")


def check_failures(table: DirtyTable, report: Report, engine: Engine) -> None:
    """A malformed sid fails that tenant only, and the report names the field, not the value."""
    tenants, p = by_tenant(report), table.p
    assert tenants[f"bad-sid-{p}"]["status"] == "failed"
    assert "account_sid must be 'AC'" in tenants[f"bad-sid-{p}"]["reason"]
    assert not tenant_exists(engine, f"bad-sid-{p}")
    assert tenants[f"text-meta-{p}"]["unmapped_keys"][0]["key"] == "(metadata)"
    failed = [t for t in report["tenants"] if t["status"] == "failed" and not t["tenant_id"]]
    assert sorted(t["reason"] for t in failed) == [
        "1 legacy row(s) have no id and cannot be migrated",
        "the legacy id has no letters or digits to make a tenant id from",
    ]


def check_vault_audit(table: DirtyTable, vault_endpoint: VaultEndpoint) -> None:
    """Every Vault call named the migration and the tenant in Vault's own audit log."""
    if vault_endpoint.audit_log is None:
        return
    acme = table.acme
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


def check_rerun_changes_nothing(
    table: DirtyTable, report: Report, legacy: LegacyDb, client: TestClient, vault: VaultGateway
) -> None:
    """A rerun writes nothing, and counts tenants migrated before apart from skipped ones."""
    acme = table.acme
    before = (kv_version(vault, acme), settings_of(client, acme)["version"])
    code, again = cli_json("--source-dsn", legacy.url, "--table", legacy.table)
    assert code == 1
    assert again["summary"]["migrated"] == 0
    # Counted apart: migrated by the first run, and skipped again for missing data.
    assert (again["summary"]["already_migrated"], again["summary"]["skipped"]) == (4, 2)
    assert (again["summary"]["conflicts"], again["summary"]["failed"]) == (2, 3)
    assert by_tenant(again)[acme]["reason"] == "already migrated"
    assert by_tenant(again)[acme]["unmapped_keys"] == by_tenant(report)[acme]["unmapped_keys"]
    assert (kv_version(vault, acme), settings_of(client, acme)["version"]) == before
