"""Benchmark: legacy tenant migration throughput, in tenants per second.

    python -m bench.legacy_migration [N_TENANTS] [--batch N] [--workers N]

Starts its own OpenBao (in-memory) and embedded PostgreSQL, bootstraps Vault,
migrates the broker's schema, fills a legacy `tenants` table with N tenants
(valid Twilio credentials and a few metadata keys each), then times one
`migrate_legacy` run with the broker's own least-privilege Vault token. Prints
one JSON object: tenants per second, and the CPU per tenant (user + system) of
the migrating process (all its threads), of OpenBao and of PostgreSQL (the
postmaster and its backends), which the load of other processes on a shared
machine disturbs less than the wall clock. It measures; it asserts nothing
about time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.process import tree_cpu_s
from broker.core.db import make_engine, upgrade
from broker.devstack.openbao import OpenBaoServer
from broker.devstack.postgres import EmbeddedPostgres, create_database
from broker.legacy import DEFAULT_BATCH, DEFAULT_WORKERS
from broker.legacy.migrate import migrate_legacy
from broker.legacy.source import LegacySource, LegacyTable
from broker.vault.bootstrap import bootstrap, create_policy_token
from broker.vault.gateway import VaultGateway

_DDL = """
CREATE SCHEMA legacy;
CREATE TABLE legacy.tenants (
    pk serial PRIMARY KEY, id text, name text,
    twilio_sid text, twilio_token text, metadata jsonb
)
"""


def _seed(url: str, n_tenants: int) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(_DDL))
            conn.execute(
                text(
                    "INSERT INTO legacy.tenants (id, name, twilio_sid, twilio_token, metadata)"
                    " VALUES (:id, :name, :sid, :token, CAST(:metadata AS jsonb))"
                ),
                [
                    {
                        "id": f"Bench Shop {i:06d}",
                        "name": f"Bench Shop {i}",
                        "sid": "AC" + secrets.token_hex(16),
                        "token": secrets.token_hex(16),
                        "metadata": json.dumps(
                            {
                                "branding.logo_url": f"https://cdn.example.com/{i}.png",
                                "notifications": {"email": {"daily_summary": False}},
                                "legacy_plan": "gold",
                            }
                        ),
                    }
                    for i in range(n_tenants)
                ],
            )
    finally:
        engine.dispose()


def run(
    n_tenants: int = 1000, *, batch_size: int = DEFAULT_BATCH, workers: int = DEFAULT_WORKERS
) -> dict[str, Any]:
    """Migrate `n_tenants` legacy tenants on a fresh local stack; return the timings."""
    work = Path(tempfile.mkdtemp(prefix="broker-bench-legacy-"))
    try:
        with (
            OpenBaoServer(work / "bao", ephemeral=True) as bao,
            EmbeddedPostgres(work / "pg") as pg,
        ):
            admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
            try:
                bootstrap(admin)
                broker_token = create_policy_token(admin, "broker")
            finally:
                admin.close()
            url = create_database(pg.url, "broker_bench")
            upgrade(url)
            _seed(url, n_tenants)
            engine = make_engine(url)
            vault = VaultGateway(addrs=[bao.addr], token=broker_token)
            source = LegacySource(url, broker_engine=engine, table=LegacyTable("legacy.tenants"))
            try:
                load = os.getloadavg()[0]
                cpu = _Cpu(bao.pid, pg.pid)
                started = time.perf_counter()
                report = migrate_legacy(
                    engine, vault, source, batch_size=batch_size, workers=workers
                )
                seconds = time.perf_counter() - started
                used = cpu.since()
            finally:
                source.close()
                vault.close()
                engine.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = report.as_dict()["summary"]
    return {
        "benchmark": "legacy_migration",
        "tenants": n_tenants,
        "batch_size": batch_size,
        "workers": workers,
        "seconds": round(seconds, 3),
        "tenants_per_second": round(n_tenants / seconds, 1) if seconds else None,
        "cpu_ms_per_tenant": _per_tenant(used["migration"], n_tenants),
        "vault_cpu_ms_per_tenant": _per_tenant(used["vault"], n_tenants),
        "postgres_cpu_ms_per_tenant": _per_tenant(used["postgres"], n_tenants),
        "load_average_at_start": round(load, 2),
        "migrated": summary["migrated"],
        "failed": summary["failed"],
    }


def _cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread; not its children)."""
    times = os.times()
    return times.user + times.system


class _Cpu:
    """CPU seconds used since it was made: this process, OpenBao, PostgreSQL."""

    def __init__(self, vault_pid: int | None, postgres_pid: int | None) -> None:
        self._pids = {"vault": vault_pid, "postgres": postgres_pid}
        self._start = self._now()

    def since(self) -> dict[str, float | None]:
        """Each process's CPU seconds since the start (None when its pid is unknown)."""
        now = self._now()
        return {
            name: None
            if (end := now[name]) is None or (begin := self._start[name]) is None
            else end - begin
            for name in now
        }

    def _now(self) -> dict[str, float | None]:
        other = {name: None if pid is None else tree_cpu_s(pid) for name, pid in self._pids.items()}
        return {"migration": _cpu_seconds(), **other}


def _per_tenant(seconds: float | None, n_tenants: int) -> float | None:
    return round(1000 * seconds / n_tenants, 2) if seconds is not None and n_tenants else None


def main() -> None:
    """Command-line entry: print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_tenants", nargs="?", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args()
    result = run(args.n_tenants, batch_size=args.batch, workers=args.workers)
    print(json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()
