"""`broker migrate legacy`: a real legacy table in PostgreSQL, real OpenBao, no mocks.

Covers the issue's list: 1,000 tenants that all decrypt back to their source,
nothing left in plaintext after finalize, reruns that change nothing, conflicts
that overwrite nothing, Vault killed mid-run, dry runs that write nothing, and
retired columns that refuse to be read. Dirty data is in `test_dirty_data.py`.
"""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from broker.core.errors import BrokerError
from broker.devstack.openbao import OpenBaoServer
from broker.integrations.service import read_credentials
from broker.legacy.migrate import (
    MigrationReport,
    finalize_legacy,
    migrate_legacy,
    normalise_tenant_id,
)
from broker.legacy.source import LegacyColumnsRetired, LegacyKey, LegacySource
from broker.models import AuditEvent, IntegrationCredential
from broker.vault.bootstrap import bootstrap, create_policy_token
from broker.vault.errors import VaultUnavailable, WriteOutcomeUnknown
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID
from tests.legacy.conftest import LegacyDb, twilio_pair
from tests.legacy.support import (
    by_tenant,
    cli_json,
    decrypted,
    kv_version,
    parallel,
    plaintext_in_postgres,
    progress,
    run_cli,
    save_twilio,
    settings_of,
    tenant_exists,
)
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant


def shop_rows(prefix: str, n: int) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """`n` legacy shops (every tenth with whitespace around its values), and the
    credentials each tenant id must end up with."""
    rows: list[dict[str, Any]] = []
    expected: dict[str, tuple[str, str]] = {}
    for i in range(n):
        sid, tok = twilio_pair()
        padded = i % 10 == 0
        rows.append(
            {
                "id": f"Shop-{prefix}-{i:04d}",
                "name": f"Shop {i}",
                "twilio_sid": f" {sid} " if padded else sid,
                "twilio_token": f"{tok}\n" if padded else tok,
                "metadata": {"branding.logo_url": f"https://cdn.example.com/{i}.png"},
            }
        )
        expected[f"shop-{prefix}-{i:04d}"] = (sid, tok)
    return rows, expected


def write_marks(engine: Engine) -> Any:
    """What any write would move: audit events, settings versions, progress timestamps."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT (SELECT count(*) FROM audit_events),"
                " (SELECT sum(version) FROM tenant_settings),"
                " (SELECT max(updated_at) FROM legacy_migrations)"
            )
        ).one()


def test_a_thousand_tenants_migrate_verify_and_finalize(
    legacy: LegacyDb,
    engine: Engine,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    rows, expected = shop_rows(prefix, 1000)
    legacy.insert(rows)
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
    before = write_marks(engine)
    again = migrate_legacy(engine, broker_vault, source, batch_size=100)
    assert (again.count("skipped"), again.count("migrated"), again.ok) == (1000, 0, True)
    assert write_marks(engine) == before
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
        save_twilio(client, tenant_id, VALID["twilio"])
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
    save_twilio(client, same, {"account_sid": theirs[0], "auth_token": theirs[1]})
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


def row_counts(engine: Engine) -> Any:
    """How many tenants, settings, progress rows, audit events and credential rows exist."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM tenant_settings),"
                " (SELECT count(*) FROM legacy_migrations),"
                " (SELECT count(*) FROM audit_events),"
                " (SELECT count(*) FROM integration_credentials)"
            )
        ).one()


def test_dry_run_writes_nothing(
    cli_env: None,
    legacy: LegacyDb,
    engine: Engine,
    client: TestClient,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    taken = make_tenant(client, f"taken-{prefix}")
    save_twilio(client, taken, VALID["twilio"])
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
        vault = [
            (kv_version(vault_admin, t), vault_admin.transit.key_info(f"tenant-{t}")) for t in new
        ]
        return row_counts(engine), vault, kv_version(vault_admin, taken), legacy.rows()

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
            *(
                {"id": f"{name}-{prefix}", "twilio_sid": sid, "twilio_token": tok}
                for name, (sid, tok) in pairs.items()
                if name in ("ok1", "ok2", "changes")
            ),
            {"id": f"partial-{prefix}", "twilio_sid": pairs["partial"][0]},
            {"id": f"bad-{prefix}", "twilio_sid": "AC-nope", "twilio_token": pairs["bad"][1]},
        ]
    )
    source = legacy.source(engine)
    migrate_legacy(engine, broker_vault, source)
    _, newer = twilio_pair()
    # The old application is still live: one tenant's token changes after migration,
    # and a new tenant appears.
    legacy.set_twilio(f"changes-{prefix}", token=newer)
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

    check_retired_columns_refuse_to_be_read(source, f"ok1-{prefix}")

    # The changed tenant is now a conflict for the migration, not a silent overwrite.
    rerun = migrate_legacy(engine, broker_vault, source)
    assert {o.tenant_id: o.status for o in rerun.outcomes}[f"changes-{prefix}"] == "conflict"
    assert {o.tenant_id: o.status for o in rerun.outcomes}[f"late-{prefix}"] == "migrated"

    # A crash between "finalized" and the UPDATE: the next finalize nulls what is left.
    legacy.set_twilio(f"ok2-{prefix}", sid=pairs["ok2"][0], token=pairs["ok2"][1])
    again = finalize_legacy(engine, broker_vault, source)
    assert {o.tenant_id: o.status for o in again.outcomes}[f"ok2-{prefix}"] == "already_finalized"
    assert {o.tenant_id: o.status for o in again.outcomes}[f"late-{prefix}"] == "finalized"
    assert again.rows_nulled == 2
    assert {r["id"]: r["twilio_token"] for r in legacy.rows()}[f"ok2-{prefix}"] is None


