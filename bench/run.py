"""`make bench`: the broker's figures, all from one run on this machine.

    python -m bench.run                          # every section (10 and 10,000 tenants)
    BENCH_ONLY=issue18 python -m bench.run       # only what issue 18 asks for, at full size
    BENCH_ONLY=fetch,settings,workers python -m bench.run
    BENCH_QUICK=1 python -m bench.run            # a smoke run of a few minutes

It sets up what `make dev` sets up (the bundled OpenBao with its file audit
device, the embedded PostgreSQL, bootstrap, migrations, the broker's AppRole)
in a temporary directory, serves the broker with `broker serve` in a process
of its own, and drives it and OpenBao with wrk (`bench/wrk.py`). It prints a
table and writes the same figures to `bench/results.json`. It measures; it
asserts nothing about time.

BENCH_ONLY picks sections, comma-separated (default: all of them, in this order):
fetch, settings, workers, wrapped, scale, soak, rotation, oauth, legacy, dynamic,
events; `issue18` stands for fetch,settings,workers,scale,soak,rotation,legacy.
`workers` measures fetch and settings on a second broker served with
`--workers 2` too (alone, it brings fetch and settings along); `scale` brings
fetch along (its figure is the ratio to fetch at a few tenants). The loadgen
ceiling and `GET /healthz` (the generator check) always run. A section not run
leaves no figure in results.json, and the summary says "not run" for it.

Knobs (environment): BENCH_ONLY, BENCH_QUICK=1, BENCH_DURATION_S, BENCH_WARMUP_S,
BENCH_SMALL_TENANTS, BENCH_LARGE_TENANTS, BENCH_LEGACY_TENANTS,
BENCH_SETUP_CONCURRENCY, BENCH_ROTATE_WORKERS, BENCH_ROTATION_SECRETS,
BENCH_ROTATION_WORST_TENANTS, BENCH_SOAK_REQUESTS, BENCH_SOAK_MAX_S, BENCH_SETTLE_S,
BENCH_OAUTH_CREDENTIALS, BENCH_DYNAMIC_MINTS, BENCH_DYNAMIC_LEASES, BENCH_EVENTS_RATE,
BENCH_EVENTS_DURATION_S, BENCH_EVENTS_WORKER_CONCURRENCY, BENCH_HEALTH_CREDENTIALS,
BENCH_OUTPUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from base64 import b64encode
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hvac
from sqlalchemy import Engine

from bench import (
    direct,
    dynamic_leases,
    events,
    legacy_migration,
    oauth_refresh,
    report,
    rotation,
    soak,
    workers,
    wrk,
)
from bench.oauth_refresh import Drain
from bench.process import BrokerCommand, find_process, own_stack, progress_logging, tree_cpu_s
from bench.report import (
    CEILING,
    CONCURRENCIES,
    FETCH,
    FEW,
    FEW_FLOOR,
    FLOOR,
    HEALTHZ,
    MANY,
    MANY_FIRST,
    MANY_FLOOR,
    REFRESHED,
    REFRESHING,
    SETTINGS_GET,
    SETTINGS_PATCH,
    WRAPPED,
    WRAPPED_FLOOR,
)
from broker.auth.scopes import Scope
from broker.auth.tokens import mint_token
from broker.core.config import Settings
from broker.core.db import make_engine
from broker.devstack.openbao import free_port
from tests.fakes.providers import FakeProviders
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
PROVIDER = "shopify"
# Far above anything the load reaches: the benchmark measures the work, not the limiter.
UNLIMITED = "100000000/minute"


# The sections BENCH_ONLY picks from, in the order a run measures them.
SECTIONS = (
    "fetch",
    "settings",
    "workers",
    "wrapped",
    "scale",
    "soak",
    "rotation",
    "oauth",
    "legacy",
    "dynamic",
    "events",
)
ALIASES = {
    "all": SECTIONS,
    "issue18": ("fetch", "settings", "workers", "scale", "soak", "rotation", "legacy"),
}


def selection(value: str) -> tuple[str, ...]:
    """The sections BENCH_ONLY names (aliases expanded), in run order; empty means all."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if not names:
        return SECTIONS
    chosen: set[str] = set()
    for name in names:
        if name not in SECTIONS and name not in ALIASES:
            known = ", ".join((*SECTIONS, *ALIASES))
            raise SystemExit(f"BENCH_ONLY: unknown section {name!r} (known: {known})")
        chosen.update(ALIASES.get(name, (name,)))
    if "workers" in chosen and not chosen & {"fetch", "settings"}:
        # Workers compare the fetch and settings figures of one and two workers.
        chosen.update(("fetch", "settings"))
    if "scale" in chosen:
        # The latency at many tenants is compared with the fetch at a few.
        chosen.add("fetch")
    return tuple(section for section in SECTIONS if section in chosen)


