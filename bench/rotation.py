"""Key rotation: secrets rewrapped per second, on a stack of its own or the bench's.

    python -m bench.rotation                         # 10,000 secrets, both distributions
    BENCH_ROTATION_SECRETS=1200 python -m bench.rotation

Two distributions of the same number of secrets, each on tenants of its own:

- **realistic** (the headline): every tenant holds all six secrets a tenant can
  hold, its five integrations (Twilio, WooCommerce, Shopify, WhatsApp, OpenAI) and
  its payout record, so 10,000 secrets are 1,667 tenants;
- **worst case**: one secret per tenant (OpenAI), so 10,000 secrets are 10,000
  tenants and every secret pays a whole tenant's rotation (key rotate, listing,
  `min_decryption_version`, the PostgreSQL marks) by itself.

Everything is stored through the broker's own write paths (`save_credentials`,
`put_payout`), then `rotate_all` rotates every key and rewraps every secret with
`BENCH_ROTATE_WORKERS` workers, exactly what `broker keys rotate --all` runs.
`bench.run` calls `measure` on tenants of its own. It measures; it asserts nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from bench.direct import PRINCIPAL, connected, loopback_egress
from bench.process import find_process, own_stack, progress_logging, tree_cpu_s
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.integrations import service as integrations
from broker.integrations.providers import ProviderEndpoints
from broker.payments.payout import parse_details
from broker.payments.service import put_payout
from broker.tenants.keys import rotate_all
from broker.tenants.service import create_tenant
from broker.vault.gateway import VaultGateway
from tests.fakes.providers import VALID, FakeProviders

log = logging.getLogger("bench")

SEED_THREADS = 8
INTEGRATIONS = ("twilio", "woocommerce", "shopify", "whatsapp", "openai")
PAYOUT = {"iban": "DE89370400440532013000", "account_holder": "Bench Ltd"}


@dataclass(frozen=True)
class Distribution:
    """Which secrets every tenant of a run holds."""

    name: str
    providers: tuple[str, ...]
    payout: bool

    @property
    def per_tenant(self) -> int:
        """Secrets each tenant holds."""
        return len(self.providers) + int(self.payout)

    def describe(self) -> str:
        """What each tenant holds, for the result."""
        held = [*self.providers, *(["payout"] if self.payout else [])]
        return f"{self.per_tenant} per tenant: " + ", ".join(held)


REALISTIC = Distribution("realistic", INTEGRATIONS, payout=True)
WORST_CASE = Distribution("worst_case", ("openai",), payout=False)


@contextmanager
def _outbound() -> Iterator[tuple[integrations.Outbound, str]]:
    """Provider calls that may reach a local fake (closed on the way out), and its URL."""
    with FakeProviders() as fake:
        endpoints = ProviderEndpoints(
            twilio=fake.base_url,
            openai=fake.base_url,
            graph=fake.base_url,
            shopify_base=fake.base_url,
        )
        outbound = integrations.Outbound(loopback_egress(), endpoints)
        try:
            yield outbound, fake.base_url
        finally:
            outbound.client.close()


def seed(
    settings: Settings,
    count: int,
    prefix: str = "bench-rot",
    *,
    distribution: Distribution = WORST_CASE,
) -> list[str]:
    """`count` fresh tenants, each holding the secrets of `distribution`."""
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    with connected(settings) as (engine, vault), _outbound() as (outbound, fake_url):

        def one(tenant_id: str) -> None:
            _tenant(engine, vault, outbound, fake_url, tenant_id, distribution)

        with ThreadPoolExecutor(SEED_THREADS) as pool:
            list(pool.map(one, ids))
    return ids


def _tenant(
    engine: Engine,
    vault: VaultGateway,
    outbound: integrations.Outbound,
    fake_url: str,
    tenant_id: str,
    distribution: Distribution,
) -> None:
    with unit_of_work(engine) as session:
        create_tenant(session, vault, principal=PRINCIPAL, tenant_id=tenant_id, name=tenant_id)
    for provider in distribution.providers:
        fields = dict(VALID[provider])
        if provider == "woocommerce":
            fields["store_url"] = fake_url
        integrations.save_credentials(
            engine,
            vault,
            outbound,
            principal=PRINCIPAL,
            tenant_id=tenant_id,
            provider=provider,
            fields=fields,
            if_match=None,
            skip_connection_test=True,
        )
    if distribution.payout:
        details = parse_details("bank_transfer", PAYOUT)
        put_payout(
            engine,
            vault,
            principal=PRINCIPAL,
            tenant_id=tenant_id,
            method="bank_transfer",
            details=details,
        )


def measure(settings: Settings, tenants: Sequence[str], *, workers: int) -> dict[str, Any]:
    """Rotate every tenant's key and rewrap its secrets with `workers` workers."""
    log.info("rotating %d tenant keys", len(tenants))
    stack = _stack_processes(settings)
    # One transaction at a time per batch of tenants: the workers only call Vault.
    with connected(settings) as (engine, vault):
        requests = _count_requests(vault)
        load_before = os.getloadavg()[0]
        stack_before = {name: tree_cpu_s(pid) for name, pid in stack.items()}
        cpu, started = time.process_time(), time.perf_counter()
        reports = rotate_all(
            engine, vault, principal=PRINCIPAL, tenant_ids=list(tenants), workers=workers
        )
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
        stack_cpu_s = {name: tree_cpu_s(pid) - stack_before[name] for name, pid in stack.items()}
    rewrapped = sum(r.rewrapped for r in reports)
    return {
        "tenants": len(tenants),
        "secrets_rewrapped": rewrapped,
        "failed": sum(len(r.failed) for r in reports),
        "seconds": round(seconds, 2),
        "secrets_per_s": round(rewrapped / seconds, 1),
        "seconds_per_10000": round(seconds / rewrapped * 10_000, 1) if rewrapped else None,
        "workers": workers,
        "rotating_process_cpu_s": round(cpu_s, 2),
        "rotating_process_cpu_ms_per_secret": _per_secret_ms(cpu_s, rewrapped),
        # The stack's side of the same work: on 2 shared cores, OpenBao's CPU is most of it.
        **{
            f"{name}_cpu_ms_per_secret": _per_secret_ms(s, rewrapped)
            for name, s in stack_cpu_s.items()
        },
        # Attempts, counted as the gateway sees them (a retried request counts twice).
        "vault_requests_per_tenant": round(requests[0] / len(tenants), 2) if tenants else None,
        # The machine's 1-minute load average before and after: on a shared 2-core
        # machine the seconds mean little when it is far above 2.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _per_secret_ms(cpu_s: float, secrets: int) -> float | None:
    return round(cpu_s / secrets * 1000, 2) if secrets else None


def _stack_processes(settings: Settings) -> dict[str, int]:
    """The OpenBao and PostgreSQL processes of the bench's own stack, found by its data
    directory on their command lines; none that is not there (a stack of the tests')."""
    found = {
        "openbao": find_process("bao", "server", str(settings.data_dir)),
        "postgres": find_process("postgres", "-D", str(settings.data_dir)),
    }
    return {name: pid for name, pid in found.items() if pid is not None}


def _count_requests(vault: VaultGateway) -> list[int]:
    """A counter of the gateway's Vault attempts from now on, as a one-item list."""
    count = [0]
    lock = threading.Lock()  # told from the loop and from the gateway's threads

    def observe(operation: str, node: str, seconds: float, error: str | None) -> None:
        with lock:
            count[0] += 1

    vault.observe = observe
    return count


def measure_distributions(
    settings: Settings, secrets: int, *, workers: int, prefix: str = "bench-rot"
) -> dict[str, Any]:
    """Seed `secrets` secrets in each distribution (on tenants named `prefix-...`) and
    rotate each; the realistic figure on top (what `bench.report` reads), both under
    `distributions`."""
    figures: dict[str, dict[str, Any]] = {}
    for distribution in (REALISTIC, WORST_CASE):
        count = -(-secrets // distribution.per_tenant)
        log.info("seeding %d tenants, %s", count, distribution.describe())
        named = f"{prefix}-{distribution.name.replace('_', '-')}"
        tenants = seed(settings, count, named, distribution=distribution)
        figures[distribution.name] = {
            "distribution": distribution.describe(),
            **measure(settings, tenants, workers=workers),
        }
    return {**figures[REALISTIC.name], "distributions": figures}


def describe(rot: dict[str, Any]) -> str:
    """One line for the bench table (each distribution when both were measured)."""
    lines = []
    for name, figure in (rot.get("distributions") or {"": rot}).items():
        label = f" {name.replace('_', ' ')}" if name else ""
        lines.append(
            f"key rotation{label}: {figure['secrets_rewrapped']} secrets in {figure['seconds']} s"
            f" = {figure['secrets_per_s']} secrets/s ({figure['tenants']} tenants,"
            f" {figure['workers']} workers; {figure['seconds_per_10000']} s per 10,000;"
            f" {figure['failed']} failed)"
        )
    return "\n".join(lines)


def main() -> None:
    from bench.run import Plan

    progress_logging(log)
    plan = Plan.from_env()
    with own_stack("broker-bench-rotation-") as (_, settings, _work):
        results = measure_distributions(
            settings, plan.rotation_secrets, workers=plan.rotate_workers
        )
    print(json.dumps(results, indent=2))  # noqa: T201
    print(describe(results))  # noqa: T201


if __name__ == "__main__":
    main()
