"""Shared request dependencies, defined once and reached through Annotated aliases.

What the app builds once (`broker.app.create_app`) lives on `app.state`; routes
reach it only through the typed dependencies here, never by reading `app.state`.
The ones that only read `app.state` are `async def` on purpose: FastAPI runs a
plain `def` dependency in the thread pool, and three thread hops per request
for three attribute reads cost more than the work of most routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated
from weakref import WeakKeyDictionary

import anyio
from anyio.lowlevel import RunVar
from fastapi import Depends, Request
from fastapi.concurrency import contextmanager_in_threadpool
from sqlalchemy import Engine
from sqlmodel import Session

from broker.auth.tokens import TokenVerifier
from broker.core.config import Settings
from broker.core.db import connection_slot, unit_of_work
from broker.core.ratelimit import RateLimiter
from broker.credentials.service import Delivery
from broker.integrations.service import Outbound
from broker.payments.platform import StripeAccess
from broker.tenants.deletions import DeletionWatch
from broker.vault.gateway import VaultGateway


async def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    """The database engine."""
    engine: Engine = request.app.state.engine
    return engine


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One unit of work per request: commit on success, roll back on error.

    The request first waits for a free connection on the event loop
    (`connection_slot`), then opens the session in a worker thread.
    """
    engine: Engine = request.app.state.engine
    async with (
        connection_slot(engine),
        contextmanager_in_threadpool(unit_of_work(engine)) as session,
    ):
        yield session


async def get_vault(request: Request) -> VaultGateway:
    """The Vault gateway."""
    vault: VaultGateway = request.app.state.vault
    return vault


async def get_vault_threads(request: Request) -> anyio.CapacityLimiter:
    """Worker threads for Vault-only work, apart from the shared ones database work can fill."""
    return vault_threads_of(request)


def vault_threads_of(request: Request) -> anyio.CapacityLimiter:
    """`get_vault_threads`, for code that has the request (one limiter per app and loop)."""
    vault: VaultGateway = request.app.state.vault
    try:
        limiters = _VAULT_THREADS.get()
    except LookupError:
        limiters = WeakKeyDictionary()
        _VAULT_THREADS.set(limiters)
    if vault not in limiters:
        limiters[vault] = anyio.CapacityLimiter(request.app.state.settings.vault_threads)
    return limiters[vault]


_VAULT_THREADS: RunVar[WeakKeyDictionary[VaultGateway, anyio.CapacityLimiter]] = RunVar(
    "broker_vault_threads"
)


async def get_deletions(request: Request) -> DeletionWatch:
    """The tenants this process knows are being deleted."""
    deletions: DeletionWatch = request.app.state.deletions
    return deletions


async def get_outbound(request: Request) -> Outbound:
    """The SSRF-guarded client and the provider endpoints, for connection tests."""
    return outbound_of(request)


async def get_stripe(request: Request) -> StripeAccess:
    """The platform's Stripe account."""
    return stripe_of(request)


async def get_limiter(request: Request) -> RateLimiter:
    """The named rate limits."""
    return limiter_of(request)


async def get_verifier(request: Request) -> TokenVerifier:
    """The bearer-token verifier."""
    return verifier_of(request)


# The same, typed, for code that has the request but is not a route: `require(...)`
# itself, and helpers of the console's pages; and for the credential fetch, the
# busiest route, where each dependency FastAPI resolves costs measurably.


def outbound_of(request: Request) -> Outbound:
    outbound: Outbound = request.app.state.outbound
    return outbound


def stripe_of(request: Request) -> StripeAccess:
    stripe: StripeAccess = request.app.state.stripe
    return stripe


def limiter_of(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


def verifier_of(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


def delivery_of(request: Request) -> Delivery:
    delivery: Delivery = request.app.state.delivery
    return delivery


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
# scope="function": the commit happens before the response is sent, so a failed
# commit becomes an error response instead of a 2xx for work that was lost.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
VaultDep = Annotated[VaultGateway, Depends(get_vault)]
VaultThreadsDep = Annotated[anyio.CapacityLimiter, Depends(get_vault_threads)]
DeletionsDep = Annotated[DeletionWatch, Depends(get_deletions)]
OutboundDep = Annotated[Outbound, Depends(get_outbound)]
StripeDep = Annotated[StripeAccess, Depends(get_stripe)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]
VerifierDep = Annotated[TokenVerifier, Depends(get_verifier)]
