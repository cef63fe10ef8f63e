"""The migration's batch form of the write protocol (`SaveBatch`), interrupted on purpose.

Real OpenBao and PostgreSQL. A gateway that refuses, loses or crashes on the
n-th KV write interrupts a batch part way, with several tenants' writes in
flight; whatever is left behind, no metadata row may claim a state Vault does
not hold, and a rerun finishes the job without writing anything twice.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.auth.principal import Principal
from broker.core.errors import Conflict, NotFound
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import ProviderEndpoints
from broker.integrations.service import BatchSave, Outbound, SaveBatch, save_credentials
from broker.legacy.migrate import migrate_legacy
from broker.models import IntegrationCredential
from broker.tenants.service import delete_tenant
from broker.vault.errors import VaultUnavailable, WriteOutcomeUnknown
from broker.vault.gateway import VaultGateway
from tests.legacy.conftest import LegacyDb, twilio_pair
from tests.legacy.support import decrypted, kv_version, parallel, progress
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant


class FaultyVault(VaultGateway):
    """A gateway to a real Vault that misbehaves from the n-th KV write on.

    - "refuse": that write and every later call fail before anything is sent
      (a sealed Vault): nothing of them lands.
    - "lose": that write lands, but its answer is lost, and Vault is gone after.
    - "crash": that write lands, then the process dies (KeyboardInterrupt) before
      anything else is recorded.
    """

    def __init__(self, *, fault: str, at_write: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fault = fault
        self.at_write = at_write
        self.writes = 0
        self.dead = False
        self._lock = threading.Lock()

    def call(self, operation: str, fn: Any) -> Any:
        if self.dead:
            raise VaultUnavailable(f"Vault is unreachable ({operation})")
        if operation != "write a secret":
            return super().call(operation, fn)
        with self._lock:
            self.writes += 1
            faulty = self.writes == self.at_write
        if not faulty:  # (writes already under way when the fault strikes still land)
            return super().call(operation, fn)
        self.dead = True
        if self.fault == "refuse":
            raise VaultUnavailable(f"Vault is sealed ({operation})")
        super().call(operation, fn)
        if self.fault == "crash":
            raise KeyboardInterrupt
        raise WriteOutcomeUnknown(f"Vault did not confirm the write ({operation})")


def shops(legacy: LegacyDb, prefix: str, n: int) -> tuple[list[str], list[tuple[str, str]]]:
    """`n` legacy shops; their tenant ids and credentials, in order."""
    pairs = [twilio_pair() for _ in range(n)]
    legacy.insert(
        [
            {"id": f"batch-{prefix}-{i:02d}", "twilio_sid": s, "twilio_token": t}
            for i, (s, t) in enumerate(pairs)
        ]
    )
    return [f"batch-{prefix}-{i:02d}" for i in range(n)], pairs


def credential_rows(engine: Engine, tenant_ids: list[str]) -> dict[str, IntegrationCredential]:
    """The tenants' Twilio metadata rows, by tenant."""
    with Session(engine) as session:
        rows = session.exec(
            select(IntegrationCredential).where(
                col(IntegrationCredential.tenant_id).in_(tenant_ids)
            )
        )
        return {row.tenant_id: row for row in rows}


def rows_claiming_more_than_vault_holds(
    engine: Engine, vault: VaultGateway, tenant_ids: list[str]
) -> list[str]:
    """Tenants whose settled (not pending) metadata row says what Vault does not hold."""
    wrong: list[str] = []
    for row in credential_rows(engine, tenant_ids).values():
        if row.vault_sync_pending:
            continue  # honest: "a write may be in flight, ask Vault"
        holds = kv_version(vault, row.tenant_id)
        if (row.kv_version if row.configured else 0) != holds:
            wrong.append(row.tenant_id)
    return wrong