@dataclass(frozen=True)
class Plan:
    """How big and how long; the defaults are the issue's numbers."""

    quick: bool
    only: tuple[str, ...]
    duration_s: float
    warmup_s: float
    small_tenants: int
    large_tenants: int
    legacy_tenants: int
    setup_concurrency: int
    rotate_workers: int
    rotation_secrets: int
    rotation_worst_tenants: int
    soak_requests: int
    soak_max_s: float
    settle_s: float
    oauth_credentials: int
    dynamic_mints: int
    dynamic_leases: int

    @classmethod
    def from_env(cls) -> Plan:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")

        def knob(name: str, full: float, fast: float) -> float:
            return float(os.environ.get(f"BENCH_{name}") or (fast if quick else full))

        return cls(
            quick=quick,
            only=selection(os.environ.get("BENCH_ONLY", "")),
            duration_s=knob("DURATION_S", 8, 2),
            warmup_s=knob("WARMUP_S", 1, 0.5),
            small_tenants=int(knob("SMALL_TENANTS", 10, 10)),
            large_tenants=int(knob("LARGE_TENANTS", 10_000, 200)),
            legacy_tenants=int(knob("LEGACY_TENANTS", 10_000, 100)),
            setup_concurrency=int(knob("SETUP_CONCURRENCY", 16, 16)),
            rotate_workers=int(knob("ROTATE_WORKERS", 16, 16)),
            rotation_secrets=int(knob("ROTATION_SECRETS", 10_000, 200)),
            rotation_worst_tenants=int(knob("ROTATION_WORST_TENANTS", 2_000, 200)),
            soak_requests=int(knob("SOAK_REQUESTS", 100_000, 5_000)),
            soak_max_s=knob("SOAK_MAX_S", 600, 60),
            settle_s=knob("SETTLE_S", 70, 5),
            oauth_credentials=int(knob("OAUTH_CREDENTIALS", 10_000, 200)),
            dynamic_mints=int(knob("DYNAMIC_MINTS", 500, 50)),
            dynamic_leases=int(knob("DYNAMIC_LEASES", 10_000, 500)),
        )

    def runs(self, section: str) -> bool:
        """Whether BENCH_ONLY selected `section`."""
        return section in self.only


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- processes --------------------------------------------------------------------------


