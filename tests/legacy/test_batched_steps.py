"""The migration's batched steps: settings patches, key creation and verification.

Real OpenBao and PostgreSQL. A batch's settings patches are locked by one read
and written together, yet each keeps its own audit event; the verification runs
on an event loop and, when Vault goes away part way, stops the run with nothing
claimed that was not verified; a Transit key a stopped run left is reused as it
is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Session, col, select

from broker.legacy.migrate import migrate_legacy
from broker.models import AuditEvent, TenantSettings
from broker.vault.errors import VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, binding, key_name
from tests.legacy.conftest import LegacyDb, twilio_pair
from tests.legacy.support import decrypted, kv_version, progress, tenant_exists
from tests.support.apps import VaultEndpoint


def shops(legacy: LegacyDb, prefix: str, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """`n` legacy shops with a logo each; their tenant ids and credentials, in order."""
    pairs = [twilio_pair() for _ in range(n)]
    legacy.insert(
        [
            {
                "id": f"steps-{prefix}-{i:02d}",
                "twilio_sid": sid,
                "twilio_token": tok,
                "metadata": {"branding.logo_url": f"https://cdn.example.com/{i}.png"},
            }
            for i, (sid, tok) in enumerate(pairs)
        ]
    )
    return [f"steps-{prefix}-{i:02d}" for i in range(n)], pairs


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements `engine` sends while the block runs."""
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", note)


