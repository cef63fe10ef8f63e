"""Batched key rotation: tenants holding every secret, batches, a process killed mid-batch.

Real faults only: the rotation's Vault calls go through `SlowProxy`, which holds one
chosen KV write back; the process doing the rotation is killed with SIGKILL while
that write is held, or gives up on it and goes on with the rest of its batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.core.errors import BrokerError
from broker.integrations.service import read_credentials
from broker.tenants import keys
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import key_name
from tests.fakes.providers import VALID, FakeProviders
from tests.support.rows import payout_row
from tests.support.slowproxy import SlowProxy
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token
from tests.tenants.test_keys import OPERATOR, save

INTEGRATIONS = ("twilio", "woocommerce", "shopify", "whatsapp", "openai")
IBAN = "DE89370400440532013000"
OTHER_IBAN = "GB82WEST12345698765432"


def _payout(client: TestClient, tenant: str, iban: str) -> Any:
    return client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "Acme"}},
        headers=bearer(token("finance:manage", "finance:view", tenant_id=tenant)),
    )


def _tenant(client: TestClient, providers: FakeProviders, *integrations: str) -> str:
    """A tenant with credentials for `integrations` and a payout record."""
    tenant = make_tenant(client)
    for provider in integrations:
        save(client, tenant, provider, providers)
    assert _payout(client, tenant, IBAN).status_code == 200
    return tenant


def _rows(engine: Engine, tenant: str) -> dict[str, tuple[int, bool]]:
    """Every bookkeeping row of a tenant, the payout record as "payout": (version, pending)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT 'integrations/' || provider, kv_version, vault_sync_pending"
                " FROM integration_credentials WHERE tenant_id = :t AND configured"
                " UNION ALL SELECT 'payout', payout_version, payout_sync_pending"
                " FROM payment_profiles WHERE tenant_id = :t AND payout_version > 0"
            ),
            {"t": tenant},
        ).all()
    return {item: (version, pending) for item, version, pending in rows}


def _vault_version(vault: VaultGateway, tenant: str, item: str) -> int:
    meta = vault.kv.metadata(f"tenants/{tenant}/{item}")
    assert meta is not None
    return int(meta["current_version"])


def _assert_rows_hold_what_vault_holds(engine: Engine, vault: VaultGateway, tenant: str) -> None:
    """A row that is not pending names the version Vault holds: never a state Vault lacks."""
    for item, (version, pending) in _rows(engine, tenant).items():
        if not pending:
            assert version == _vault_version(vault, tenant, item), (tenant, item)


def _assert_rotated(
    engine: Engine, vault: VaultGateway, broker_vault: VaultGateway, tenant: str, target: int
) -> None:
    """Every item on `target`, older versions retired, every row settled on Vault's version,
    the rotation record closed, the secrets intact."""
    rows = _rows(engine, tenant)
    assert {item: pending for item, (_, pending) in rows.items()} == dict.fromkeys(rows, False)
    for item, (version, _) in rows.items():
        entry = vault.kv.read(f"tenants/{tenant}/{item}")
        assert entry is not None
        assert (entry.version, entry.data["ciphertext"].split(":")[1]) == (version, f"v{target}")
    info = vault.transit.key_info(key_name(tenant))
    assert info is not None
    assert info["min_decryption_version"] == target
    with engine.connect() as conn:
        statuses = conn.execute(
            text("SELECT status FROM key_rotations WHERE tenant_id = :t"), {"t": tenant}
        ).scalars()
        assert set(statuses) == {"done"}
    for provider in (item.removeprefix("integrations/") for item in rows if item != "payout"):
        creds, _ = read_credentials(broker_vault, tenant_id=tenant, provider=provider)
        field, value = next(iter(VALID[provider].items()))
        assert creds.reveal(field) == value