class BrokerProcess(BrokerCommand):
    """`broker serve` in its own process, configured like the dev stack's broker."""

    command = "serve"
    stop_signal = signal.SIGINT
    stop_wait_s = 15.0

    def __init__(
        self, settings: Settings, work: Path, extra_env: dict[str, str], log_name: str = "broker"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = work
        self.settings = settings
        self.extra_env = extra_env
        assert settings.database_url is not None
        assert settings.vault_role_id is not None
        assert settings.vault_secret_id is not None
        assert settings.jwt_hs256_secret is not None
        own = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env = own | {
            "BROKER_ENV": "dev",
            "BROKER_HOST": "127.0.0.1",
            "BROKER_PORT": str(self.port),
            "BROKER_LOG_LEVEL": "WARNING",
            "BROKER_DATABASE_URL": settings.database_url.get_secret_value(),
            "BROKER_VAULT_ADDRS": ",".join(settings.vault_addrs),
            "BROKER_VAULT_ROLE_ID": settings.vault_role_id.get_secret_value(),
            "BROKER_VAULT_SECRET_ID": settings.vault_secret_id.get_secret_value(),
            "BROKER_JWT_HS256_SECRET": settings.jwt_hs256_secret.get_secret_value(),
            "BROKER_RATE_LIMIT_FETCH": UNLIMITED,
            "BROKER_RATE_LIMIT_WRITE": UNLIMITED,
            "BROKER_RATE_LIMIT_AUTH_FAILURES": UNLIMITED,
            "BROKER_WORKERS": "1",
            **extra_env,
        }
        super().__init__(env, work / f"{log_name}.log")

    def sibling(self, workers: int) -> BrokerProcess:
        """Another broker on the same stack and settings, served with `--workers N`."""
        env = {**self.extra_env, "BROKER_WORKERS": str(workers)}
        return BrokerProcess(self.settings, self.work, env, log_name=f"broker-{workers}w")

    def ready(self) -> bool:
        """True once the broker answers /readyz."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS since the last reset) of the broker process."""
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found

    def cpu_s(self) -> float:
        """CPU seconds the broker has used so far, its worker processes included."""
        return tree_cpu_s(self.pid)

    def reset_peak(self) -> bool:
        """Start VmHWM afresh (Linux: `5` into clear_refs); False where not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


@contextlib.contextmanager
def static_server() -> Iterator[str]:
    """A trivial HTTP server in its own process: the ceiling of the generator itself."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.static_server", str(port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def loadgen(
    spec: dict[str, Any], cpu: dict[str, Callable[[], float]] | None = None
) -> dict[str, Any]:
    """Run one measurement with wrk (bench/wrk.py), warning about any unexpected answer."""
    result = wrk.measure(spec, cpu=cpu)
    if result["non_2xx_3xx"] or result["errors"]:
        log.warning(
            "unexpected answers in %s: %d non-2xx, errors %s",
            spec.get("name"),
            result["non_2xx_3xx"],
            result["errors"],
        )
    return result


# -- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """Minting with the dev signing key, as `broker dev` prints them."""

    key: str
    issuer: str
    audience: str | None

    def mint(self, subject: str, scopes: list[str], **claims: Any) -> str:
        return mint_token(
            self.key,
            subject=subject,
            scopes=scopes,
            issuer=self.issuer,
            audience=self.audience,
            ttl_s=6 * 3600,
            **claims,
        )

    def platform(self) -> str:
        return self.mint("bench-ops", [Scope.PLATFORM_ADMIN])

    def admin(self, tenant: str) -> str:
        return self.mint(f"bench-admin-{tenant}", [Scope.TENANT_ADMIN], tenant_id=tenant)

    def service(self, tenant: str) -> str:
        return self.mint("bench-worker", [Scope.CREDENTIALS_READ], kind="service", tenants=[tenant])


def tenant_ids(start: int, stop: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(start, stop)]


async def _create_tenants(
    base_url: str,
    tokens: Tokens,
    tenants: list[str],
    concurrency: int,
    access_token: Callable[[str], str],
) -> None:
    """Each tenant through the API: its Transit key, default settings, and credentials."""
    platform_auth = {"Authorization": f"Bearer {tokens.platform()}"}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def one(tenant: str) -> None:
            async with gate:
                created = await client.post(
                    "/v1/tenants",
                    json={"id": tenant, "name": f"Bench {tenant}"},
                    headers=platform_auth,
                )
                if created.status_code not in (201, 409):
                    raise RuntimeError(f"creating {tenant}: {created.status_code}")
                fields = {
                    "shop_domain": shop_domain(tenant),
                    "access_token": access_token(shop_domain(tenant)),
                    "webhook_secret": secrets.token_urlsafe(24),
                }
                saved = await client.put(
                    f"/v1/tenants/settings/integrations/{PROVIDER}",
                    json={"fields": fields, "skip_connection_test": True},
                    headers={"Authorization": f"Bearer {tokens.admin(tenant)}"},
                )
                if saved.status_code != 200:
                    raise RuntimeError(f"storing credentials of {tenant}: {saved.status_code}")

        await asyncio.gather(*(one(t) for t in tenants))


def shop_domain(tenant: str) -> str:
    """The bench tenant's shop at (fake) Shopify."""
    return f"{tenant}.myshopify.com"


def create_tenants(
    base_url: str,
    tokens: Tokens,
    tenants: list[str],
    concurrency: int,
    access_token: Callable[[str], str],
) -> float:
    """Create tenants with credentials; returns tenants per second (setup, not a figure).

    `access_token(shop)` gives each shop's pasted token: the fake Shopify's, so the
    OAuth figures can migrate them to expiring ones later.
    """
    started = time.perf_counter()
    asyncio.run(_create_tenants(base_url, tokens, tenants, concurrency, access_token))
    return len(tenants) / (time.perf_counter() - started)


def vault_token(settings: Settings) -> str:
    """A token with the broker's own policy (its AppRole), for the Vault floor."""
    assert settings.vault_role_id is not None
    assert settings.vault_secret_id is not None
    client = hvac.Client(url=settings.vault_addrs[0])
    try:
        login = client.auth.approle.login(
            role_id=settings.vault_role_id.get_secret_value(),
            secret_id=settings.vault_secret_id.get_secret_value(),
            use_token=False,
        )
    finally:
        client.adapter.close()
    token: str = login["auth"]["client_token"]
    return token


# -- measurements -----------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    name: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float
    note: str = ""
    # CPU per request (ms) of the broker (all its processes), OpenBao and PostgreSQL.
    cpu_ms: dict[str, float | None] = field(default_factory=dict)


class Bench:
    """Runs the measurements against one stack and collects the figures."""

    def __init__(
        self,
        plan: Plan,
        settings: Settings,
        broker: BrokerProcess,
        shopify: FakeShopifyOAuth,
        providers: FakeProviders,
    ) -> None:
        self.plan = plan
        self.providers = providers
        self.settings = settings
        self.broker = broker
        self.shopify = shopify
        assert settings.jwt_hs256_secret is not None
        self.tokens = Tokens(
            settings.jwt_hs256_secret.get_secret_value(),
            settings.jwt_issuer,
            settings.jwt_audience,
        )
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        # The Vault floor's token holds the broker's own policy: root would skip the ACLs.
        self.floor_token = vault_token(settings)
        # The stack's own servers, by their command lines under the run's directory.
        self.servers = {
            name: pid
            for name, pid in (
                ("vault", find_process("bao", "server", str(broker.work))),
                ("postgres", find_process("bin/postgres", "-D", str(broker.work))),
            )
            if pid is not None
        }
        self._ciphertexts: dict[str, str] = {}
        # Every tenant created so far, in order, and when the bulk load of them ended.
        self.created: list[str] = []
        self.grown_at = time.monotonic()

    def measure(
        self,
        name: str,
        base_url: str,
        concurrency: int,
        note: str = "",
        *,
        broker: BrokerProcess | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """One figure with wrk, with the CPU per request of `broker` (the bench's own
        broker when `base_url` is its), OpenBao and PostgreSQL."""
        if broker is None and base_url == self.broker.url:
            broker = self.broker
        spec = {
            "name": name,
            "base_url": base_url,
            "concurrency": concurrency,
            "duration_s": self.plan.duration_s,
            "warmup_s": self.plan.warmup_s,
            **spec,
        }
        return self._record(name, concurrency, loadgen(spec, self.cpu_readers(broker)), note)

    def cpu_readers(self, broker: BrokerProcess | None) -> dict[str, Callable[[], float]]:
        """What reads the CPU used so far by `broker` (if any), OpenBao and PostgreSQL."""
        readers: dict[str, Callable[[], float]] = {}
        if broker is not None:
            readers["broker"] = broker.cpu_s
        for name, pid in self.servers.items():
            readers[name] = partial(tree_cpu_s, pid)
        return readers

    def _record(
        self, name: str, concurrency: int, result: dict[str, Any], note: str
    ) -> dict[str, Any]:
        """Keep a figure under its name and as a row of the table."""
        self.results.setdefault(name, {})[f"c{concurrency}"] = result
        self.rows.append(
            Row(
                name,
                concurrency,
                result["rps"],
                result["p50_ms"],
                result["p99_ms"],
                result["loadgen_cpu"],
                note,
                result.get("cpu_ms_per_request", {}),
            )
        )
        log.info("%s c=%d: %.1f req/s", name, concurrency, result["rps"])
        return result

    def fetch_targets(self, tenants: list[str], query: str = "") -> list[dict[str, Any]]:
        return [
            {
                "method": "GET",
                "path": f"/v1/credentials/{t}/{PROVIDER}{query}",
                "headers": {"Authorization": f"Bearer {self.tokens.service(t)}"},
                "body": None,
            }
            for t in tenants
        ]

    def ciphertexts(self, tenants: list[str]) -> dict[str, str]:
        """Each tenant's stored ciphertext, read once, for the floor's decrypt calls."""
        missing = [t for t in tenants if t not in self._ciphertexts]
        kv = self.settings.kv_mount
        with httpx.Client(
            base_url=self.settings.vault_addrs[0],
            headers={"X-Vault-Token": self.floor_token},
            limits=httpx.Limits(max_connections=8),
        ) as http:

            def read(tenant: str) -> tuple[str, str]:
                answer = http.get(f"/v1/{kv}/data/tenants/{tenant}/integrations/{PROVIDER}")
                answer.raise_for_status()
                return tenant, str(answer.json()["data"]["data"]["ciphertext"])

            with ThreadPoolExecutor(8) as pool:
                self._ciphertexts.update(pool.map(read, missing))
        return {t: self._ciphertexts[t] for t in tenants}

    def floor(
        self, name: str, concurrency: int, tenants: list[str], note: str, wrap_ttl: str = ""
    ) -> dict[str, Any]:
        """The Vault work of one fetch, straight to OpenBao with the broker's policy.

        Each call a fetch makes (KV v2 read, Transit decrypt, and the response-wrap for
        a wrapped fetch) is measured alone with wrk over the same tenants, and the
        figures are combined in series (`wrk.in_series`): the floor is what a fetch
        would cost if the broker added nothing between its Vault calls.
        """
        parts = []
        for call, targets in self._floor_calls(tenants, wrap_ttl).items():
            part = loadgen(
                {
                    "name": f"{name}: {call}",
                    "base_url": self.settings.vault_addrs[0],
                    "concurrency": concurrency,
                    "duration_s": self.plan.duration_s,
                    "warmup_s": self.plan.warmup_s,
                    "targets": targets,
                },
                self.cpu_readers(None),
            )
            parts.append({"call": call, **part})
        return self._record(name, concurrency, wrk.in_series(parts), note)

    def _floor_calls(self, tenants: list[str], wrap_ttl: str) -> dict[str, list[dict[str, Any]]]:
        """wrk targets for each Vault call of a fetch, over `tenants`."""
        headers = {"X-Vault-Token": self.floor_token}
        post = {**headers, "Content-Type": "application/json"}
        ciphertexts = self.ciphertexts(tenants)
        kv = f"/v1/{self.settings.kv_mount}/data/tenants"

        def decrypt(tenant: str) -> str:
            context = b64encode(f"{tenant}/{PROVIDER}".encode()).decode()
            return json.dumps({"ciphertext": ciphertexts[tenant], "context": context})

        transit = f"/v1/{self.settings.transit_mount}/decrypt"
        calls = {
            "kv read": [
                _target("GET", f"{kv}/{t}/integrations/{PROVIDER}", headers) for t in tenants
            ],
            "transit decrypt": [
                _target("POST", f"{transit}/tenant-{t}", post, decrypt(t)) for t in tenants
            ],
        }
        if wrap_ttl:
            lease = {"fields": {"access_token": "shpat_" + "0" * 32}, "expires_at": "x" * 25}
            wrap = {**post, "X-Vault-Wrap-TTL": wrap_ttl}
            calls["response wrap"] = [
                _target("POST", "/v1/sys/wrapping/wrap", wrap, json.dumps(lease))
            ]
        return calls

    def run(self) -> None:
        """The selected sections, in an order where each leaves the stack as the next expects.

        The generator check (ceiling and `GET /healthz`) always runs; every other
        section only when BENCH_ONLY selects it, each timed under `section_wall_s`.
        """
        plan = self.plan
        self.results["sections_run"] = list(plan.only)
        self.results["sections_not_run"] = [s for s in SECTIONS if not plan.runs(s)]
        small = tenant_ids(0, plan.small_tenants)
        log.info("creating %d tenants", len(small))
        self.create(small)
        self.generator_and_overhead()
        with workers.replicas(self.broker, self.worker_counts()) as replicas:
            self.section("fetch", lambda: self.fetch_and_floor(small, replicas))
            self.section("settings", lambda: self.settings_reads_and_writes(small, replicas))
        if plan.runs("workers"):
            self.results["workers"] = workers.gains(self.results)
        self.section("wrapped", lambda: self.wrapped_fetch(small))
        if plan.runs("scale") or plan.runs("soak"):
            self.grow(tenant_ids(0, plan.large_tenants))
        self.section("scale", self.many_tenants)
        self.section("soak", self.memory_soak)
        self.section("rotation", self.key_rotation)
        self.section("oauth", self.oauth_refresh)
        self.section("legacy", self.legacy)
        self.section("dynamic", self.dynamic_credentials)
        self.section("events", self.event_delivery)

    def section(self, name: str, measure: Callable[[], None]) -> None:
        """Run one section when selected, and keep how long it took.

        A section that fails is logged and recorded under `section_errors` (the
        run then exits non-zero); the others still run, so one failure late in a
        long run does not throw away the figures measured before it.
        """
        if not self.plan.runs(name):
            return
        log.info("section %s", name)
        started = time.perf_counter()
        try:
            measure()
        except Exception as exc:
            log.exception("section %s failed", name)
            self.results.setdefault("section_errors", {})[name] = type(exc).__name__
        took = round(time.perf_counter() - started, 1)
        self.results.setdefault("section_wall_s", {})[name] = took

    def worker_counts(self) -> tuple[int, ...]:
        """Worker counts fetch and settings are measured with: 1, and 2 with `workers`."""
        return workers.COUNTS if self.plan.runs("workers") else workers.COUNTS[:1]

    def create(self, tenants: list[str]) -> float:
        """Tenants with credentials through the API; tenants per second (setup)."""
        rate = create_tenants(
            self.broker.url,
            self.tokens,
            tenants,
            self.plan.setup_concurrency,
            self.shopify.issue_offline_token,
        )
        self.created.extend(tenants)
        return rate

    def generator_and_overhead(self) -> None:
        """wrk against a trivial server (its ceiling), then the broker's cheapest route."""
        static_target = [_target("GET", "/", {})]
        with static_server() as static:
            for c in CONCURRENCIES:
                self.measure(CEILING, static, c, "static asyncio server", targets=static_target)
        for c in CONCURRENCIES:
            self.measure(
                HEALTHZ,
                self.broker.url,
                c,
                "trivial route",
                targets=[_target("GET", "/healthz", {})],
            )

    def fetch_and_floor(self, small: list[str], replicas: dict[int, BrokerProcess]) -> None:
        """Fetches on each replica and their Vault floor, back to back; the memory meanwhile."""
        idle = self.broker.memory_kb()
        peak_reset = self.broker.reset_peak()
        targets = self.fetch_targets(small)
        for c in CONCURRENCIES:
            for count, broker in replicas.items():
                name = report.named(FETCH, count)
                note = f"{len(small)} tenants"
                self.measure(name, broker.url, c, note, broker=broker, targets=targets)
            self.floor(FLOOR, c, small, "KV read + Transit decrypt, in series")
        under_fetch = self.broker.memory_kb()
        self.results["memory"] = {
            "broker_pid": self.broker.pid,
            "idle_rss_kb": idle.get("VmRSS"),
            "peak_rss_under_fetch_kb": under_fetch.get("VmHWM"),
            "peak_is_since_fetch_load_began": peak_reset,
        }
        self.results["ratios"] = {
            f"workers_{count}": report.ratios(self.results, report.named(FETCH, count), FLOOR)
            for count in replicas
        }

    def wrapped_fetch(self, small: list[str]) -> None:
        """Fetches with `?wrap_ttl=60s` and their floor, which adds the response wrap."""
        for c in CONCURRENCIES:
            self.measure(
                WRAPPED,
                self.broker.url,
                c,
                "wrap_ttl=60s",
                targets=self.fetch_targets(small, "?wrap_ttl=60s"),
            )
            self.floor(WRAPPED_FLOOR, c, small, "KV + decrypt + wrap", wrap_ttl="60s")
        self.results["wrapped_ratios"] = report.ratios(self.results, WRAPPED, WRAPPED_FLOOR)

    def settings_reads_and_writes(
        self, small: list[str], replicas: dict[int, BrokerProcess]
    ) -> None:
        """`GET` and `PATCH /v1/tenants/settings` on each replica, each PATCH a change."""
        admin_auth = [{"Authorization": f"Bearer {self.tokens.admin(t)}"} for t in small]
        reads = [_target("GET", "/v1/tenants/settings", h) for h in admin_auth]
        change = '{"branding": {"footer_text": "bench {n}"}}'
        writes = [
            _target(
                "PATCH", "/v1/tenants/settings", {**h, "Content-Type": "application/json"}, change
            )
            for h in admin_auth
        ]
        for name, targets, note in (
            (SETTINGS_GET, reads, f"{len(small)} tenants"),
            (SETTINGS_PATCH, writes, "a change every time"),
        ):
            for c in CONCURRENCIES:
                for count, broker in replicas.items():
                    named = report.named(name, count)
                    self.measure(named, broker.url, c, note, broker=broker, targets=targets)

    def grow(self, large: list[str]) -> None:
        """Bulk-load up to the large set of tenants (setup: its rate is not a figure)."""
        log.info("growing to %d tenants", len(large))
        started = time.monotonic()
        rate = self.create(large[len(self.created) :])
        self.grown_at = time.monotonic()
        self.results["setup"] = {
            "tenants_created_per_s": round(rate, 1),
            "grow_s": round(self.grown_at - started, 1),
        }

    def settle(self) -> None:
        """Wait until `settle_s` have passed since the bulk load.

        Measure a steady state, not the wake of bulk-loading the tenants: the
        broker's rate-limit windows (60 s) still hold every setup write, and
        OpenBao and PostgreSQL are still flushing what it wrote.
        """
        left = self.plan.settle_s - (time.monotonic() - self.grown_at)
        if left > 0:
            log.info("letting the stack settle for %.0f s", left)
            time.sleep(left)

    def many_tenants(self) -> None:
        """Fetch (and its floor) again over the large set: latency against the small set's.

        Two broker figures at each concurrency. First visits, each on a broker just
        restarted: tenants this process has never fetched (the measured run begins where
        the warm-up has not been), so nothing it keeps per item (the ciphertext a fetch's
        decrypt can start from, broker/credentials/opening.py) or per caller (a verified
        token, a header found clean) helps. Then the steady state, the figure judged
        against the small set's, whose tenants are fetched over and over: a warm-up long
        enough to fetch every tenant once (as services fetching again before their
        leases end do), and the measured run from the first tenant, each one a whole
        cycle after its last fetch.

        The small set's fetch and floor are measured again just before, on the same
        broker: the machine's speed drifts over a run (in one, the floor measured a third
        faster seven minutes after the fetch section), so only figures taken back to back
        tell what the number of tenants does.
        """
        self.settle()
        large = self.created
        small = tenant_ids(0, self.plan.small_tenants)
        note = f"{len(large)} tenants"
        few, many = self.fetch_targets(small), self.fetch_targets(large)
        self.first_visits(many)
        for c in CONCURRENCIES:
            beside = f"{len(small)} tenants, beside {len(large)}"
            self.measure(FEW, self.broker.url, c, beside, targets=few)
            self.measure(MANY, self.broker.url, c, note, targets=many, warmup_s=self.one_cycle_s(c))
            # The same floor over both sets: shows how much of any change is Vault's.
            self.floor(FEW_FLOOR, c, small, beside)
            self.floor(MANY_FLOOR, c, large, note)
        self.scale_ratios(small, large)

    def first_visits(self, targets: list[dict[str, Any]]) -> None:
        """`targets` fetched at each concurrency, each time on a broker just restarted."""
        for c in CONCURRENCIES:
            self.broker.stop()
            self.broker.start()
            note = f"{len(targets)} tenants, first visits"
            self.measure(MANY_FIRST, self.broker.url, c, note, targets=targets)

    def scale_ratios(self, small: list[str], large: list[str]) -> None:
        """The many-tenant figures over the few-tenant ones, as `results["scale"]`."""
        self.results["scale"] = {
            "small_tenants": len(small),
            "large_tenants": len(large),
            **{
                f"c{c}": {
                    key: report.ratio(self.results, a, b, c, figure)
                    for key, a, b, figure in (
                        ("p50_ratio", MANY, FEW, "p50_ms"),
                        ("p99_ratio", MANY, FEW, "p99_ms"),
                        ("floor_p50_ratio", MANY_FLOOR, FEW_FLOOR, "p50_ms"),
                        ("first_visit_p50_ratio", MANY_FIRST, FEW, "p50_ms"),
                        ("fetch_section_p50_ratio", MANY, FETCH, "p50_ms"),
                    )
                    if a in self.results and b in self.results
                }
                for c in CONCURRENCIES
            },
        }

    def one_cycle_s(self, concurrency: int) -> float:
        """A warm-up that fetches every created tenant at least once at `concurrency`.

        From the rate its first visits were just measured at, with half as much again
        to spare (wrk's threads need not keep the same pace).
        """
        rate = float(self.results[MANY_FIRST][f"c{concurrency}"]["rps"])
        return max(self.plan.warmup_s, 1.5 * len(self.created) / max(rate, 1.0))

    def memory_soak(self) -> None:
        """The memory soak over every tenant created, at the c=8 fetch rate measured so far."""
        measured = self.results.get(MANY) or self.results.get(FETCH)
        rate = measured["c8"]["rps"] if measured else soak.GUESSED_RATE
        self.results["memory_soak"] = soak.run(
            self,
            self.created,
            requests=self.plan.soak_requests,
            rate=rate,
            max_s=self.plan.soak_max_s,
        )

    def key_rotation(self) -> None:
        """Key rotation of `rotation_secrets` secrets (`bench/rotation.py`), two ways.

        The headline, judged against the target: tenants seeded with every secret a
        tenant can hold (`rotation.REALISTIC`, six each). Beside it the worst case, one
        secret per tenant, on the bench's own tenants (one Shopify credential each), at
        most `rotation_worst_tenants` of them: every secret pays a whole tenant's
        rotation by itself, so its rate is what 10,000 such tenants would see.
        """
        plan = self.plan
        count = -(-plan.rotation_secrets // rotation.REALISTIC.per_tenant)
        log.info("seeding %d tenants, %s", count, rotation.REALISTIC.describe())
        seeded = rotation.seed(
            self.settings, count, "bench-rot-realistic", distribution=rotation.REALISTIC
        )
        realistic = {
            "distribution": rotation.REALISTIC.describe(),
            **rotation.measure(self.settings, seeded, workers=plan.rotate_workers),
        }
        worst_tenants = self.created[: plan.rotation_worst_tenants]
        if not worst_tenants:
            worst_tenants = rotation.seed(self.settings, plan.rotation_worst_tenants)
        worst = {
            "distribution": "one secret per tenant (the bench's own tenants)",
            **rotation.measure(self.settings, worst_tenants, workers=plan.rotate_workers),
        }
        self.results["rotation"] = {
            **realistic,
            "distributions": {"realistic": realistic, "worst_case": worst},
        }

    def oauth_refresh(self) -> None:
        """Shopify credentials all inside their refresh window: the job's rate, fetch latency."""
        tenants = tenant_ids(0, self.plan.oauth_credentials)
        if len(tenants) > len(self.created):
            log.info("creating %d more tenants", len(tenants) - len(self.created))
            self.create(tenants[len(self.created) :])
        assert self.settings.database_url is not None
        engine = make_engine(self.settings.database_url.get_secret_value())
        try:
            log.info("migrating %d Shopify tokens to expiring ones", len(tenants))
            seeded = oauth_refresh.seed(
                self.settings,
                engine,
                self.shopify,
                principal=direct.PRINCIPAL,
                tenants=tenants,
                workers=self.plan.rotate_workers,
            )
            # Until the last token seeded is inside the window too.
            time.sleep(max(0.0, seeded["ready_at"] - time.time()))
            seeded["due_at_start"] = oauth_refresh.count_due(engine, self.settings)
            log.info("refreshing %d due tokens through the worker", seeded["due_at_start"])
            drain = oauth_refresh.Drain(
                engine, self.settings, self.shopify, expiry=seeded["first_expiry"]
            )
            windows = self._drain_while_fetching(engine, drain, tenants)
            by_actor = oauth_refresh.refreshes_by_actor(engine)
        finally:
            engine.dispose()
        self.results["oauth_refresh"] = {
            "credentials": len(tenants),
            "seed": seeded,
            "drain": drain.figures(),
            "during_fetch": windows,
            "refreshes_by_actor": by_actor,
            "fake_refresh_calls": self.shopify.refresh_calls,
            "job_batch": self.settings.oauth_refresh_batch,
        }

    def _drain_while_fetching(
        self, engine: Engine, drain: Drain, tenants: list[str]
    ) -> dict[str, Any]:
        """A real worker drains the due tokens while fetches run; then fetches once settled."""
        broker = self.broker.url
        windows: dict[str, Any] = {}
        worker_log = self.broker.work / "worker.log"
        with oauth_refresh.WorkerProcess(self.broker.env, engine, worker_log):
            drain.start()
            try:
                for c in CONCURRENCIES:
                    at, calls = drain.snapshot()
                    self.measure(REFRESHING, broker, c, targets=self.fetch_targets(tenants))
                    until, calls_after = drain.snapshot()
                    refreshed = calls_after - calls
                    windows[f"c{c}"] = {
                        "refresh_calls": refreshed,
                        "per_s": round(refreshed / (until - at), 1),
                    }
                    self.rows[-1].note = f"{len(tenants)} oauth, {refreshed} refreshed meanwhile"
                drain.wait()
            finally:
                drain.stop()
            # The same fetches once every token is fresh again: the baseline.
            for c in CONCURRENCIES:
                note = f"{len(tenants)} oauth credentials"
                self.measure(REFRESHED, broker, c, note, targets=self.fetch_targets(tenants))
        return windows

    def legacy(self) -> None:
        """The legacy migration's own benchmark, on a stack of its own (`legacy_migration.run`)."""
        log.info("migrating %d legacy tenants", self.plan.legacy_tenants)
        self.results["legacy_migration"] = legacy_migration.run(self.plan.legacy_tenants)

    def dynamic_credentials(self) -> None:
        """Dynamic credentials: a live lease reused, a fresh mint, due leases revoked."""
        self.results["dynamic_leases"] = dynamic_leases.run(
            self, self.providers, mints=self.plan.dynamic_mints, leases=self.plan.dynamic_leases
        )

    def event_delivery(self) -> None:
        """Event delivery and health checks (`bench/events.py`)."""
        self.results["events"] = events.run(self.settings, self.broker.env, self.broker.work)


def _target(
    method: str, path: str, headers: dict[str, str], body: str | None = None
) -> dict[str, Any]:
    """One request wrk cycles through."""
    return {"method": method, "path": path, "headers": headers, "body": body}


def main() -> None:
    progress_logging(log)
    plan = Plan.from_env()
    output = Path(os.environ.get("BENCH_OUTPUT") or ROOT / "bench" / "results.json")
    started = time.perf_counter()
    with own_stack("broker-bench-") as (stack, settings, work):
        shopify = stack.enter_context(oauth_refresh.fake_shopify(FakeClock()))
        providers = stack.enter_context(FakeProviders())
        oauth_refresh.store_platform_app(work / "data", settings, shopify)
        broker = stack.enter_context(
            BrokerProcess(
                settings,
                work,
                oauth_refresh.egress_env(shopify) | dynamic_leases.egress_env(providers),
            )
        )
        bench = Bench(plan, settings, broker, shopify, providers)
        bench.run()
    results = {
        "machine": machine(),
        "plan": asdict(plan),
        "wall_s": round(time.perf_counter() - started, 1),
        **bench.results,
        "rows": [asdict(r) for r in bench.rows],
    }
    # The figures first, as measured: a summary that cannot be made still leaves them.
    output.write_text(json.dumps(results, indent=2) + "\n")
    results = {"summary": report.summary(results), **results}
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(report.table(bench.rows, results))  # noqa: T201
    print(f"\nwritten to {output}")  # noqa: T201
    if "section_errors" in results:
        raise SystemExit(f"failed sections: {', '.join(results['section_errors'])}")


if __name__ == "__main__":
    main()
