"""The FastAPI application: wiring only; the work lives in the domain folders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from broker.audit import denials
from broker.audit.denials import DenialTally
from broker.audit.routes import router as audit_router
from broker.audit.routes import tenant_router as access_report_router
from broker.auth import refusals
from broker.auth.tokens import TokenVerifier
from broker.console.app import install_console
from broker.core.config import ConfigurationError, Settings
from broker.core.db import DatabaseBounds, make_engine
from broker.core.docs import install_docs
from broker.core.http import Metrics, RequestContextMiddleware, install_error_handlers
from broker.core.metrics import (
    ComponentMetrics,
    DependencyMetrics,
    StateCollector,
    install_runtime_collectors,
)
from broker.core.openapi import install_openapi
from broker.core.ratelimit import RateLimiter
from broker.credential_health.routes import platform_router as credentials_report_router
from broker.credential_health.routes import router as health_checks_router
from broker.credentials.routes import router as credentials_router
from broker.credentials.service import Delivery
from broker.events.routes import platform_router as platform_webhooks_router
from broker.events.routes import router as events_router
from broker.events.routes import tenant_router as webhooks_router
from broker.health.routes import router as health_router
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.oauth import Clock, OAuthAccess
from broker.integrations.providers import ProviderEndpoints
from broker.integrations.routes import callback_router as oauth_callback_router
from broker.integrations.routes import router as integrations_router
from broker.integrations.schemas import document_provider_fields
from broker.integrations.service import Outbound
from broker.leases.routes import router as leases_router
from broker.leases.service import Leasing
from broker.models import utcnow
from broker.payments.guard import CardDataGuard
from broker.payments.platform import StripeAccess
from broker.payments.routes import router as payments_router
from broker.settings.routes import router as settings_router
from broker.tenants.deletions import DeletionWatch
from broker.tenants.routes import router as tenants_router
from broker.vault.gateway import VaultGateway

# Every router the app serves, in matching order: each request tries them in turn.
# The probes (three fixed paths, cheap to pass over), then the hot paths (credential
# fetch, settings). Settings come before tenants: `/v1/tenants/settings` must not be
# read as a tenant id.
ROUTERS = (
    health_router,
    credentials_router,
    settings_router,
    audit_router,
    access_report_router,
    events_router,
    webhooks_router,
    platform_webhooks_router,
    integrations_router,
    health_checks_router,
    credentials_report_router,
    oauth_callback_router,
    leases_router,
    payments_router,
    tenants_router,
)


# FastAPI's own OpenTelemetry bridge, off: the broker's metrics are its own Prometheus
# registry, and its logs pass the redaction filter (broker.core.logging), while the bridge
# would export exception messages and stack traces unredacted as soon as any global provider
# is configured. Off, it also stops asking for those providers on every request.
NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    vault: VaultGateway | None = None,
    clock: Clock = utcnow,
) -> FastAPI:
    """Build the app. Tests may hand in their own engine and gateway (real ones), and a clock
    that OAuth token expiry is judged by."""
    if settings.database_url is None and engine is None:
        raise ConfigurationError("no database: set BROKER_DATABASE_URL")
    engine = engine or make_engine(
        settings.database_url.get_secret_value(),  # type: ignore[union-attr]
        DatabaseBounds.from_settings(settings),
    )
    vault = vault or VaultGateway.from_settings(settings)
    app = FastAPI(
        title="Tenant secrets broker",
        version="0.1.0",
        description=(
            "Credentials in Vault, preferences in PostgreSQL, OAuth-style scopes on every call."
        ),
        lifespan=_lifespan,
        # FastAPI's own pages load from a CDN: install_docs serves packaged copies.
        docs_url=None,
        redoc_url=None,
        telemetry=NO_TELEMETRY,
    )
    _build_state(app.state, settings, engine=engine, vault=vault, clock=clock)
    _install_metrics(app.state)
    # Outermost but one: raw card data is refused before any route or log sees it.
    app.add_middleware(CardDataGuard)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app.state.metrics,
        trusted_proxies=settings.trusted_proxies,
    )
    install_error_handlers(app, record_refusal=refusals.record_refusal)
    install_openapi(app, ROUTERS, document_provider_fields)
    install_docs(app)
    for router in ROUTERS:
        app.include_router(router)
    # The tenant-admin console: pages over the same services, not part of the API document.
    install_console(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    # The credential fetch's Vault reads go over this loop's own connections.
    async with state.vault.serving_on_loop():
        yield
    # Denials still being counted would be lost with the process.
    await run_in_threadpool(denials.write, state.engine, state.denials.drain())
    state.vault.close()
    state.outbound.client.close()
    state.leasing.calls.close()
    state.stripe.close()
    state.engine.dispose()


def _build_state(
    state: State, settings: Settings, *, engine: Engine, vault: VaultGateway, clock: Clock
) -> None:
    """What the app builds once and the routes reach through `broker.deps`."""
    state.settings = settings
    state.engine = engine
    state.vault = vault
    # First: a missing key is a configuration error, said before anything starts.
    state.verifier = TokenVerifier.from_settings(settings)
    state.deletions = DeletionWatch(engine, ttl_s=settings.tenant_status_ttl_s)
    state.deletions.revalidate()  # known before the first fetch, in the background
    state.metrics = Metrics()
    state.outbound = outbound = outbound_for(settings)
    state.dependency_metrics = dependencies = DependencyMetrics(state.metrics.registry)
    vault.observe = dependencies.vault_call
    state.oauth = oauth_access_for(
        settings, engine=engine, vault=vault, outbound=outbound, clock=clock
    )
    state.leasing = Leasing.from_settings(
        settings, engine=engine, vault=vault, outbound=outbound, clock=clock
    )
    state.stripe = StripeAccess(
        vault,
        api_base=settings.stripe_api_base,
        key_path=settings.stripe_key_path,
        observe=dependencies.stripe_call,
    )
    state.limiter = limiter = limiter_for(settings)
    state.denials = DenialTally(limiter.limits["denials"].get_expiry())
    state.delivery = Delivery(
        engine=engine,
        vault=vault,
        deletions=state.deletions,
        settings=settings,
        access=state.oauth,
        leasing=state.leasing,
        limiter=limiter,
        tally=state.denials,
    )


def _install_metrics(state: State) -> None:
    """The components' counters, and the collectors that read this process at scrape time."""
    metrics: Metrics = state.metrics
    limiter: RateLimiter = state.limiter
    ComponentMetrics(metrics.registry, limiter.limits).attach(
        engine=state.engine,
        limiter=limiter,
        verifier=state.verifier,
        deletions=state.deletions,
    )
    metrics.local.register(StateCollector(engine=state.engine, limiter=limiter))
    install_runtime_collectors(metrics.local)