def test_tenants_holding_every_secret_rotate_in_batches_and_settle_without_aging(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    providers: FakeProviders,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Batches of two: five tenants span three batches.
    monkeypatch.setattr(keys, "BATCH_TENANTS", 2)
    tenants = [_tenant(client, providers, *INTEGRATIONS) for _ in range(5)]
    with engine.connect() as conn:
        aged_before = conn.execute(
            text(
                "SELECT tenant_id, payout_updated_at, payout_hint FROM payment_profiles"
                " WHERE tenant_id = ANY(:t)"
            ),
            {"t": tenants},
        ).all()
    seen: list[str] = []
    reports = keys.rotate_all(
        engine,
        broker_vault,
        principal=OPERATOR,
        tenant_ids=tenants,
        workers=3,
        on_done=lambda r: seen.append(r.tenant_id),
    )
    assert seen == [r.tenant_id for r in reports] == tenants
    assert {(r.key_version, r.rewrapped, r.already_current, r.failed) for r in reports} == {
        (2, 6, 0, ())
    }
    for tenant in tenants:
        _assert_rotated(engine, vault_admin, broker_vault, tenant, 2)
        assert _rows(engine, tenant)["payout"] == (2, False)
    with engine.connect() as conn:
        aged_after = conn.execute(
            text(
                "SELECT tenant_id, payout_updated_at, payout_hint FROM payment_profiles"
                " WHERE tenant_id = ANY(:t)"
            ),
            {"t": tenants},
        ).all()
    # A rewrap changes the wrapping only: the payout record is not newer, nor its hint.
    assert sorted(aged_after) == sorted(aged_before)
    # The next writes check-and-set against the versions the rotation wrote: no 409.
    assert _payout(client, tenants[0], OTHER_IBAN).status_code == 200
    save(client, tenants[0], "twilio", providers)


def test_a_tenant_whose_vault_work_fails_keeps_its_marks_and_the_rest_of_its_batch_settles(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    broker_vault_token: str,
    providers: FakeProviders,
    vault_proxy: SlowProxy,
) -> None:
    first, failing, last = (_tenant(client, providers, "twilio", "openai") for _ in range(3))
    # The failing tenant's Twilio write is held past the rotation's patience; it lands later.
    vault_proxy.delay(f"POST /v1/secret/data/tenants/{failing}/integrations/twilio".encode(), 3.0)
    impatient = VaultGateway(
        addrs=[vault_proxy.addr], token=broker_vault_token, timeout_s=1.0, retry_budget_s=1.5
    )
    seen: list[str] = []
    try:
        with pytest.raises(BrokerError):
            keys.rotate_all(
                engine,
                impatient,
                principal=OPERATOR,
                tenant_ids=[first, failing, last],
                workers=3,
                on_done=lambda r: seen.append(r.tenant_id),
            )
    finally:
        impatient.close()
    vault_proxy.clear()
    # The others of its batch finished, were settled and reported.
    assert seen == [first, last]
    for tenant in (first, last):
        _assert_rotated(engine, vault_admin, broker_vault, tenant, 2)
    # The failing tenant's rows stay marked, and none claims a version Vault lacks.
    assert set(_rows(engine, failing).values()) <= {(1, True), (2, True)}
    _wait_for(lambda: _vault_version(vault_admin, failing, "integrations/twilio") == 2)
    _assert_rows_hold_what_vault_holds(engine, vault_admin, failing)
    # The rerun resumes it: no second key version, everything settled.
    (report,) = keys.rotate_all(engine, broker_vault, principal=OPERATOR, tenant_ids=[failing])
    assert (report.resumed, report.key_version, report.failed) == (True, 2, ())
    _assert_rotated(engine, vault_admin, broker_vault, failing, 2)


_CHILD = """
import os
from broker.auth.principal import Principal
from broker.core.db import make_engine
from broker.tenants.keys import rotate_all
from broker.vault.gateway import VaultGateway

OPERATOR = Principal(subject="ops", kind="user", scopes=frozenset({"platform:admin"}))

vault = VaultGateway(addrs=[os.environ["ROTATE_VAULT"]], token=os.environ["ROTATE_TOKEN"],
                     timeout_s=120.0, retry_budget_s=120.0)
engine = make_engine(os.environ["ROTATE_DATABASE_URL"])
rotate_all(engine, vault, principal=OPERATOR, tenant_ids=os.environ["ROTATE_TENANTS"].split(),
           workers=1)
"""


def _rotating_process(
    vault_proxy: SlowProxy, token: str, database_url: str, tenants: list[str]
) -> subprocess.Popen[bytes]:
    """`rotate_all` over `tenants` in a process of its own, its Vault calls through `proxy`."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        ROTATE_VAULT=vault_proxy.addr,
        ROTATE_TOKEN=token,
        ROTATE_DATABASE_URL=database_url,
        ROTATE_TENANTS=" ".join(tenants),
    )
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_for(condition: Any, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until `condition()` holds (a bound on a hang, not a timed assertion)."""
    deadline = time.monotonic() + 60
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(process.stderr.read().decode() if process.stderr else "exited")
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        time.sleep(0.05)


def test_a_rotation_killed_mid_batch_leaves_nothing_false_and_a_rerun_finishes_it(
    client: TestClient,
    engine: Engine,
    vault_admin: VaultGateway,
    broker_vault: VaultGateway,
    broker_vault_token: str,
    database_url: str,
    providers: FakeProviders,
    vault_proxy: SlowProxy,
) -> None:
    done, halfway, untouched = (_tenant(client, providers, "twilio", "openai") for _ in range(3))
    # One worker: the first tenant is rewrapped whole; the second's writes go out together,
    # its Twilio write is held while the process is killed (its OpenAI and payout writes
    # land); the third is never reached.
    vault_proxy.delay(f"POST /v1/secret/data/tenants/{halfway}/integrations/twilio".encode(), 60.0)
    process = _rotating_process(
        vault_proxy, broker_vault_token, database_url, [done, halfway, untouched]
    )
    try:
        _wait_for(
            lambda: (
                _vault_version(vault_admin, halfway, "integrations/openai") == 2
                and _vault_version(vault_admin, halfway, "payout") == 2
            ),
            process,
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    vault_proxy.close()  # the held write dies with its connection

    # Every row is marked or names what Vault holds.
    for tenant in (done, halfway, untouched):
        _assert_rows_hold_what_vault_holds(engine, vault_admin, tenant)
    assert _vault_version(vault_admin, halfway, "integrations/twilio") == 1
    # Marked, the next write reconciles first instead of failing check-and-set (no 409).
    assert _payout(client, done, OTHER_IBAN).status_code == 200

    reports = keys.rotate_all(
        engine, broker_vault, principal=OPERATOR, tenant_ids=[done, halfway, untouched]
    )
    assert [(r.tenant_id, r.resumed, r.key_version) for r in reports] == [
        (done, True, 2),
        (halfway, True, 2),
        (untouched, True, 2),
    ]
    # What the killed run wrote is current already; the rerun wrote the rest.
    assert [(r.rewrapped, r.already_current) for r in reports] == [(0, 3), (1, 2), (3, 0)]
    for tenant in (done, halfway, untouched):
        _assert_rotated(engine, vault_admin, broker_vault, tenant, 2)
    assert payout_row(engine, done).payout_hint.endswith("5432")