@pytest.mark.parametrize("fault", ["refuse", "lose"])
def test_a_vault_fault_mid_batch_leaves_no_row_ahead_of_vault_and_a_rerun_completes(
    fault: str,
    legacy: LegacyDb,
    engine: Engine,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    tenant_ids, pairs = shops(legacy, prefix, 24)
    faulty = FaultyVault(
        fault=fault, at_write=14, addrs=[vault_endpoint.addr], token=broker_vault_token
    )
    source = legacy.source(engine)
    try:
        first = migrate_legacy(engine, faulty, source, batch_size=12, workers=4)
    finally:
        faulty.close()

    assert not first.ok
    assert first.stopped is not None
    assert "rerun to resume" in first.stopped
    assert first.count("migrated") == 12  # the first batch, whole
    assert first.remaining > 0
    assert rows_claiming_more_than_vault_holds(engine, vault_admin, tenant_ids) == []
    records = progress(engine, source.label)
    # Verified only where Vault holds exactly the legacy credentials.
    for tenant_id, pair in zip(tenant_ids, pairs, strict=True):
        if records[tenant_id].status == "verified":
            assert decrypted(vault_admin, tenant_id) == pair
    pending = [r for r in credential_rows(engine, tenant_ids).values() if r.vault_sync_pending]
    # A refused write clears its own mark; only a write whose outcome is unknown keeps one.
    assert len(pending) == (0 if fault == "refuse" else 1)

    second = migrate_legacy(engine, broker_vault, source, batch_size=12, workers=4)
    assert second.ok, second.as_dict()["summary"]
    assert second.count("migrated") + second.count("skipped") == 24
    assert parallel(lambda t: kv_version(vault_admin, t), tenant_ids) == [1] * 24
    assert parallel(lambda t: decrypted(broker_vault, t), tenant_ids) == pairs
    assert {r.status for r in progress(engine, source.label).values()} == {"verified"}
    assert rows_claiming_more_than_vault_holds(engine, vault_admin, tenant_ids) == []


def test_a_crash_after_writes_landed_leaves_rows_pending_and_the_rerun_settles_them(
    legacy: LegacyDb,
    engine: Engine,
    vault_endpoint: VaultEndpoint,
    broker_vault_token: str,
    broker_vault: VaultGateway,
    vault_admin: VaultGateway,
    prefix: str,
) -> None:
    tenant_ids, pairs = shops(legacy, prefix, 10)
    crashing = FaultyVault(
        fault="crash", at_write=3, addrs=[vault_endpoint.addr], token=broker_vault_token
    )
    source = legacy.source(engine)
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate_legacy(engine, crashing, source, batch_size=10, workers=2)
    finally:
        crashing.close()

    # Killed between the KV writes and the settling transaction: the batch's rows
    # were marked pending first, so they say "ask Vault", never something false.
    assert kv_version(vault_admin, tenant_ids[0]) == 1
    assert rows_claiming_more_than_vault_holds(engine, vault_admin, tenant_ids) == []
    marked = credential_rows(engine, tenant_ids).values()
    assert marked
    assert all(row.vault_sync_pending for row in marked)
    assert "verified" not in {r.status for r in progress(engine, source.label).values()}

    rerun = migrate_legacy(engine, broker_vault, source, batch_size=10, workers=2)
    assert rerun.ok, rerun.as_dict()["summary"]
    assert parallel(lambda t: kv_version(vault_admin, t), tenant_ids) == [1] * 10
    assert parallel(lambda t: decrypted(broker_vault, t), tenant_ids) == pairs
    settled = credential_rows(engine, tenant_ids).values()
    assert [(r.vault_sync_pending, r.configured, r.kv_version) for r in settled] == [
        (False, True, 1)
    ] * 10
    assert {r.status for r in progress(engine, source.label).values()} == {"verified"}


def test_save_batch_fails_each_save_alone(
    engine: Engine, client: TestClient, broker_vault: VaultGateway, prefix: str
) -> None:
    """A tenant deleted under the batch, and one whose credentials someone saved
    between the batch's mark and its write: those two fail alone, nothing of
    theirs is overwritten, and the rest is stored and settled."""
    tenants = [make_tenant(client, f"sb-{prefix}-{i}") for i in range(4)]
    pairs = [twilio_pair() for _ in tenants]
    outbound = Outbound(EgressClient(EgressPolicy()), ProviderEndpoints())
    operator = Principal(subject="batch-test", kind="user", scopes=frozenset(), tenant_id=None)
    saves = [
        BatchSave(
            principal=operator,
            tenant_id=tenant,
            fields={"account_sid": sid, "auth_token": tok},
            if_match='"0"',
        )
        for tenant, (sid, tok) in zip(tenants, pairs, strict=True)
    ]
    batch = SaveBatch(engine, broker_vault, outbound, "twilio", saves)
    batch.check()
    for save in saves:
        batch.seal(save)
    delete_tenant(engine, broker_vault, principal=operator, tenant_id=tenants[1])
    batch.mark()
    theirs = twilio_pair()
    # An API save between the batch's mark and its write: check-and-set lets one win.
    save_credentials(
        engine,
        broker_vault,
        outbound,
        principal=operator,
        tenant_id=tenants[2],
        provider="twilio",
        fields={"account_sid": theirs[0], "auth_token": theirs[1]},
        if_match=None,
        skip_connection_test=True,
    )
    for save in saves:
        batch.write(save)
    batch.settle()

    assert isinstance(saves[1].error, NotFound)
    assert isinstance(saves[2].error, Conflict)
    assert [s.error for s in (saves[0], saves[3])] == [None, None]
    assert [s.result.kv_version if s.result else None for s in saves] == [1, None, None, 1]
    assert [decrypted(broker_vault, t) for t in (tenants[0], tenants[3])] == [pairs[0], pairs[3]]
    assert decrypted(broker_vault, tenants[2]) == theirs  # untouched
    assert kv_version(broker_vault, tenants[2]) == 1
    rows = credential_rows(engine, tenants)
    assert tenants[1] not in rows
    assert [
        (rows[t].configured, rows[t].kv_version, rows[t].vault_sync_pending)
        for t in tenants
        if t != tenants[1]
    ] == [(True, 1, False)] * 3


def test_the_dry_run_is_the_plan_across_batches_and_workers(
    legacy: LegacyDb, engine: Engine, broker_vault: VaultGateway, prefix: str
) -> None:
    tenant_ids, _ = shops(legacy, prefix, 17)
    legacy.insert([{"id": f"batch-{prefix}-half", "twilio_sid": twilio_pair()[0]}])
    source = legacy.source(engine)

    planned = migrate_legacy(engine, broker_vault, source, dry_run=True, batch_size=5, workers=3)
    applied = migrate_legacy(engine, broker_vault, source, batch_size=5, workers=3)

    def seen(report: Any) -> list[tuple[Any, ...]]:
        return sorted(
            (o.tenant_id, o.status, o.credential, o.created, tuple(o.settings_groups))
            for o in report.outcomes
        )

    assert seen(planned) == seen(applied)
    assert applied.count("migrated") == 17
    assert parallel(lambda t: kv_version(broker_vault, t), tenant_ids) == [1] * 17