def check_retired_columns_refuse_to_be_read(source: LegacySource, legacy_id: str) -> None:
    """Reading retired columns through the broker's reader is a clear deprecation error."""
    retired = LegacyKey(legacy_id, legacy_id)
    with pytest.raises(LegacyColumnsRetired) as caught:
        source.rows([retired])
    assert isinstance(caught.value, DeprecationWarning)
    assert legacy_id in caught.value.message
    assert "GET /v1/credentials/<tenant>/twilio" in caught.value.message
    assert source.rows([retired], secrets=False)[0].name is None  # the rest stays readable


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
    options = legacy.cli_options()
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


def what_each_tenant_got(report: MigrationReport) -> list[tuple[Any, ...]]:
    """Every field of every outcome, in order."""
    return [
        (o.tenant_id, o.status, o.credential, o.created, o.settings_groups, o.reason)
        + tuple(u.key for u in o.unmapped)
        for o in report.outcomes
    ]


def test_the_dry_run_reports_what_the_real_run_then_does(
    legacy: LegacyDb,
    engine: Engine,
    client: TestClient,
    broker_vault: VaultGateway,
    prefix: str,
) -> None:
    """Plan, then apply: the dry run is the plan, so its report is the real run's."""
    kept = make_tenant(client, f"kept-{prefix}")
    twilio = {name: VALID["twilio"][name] for name in ("account_sid", "auth_token")}
    save_twilio(client, kept, twilio)
    sid, tok = twilio_pair()
    legacy.insert(
        [
            {
                "id": f"new-{prefix}",
                "twilio_sid": sid,
                "twilio_token": tok,
                "metadata": {"currency": "KES", "legacy_plan": "gold"},
            },
            {"id": f"half-{prefix}", "twilio_sid": sid, "metadata": {"language": "sw"}},
            {
                "id": kept,
                "twilio_sid": twilio["account_sid"],
                "twilio_token": twilio["auth_token"],
                "metadata": {"timezone": "Africa/Lagos"},
            },
            {"id": f"twice-{prefix}", "twilio_sid": sid, "twilio_token": tok},
            {"id": f"Twice {prefix}", "name": "other"},
            {"id": f"bad-{prefix}", "twilio_sid": "AC-nope", "twilio_token": tok},
        ]
    )
    source = legacy.source(engine)

    planned = migrate_legacy(engine, broker_vault, source, dry_run=True)
    applied = migrate_legacy(engine, broker_vault, source)
    assert what_each_tenant_got(planned) == what_each_tenant_got(applied)
    assert {o.tenant_id: o.status for o in applied.outcomes} == {
        f"new-{prefix}": "migrated",
        f"half-{prefix}": "skipped",
        kept: "migrated",
        f"twice-{prefix}": "conflict",
        f"bad-{prefix}": "failed",
    }
    assert {o.tenant_id: o.credential for o in applied.outcomes}[kept] == "unchanged"
    # The rerun's plan is that nothing is left to do.
    rerun = migrate_legacy(engine, broker_vault, source, dry_run=True)
    assert (rerun.already_migrated, rerun.count("migrated")) == (2, 0)


def test_a_tenant_created_between_plan_and_apply_fails_alone(
    legacy: LegacyDb, engine: Engine, client: TestClient, broker_vault: VaultGateway, prefix: str
) -> None:
    """The race the plan cannot see: its chunk is prepared again, tenant by tenant."""
    from broker.legacy.migrate import _Migration
    from broker.legacy.plan import plan_batch
    from broker.legacy.runner import select_groups

    pairs = [twilio_pair() for _ in range(3)]
    legacy.insert(
        [
            {"id": f"race-{prefix}-{i}", "twilio_sid": sid, "twilio_token": tok}
            for i, (sid, tok) in enumerate(pairs)
        ]
    )
    source = legacy.source(engine)
    run = _Migration(engine, broker_vault, source, dry_run=False, subject="t", workers=1)
    groups, _ = select_groups(source, [f"race-{prefix}-{i}" for i in range(3)])
    planned = plan_batch(engine, broker_vault, source, groups, workers=1)
    assert [p.outcome.created for p in planned.plans] == [True, True, True]
    make_tenant(client, f"race-{prefix}-1")  # after the plan, before the apply

    reached, stopped = run._apply(planned.plans, planned.stopped)

    assert stopped is None
    assert [(p.outcome.status, p.outcome.reason) for p in reached] == [
        ("migrated", None),
        ("failed", f"tenant 'race-{prefix}-1' already exists"),
        ("migrated", None),
    ]
    assert [decrypted(broker_vault, f"race-{prefix}-{i}") for i in (0, 2)] == [pairs[0], pairs[2]]
    assert kv_version(broker_vault, f"race-{prefix}-1") == 0
    assert progress(engine, source.label)[f"race-{prefix}-1"].status == "failed"