def limiter_for(settings: Settings) -> RateLimiter:
    """The named rate limits, from the settings."""
    return RateLimiter(
        settings.rate_limit_storage,
        {
            "fetch": settings.rate_limit_fetch,
            "write": settings.rate_limit_write,
            "auth_failures": settings.rate_limit_auth_failures,
            "denials": settings.rate_limit_denials,
        },
    )


def oauth_access_for(
    settings: Settings,
    *,
    engine: Engine,
    vault: VaultGateway,
    outbound: Outbound,
    clock: Clock = utcnow,
) -> OAuthAccess:
    """What the OAuth connect, refresh and migration need, from the settings."""
    return OAuthAccess(
        engine=engine,
        vault=vault,
        outbound=outbound,
        redirect_base_url=settings.oauth_redirect_base_url,
        return_urls=tuple(settings.oauth_return_urls),
        state_ttl=timedelta(seconds=settings.oauth_state_ttl_s),
        refresh_margin=timedelta(seconds=settings.oauth_refresh_margin_s),
        lock_timeout_s=settings.oauth_refresh_lock_timeout_s,
        clock=clock,
    )


def outbound_for(settings: Settings) -> Outbound:
    """The SSRF-guarded client and provider base URLs for connection tests."""
    policy = EgressPolicy(
        allow_http=settings.egress_allow_http,
        allow_loopback=settings.egress_allow_loopback,
        timeout_s=settings.egress_timeout_s,
    )
    endpoints = ProviderEndpoints(
        twilio=settings.twilio_base_url,
        openai=settings.openai_base_url,
        graph=settings.graph_base_url,
        graph_version=settings.graph_api_version,
        shopify_api_version=settings.shopify_api_version,
        shopify_base=settings.shopify_base_url,
    )
    return Outbound(client=EgressClient(policy), endpoints=endpoints)