def test_a_batchs_settings_patches_take_one_locking_read_and_keep_their_own_audit_events(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    tenant_ids, _ = shops(legacy, prefix, 6)
    source = legacy.source(engine)

    with statements(engine) as sent:
        report = migrate_legacy(engine, broker_vault, source, batch_size=6, workers=1)

    assert report.ok, report.as_dict()
    assert report.count("migrated") == 6
    locking_reads = [
        s for s in sent if s.startswith("SELECT tenant_settings.") and s.endswith("FOR UPDATE")
    ]
    # One for the patches (one chunk), one for the credentials' status: not one per tenant.
    assert len(locking_reads) == 2
    with Session(engine) as session:
        rows = session.exec(
            select(TenantSettings).where(col(TenantSettings.tenant_id).in_(tenant_ids))
        ).all()
        # Version 2 from the patch, 3 from the credentials' status.
        assert {r.tenant_id: r.version for r in rows} == dict.fromkeys(tenant_ids, 3)
        assert {r.tenant_id: r.branding["logo_url"] for r in rows} == {
            t: f"https://cdn.example.com/{i}.png" for i, t in enumerate(tenant_ids)
        }
        updates = session.exec(
            select(AuditEvent)
            .where(AuditEvent.action == "settings.update")
            .where(col(AuditEvent.tenant_id).in_(tenant_ids))
        ).all()
    # Each patch audited once, under its own tenant's request id, with the version it made.
    assert sorted((e.tenant_id, e.detail["version"]) for e in updates) == [
        (t, 2) for t in tenant_ids
    ]
    assert {e.tenant_id: e.request_id for e in updates} == {
        t: f"legacy-{report.run_id}-{t}" for t in tenant_ids
    }


class VaultGoneOnLoop(VaultGateway):
    """A gateway to a real Vault that stops answering at the n-th `operation` made on the
    event loop, and every call after it (on the loop or threaded), as a Vault that went
    away would."""

    def __init__(self, *, operation: str, at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.operation = operation
        self.at = at
        self.seen = 0
        self.dead = False
        self._lock = threading.Lock()

    async def call_on_loop(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if operation == self.operation:
                self.seen += 1
                self.dead = self.dead or self.seen == self.at
            dead = self.dead
        if dead:
            raise VaultUnavailable(f"Vault is unreachable ({operation})")
        return await super().call_on_loop(operation, *args, **kwargs)

    def call(self, operation: str, fn: Any) -> Any:
        if self.dead:
            raise VaultUnavailable(f"Vault is unreachable ({operation})")
        return super().call(operation, fn)


def test_vault_gone_during_verification_stops_the_run_and_the_rerun_verifies_without_writing(
    legacy: LegacyDb,
    engine: Engine,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    tenant_ids, pairs = shops(legacy, prefix, 8)
    source = legacy.source(engine)
    failing = VaultGoneOnLoop(
        operation="read a secret", at=3, addrs=[vault_endpoint.addr], token=broker_vault_token
    )
    try:
        first = migrate_legacy(engine, failing, source, batch_size=8, workers=1)
    finally:
        failing.close()

    assert not first.ok
    assert first.stopped is not None
    assert "rerun to resume" in first.stopped
    # Two verified, the third failed on Vault, the other five not reached.
    assert (first.count("migrated"), first.count("failed"), first.remaining) == (2, 1, 5)
    assert first.outcomes[2].tenant_id == tenant_ids[2]
    records = progress(engine, source.label)
    assert [records[t].status for t in tenant_ids[:3]] == ["verified", "verified", "failed"]
    # Never claimed verified: the ones not reached stay pending, metadata applied.
    assert {(records[t].status, records[t].settings_applied) for t in tenant_ids[3:]} == {
        ("pending", True)
    }
    # Every write had landed: the rerun finds them and writes nothing twice.
    assert [kv_version(vault_admin, t) for t in tenant_ids] == [1] * 8

    second = migrate_legacy(engine, broker_vault, source, batch_size=8)
    assert second.ok, second.as_dict()
    credential = {o.tenant_id: o.credential for o in second.outcomes}
    assert [credential[t] for t in tenant_ids[2:]] == ["unchanged"] * 6
    assert {r.status for r in progress(engine, source.label).values()} == {"verified"}
    assert [kv_version(vault_admin, t) for t in tenant_ids] == [1] * 8
    assert [decrypted(broker_vault, t) for t in tenant_ids] == pairs


def test_a_transit_key_left_by_a_stopped_run_is_reused_as_it_is(
    legacy: LegacyDb,
    engine: Engine,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    tenant_ids, pairs = shops(legacy, prefix, 2)
    store = SealedStore(broker_vault)
    # A run that stopped after making the first tenant's key, before its rows.
    assert store.ensure_tenant_key(tenant_ids[0])
    earlier = store.seal(tenant_ids[0], "probe", {"value": "kept"}, {})
    before = vault_admin.transit.key_info(key_name(tenant_ids[0]))

    report = migrate_legacy(engine, broker_vault, legacy.source(engine), batch_size=2)

    assert report.ok, report.as_dict()
    assert [o.created for o in report.outcomes] == [True, True]
    assert vault_admin.transit.key_info(key_name(tenant_ids[0])) == before
    plaintext = broker_vault.transit.decrypt(
        key_name(tenant_ids[0]), earlier, context=binding(tenant_ids[0], "probe")
    )
    assert b'"kept"' in plaintext
    assert [decrypted(broker_vault, t) for t in tenant_ids] == pairs
    # The second tenant's key was made by the run, as `ensure_tenant_key` would have.
    assert not store.ensure_tenant_key(tenant_ids[1])


def test_vault_gone_while_making_keys_stops_before_any_row_and_the_rerun_completes(
    legacy: LegacyDb,
    engine: Engine,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    tenant_ids, pairs = shops(legacy, prefix, 5)
    source = legacy.source(engine)
    failing = VaultGoneOnLoop(
        operation="create an encryption key",
        at=3,
        addrs=[vault_endpoint.addr],
        token=broker_vault_token,
    )
    try:
        first = migrate_legacy(engine, failing, source, batch_size=5, workers=1)
    finally:
        failing.close()

    assert not first.ok
    assert first.stopped is not None
    assert "rerun to resume" in first.stopped
    assert [(o.tenant_id, o.status) for o in first.outcomes] == [(tenant_ids[2], "failed")]
    assert first.remaining == 4
    # No tenant, settings row or credential for any of them: only the keys made before.
    assert not any(tenant_exists(engine, t) for t in tenant_ids)
    assert [kv_version(vault_admin, t) for t in tenant_ids] == [0] * 5
    assert [vault_admin.transit.key_info(key_name(t)) is not None for t in tenant_ids] == [
        True,
        True,
        False,
        False,
        False,
    ]

    second = migrate_legacy(engine, broker_vault, source, batch_size=5)
    assert second.ok, second.as_dict()
    assert (second.count("migrated"), [o.created for o in second.outcomes]) == (5, [True] * 5)
    assert {r.status for r in progress(engine, source.label).values()} == {"verified"}
    assert [decrypted(broker_vault, t) for t in tenant_ids] == pairs
