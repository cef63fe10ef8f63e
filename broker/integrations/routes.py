"""Integration credential routes: set, test, list, delete, versions, restore, OAuth connect."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import RedirectResponse

from broker.audit import trail
from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core import context
from broker.core.config import Settings
from broker.core.errors import RateLimited
from broker.core.http import problem_responses
from broker.deps import EngineDep, LimiterDep, OutboundDep, SettingsDep, VaultDep
from broker.integrations import oauth, service
from broker.integrations.providers import get_provider
from broker.integrations.schemas import (
    ConnectRequest,
    ConnectView,
    CredentialsTest,
    CredentialsWrite,
    EmbeddedSignupRequest,
    IntegrationView,
    MigrationView,
    ProviderName,
    TestResult,
    VersionView,
)
from broker.leases import service as leases
from broker.models import IntegrationCredential
from broker.tenants import service as tenants
from broker.vault.errors import StoredDataUnverified

router = APIRouter(prefix="/v1/tenants/settings/integrations", tags=["integrations"])
# The provider sends the admin's browser here: no bearer token, the signed query is the proof.
callback_router = APIRouter(prefix="/v1/oauth/callback", tags=["integrations"])
UNAUTHENTICATED_PATHS = frozenset({"/v1/oauth/callback/{provider}"})
"""Routes without `require(...)`: their proof is the provider's signature and the state."""

Viewer = Annotated[
    Principal, require(Scope.INTEGRATIONS_VIEW, Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN)
]
Manager = Annotated[Principal, require(Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN)]
# Writes and connection tests also count against the `write` rate limit.
Writer = Annotated[Principal, require(Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN, limit="write")]
IfMatch = Annotated[str | None, Header(max_length=100)]

NO_TENANT = "The token's tenant does not exist"
NOT_FOUND = "No such provider, nothing stored, or the token's tenant does not exist"
CHANGED = "Changed concurrently; reload and retry"
STALE = "If-Match did not match the current ETag"


@router.get("", response_model=list[IntegrationView], responses=problem_responses({404: NO_TENANT}))
def list_integrations(
    engine: EngineDep, vault: VaultDep, settings: SettingsDep, principal: Viewer
) -> list[IntegrationView]:
    """Every provider: configured or not, masked hints, version, last test, health and age."""
    rows = service.list_integrations(engine, vault, tenant_id=own_tenant(principal))
    return [IntegrationView.of(spec, row, settings=settings) for spec, row in rows]


@router.put(
    "/{provider}",
    response_model=IntegrationView,
    responses=problem_responses({404: NOT_FOUND, 409: CHANGED, 412: STALE}),
)
def save_credentials(
    provider: ProviderName,
    body: CredentialsWrite,
    request: Request,
    outbound: OutboundDep,
    response: Response,
    engine: EngineDep,
    vault: VaultDep,
    settings: SettingsDep,
    principal: Writer,
    if_match: IfMatch = None,
) -> IntegrationView:
    """Validate, live-test and store credentials; the response carries masked hints only."""
    row = service.save_credentials(
        engine,
        vault,
        outbound,
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        fields=body.plain_fields(),
        if_match=if_match,
        skip_connection_test=body.skip_connection_test,
    )
    return _new_root(request, response, settings, provider, row)


@router.post(
    "/{provider}/test", response_model=TestResult, responses=problem_responses({404: NOT_FOUND})
)
def check_credentials(
    provider: ProviderName,
    outbound: OutboundDep,
    engine: EngineDep,
    vault: VaultDep,
    principal: Writer,
    body: CredentialsTest | None = None,
) -> TestResult:
    """Test the credentials in the body, or the stored ones; the result is recorded."""
    with _unverified_recorded(engine, principal, "integration.test", provider):
        result = service.run_connection_test(
            engine,
            vault,
            outbound,
            principal=principal,
            tenant_id=own_tenant(principal),
            provider=provider,
            fields=body.plain_fields() if body else None,
        )
    return TestResult.of(result)


def _new_root(
    request: Request,
    response: Response,
    settings: Settings,
    provider: str,
    row: IntegrationCredential,
) -> IntegrationView:
    """The answer to a save or restore: the new version's view, its ETag set.

    Keys minted from the replaced root are revoked by the sweep, with the old version.
    """
    leases.retire_for_root(
        request.app.state.leasing, tenant_id=row.tenant_id, provider=provider, reason="root_rotated"
    )
    response.headers["ETag"] = service.etag(row)
    return IntegrationView.of(get_provider(provider), row, settings=settings)


@contextlib.contextmanager
def _unverified_recorded(
    engine: EngineDep, principal: Principal, action: str, provider: str
) -> Iterator[None]:
    """Stored data that does not verify is tampering: the 409 is recorded in the trail."""
    try:
        yield
    except StoredDataUnverified:
        tenant_id = own_tenant(principal)
        trail.record_separately(
            engine,
            action=action,
            resource=f"tenants/{tenant_id}/integrations/{provider}",
            outcome="failed",
            principal=principal,
            tenant_id=tenant_id,
            detail={"reason": "unverified"},
        )
        raise


@router.delete(
    "/{provider}",
    status_code=204,
    response_class=Response,
    responses=problem_responses({404: NOT_FOUND, 409: CHANGED, 412: STALE}),
)
def delete_credentials(
    provider: ProviderName,
    request: Request,
    engine: EngineDep,
    vault: VaultDep,
    principal: Writer,
    if_match: IfMatch = None,
) -> Response:
    """Remove the credentials; earlier versions stay restorable.

    Dynamic keys minted from them are revoked first (nothing could revoke them after).
    """
    leases.revoke_before_removal(
        request.app.state.leasing,
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        reason="root_deleted",
    )
    service.delete_credentials(
        engine,
        vault,
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        if_match=if_match,
    )
    return Response(status_code=204)


@router.get(
    "/{provider}/versions",
    response_model=list[VersionView],
    responses=problem_responses({404: NOT_FOUND}),
)
def list_versions(
    provider: ProviderName, engine: EngineDep, vault: VaultDep, principal: Manager
) -> list[VersionView]:
    """The kept KV versions of a provider's credentials."""
    # Vault alone cannot tell a missing tenant from one without versions.
    tenants.require_live(engine, tenant_id=own_tenant(principal))
    found = service.versions(vault, tenant_id=own_tenant(principal), provider=provider)
    return [VersionView.model_validate(v) for v in found]


@router.post(
    "/{provider}/versions/{version}/restore",
    response_model=IntegrationView,
    responses=problem_responses({404: NOT_FOUND, 409: CHANGED, 412: STALE}),
)
def restore_version(
    provider: ProviderName,
    version: Annotated[int, Path(ge=1, le=1_000_000)],
    response: Response,
    engine: EngineDep,
    vault: VaultDep,
    settings: SettingsDep,
    principal: Writer,
    request: Request,
    outbound: OutboundDep,
    if_match: IfMatch = None,
) -> IntegrationView:
    """Make an earlier version current again."""
    with _unverified_recorded(engine, principal, "integration.restore", provider):
        row = service.restore_version(
            engine,
            vault,
            outbound,
            principal=principal,
            tenant_id=own_tenant(principal),
            provider=provider,
            version=version,
            if_match=if_match,
        )
    return _new_root(request, response, settings, provider, row)


@router.post(
    "/{provider}/migrate-expiring",
    response_model=MigrationView,
    responses=problem_responses(
        {
            404: "No such provider, none with a token exchange, or no tenant",
            409: CHANGED,
            412: "The credentials changed while they were migrated; retry",
            422: "The provider refused to exchange the stored token: connect instead",
            503: "The provider or Vault did not answer; retrying is safe",
        }
    ),
)
def migrate_to_expiring(
    provider: ProviderName,
    request: Request,
    principal: Writer,
    dry_run: Annotated[bool, Query(description="Only say what would happen.")] = False,
) -> MigrationView:
    """Exchange the pasted long-lived token for an expiring, refreshed one (irreversible)."""
    done = oauth.migrate_to_expiring(
        _oauth(request),
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        dry_run=dry_run,
    )
    return MigrationView(outcome=done.outcome, version=done.version)


def _oauth(request: Request) -> oauth.OAuthAccess:
    access: oauth.OAuthAccess = request.app.state.oauth
    return access


@router.post(
    "/{provider}/connect",
    response_model=ConnectView,
    responses=problem_responses(
        {404: "No such provider, none with OAuth, or no tenant", 503: "OAuth is not configured"}
    ),
)
def start_connect(
    provider: ProviderName, body: ConnectRequest, request: Request, principal: Writer
) -> ConnectView:
    """The provider's consent URL for one account; its single-use state lasts 10 minutes."""
    found = oauth.start_connect(
        _oauth(request),
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        account=body.shop,
        return_url=body.return_url,
    )
    return ConnectView(authorization_url=found.url, expires_at=found.expires_at)


@router.post(
    "/{provider}/embedded-signup",
    response_model=IntegrationView,
    responses=problem_responses(
        {
            404: "No such provider, none with an embedded signup, or no tenant",
            422: "The provider refused the code (used or expired): run the signup again",
            503: "The provider or Vault did not answer, or the Meta app is not configured",
        }
    ),
)
def embedded_signup(
    provider: ProviderName,
    body: EmbeddedSignupRequest,
    request: Request,
    settings: SettingsDep,
    principal: Writer,
) -> IntegrationView:
    """Exchange Embedded Signup's code for the business token and store it sealed."""
    row = oauth.connect_embedded_signup(
        _oauth(request),
        principal=principal,
        tenant_id=own_tenant(principal),
        provider=provider,
        signup=body.signup(),
    )
    return IntegrationView.of(get_provider(provider), row, settings=settings)


@callback_router.get(
    "/{provider}",
    response_class=RedirectResponse,
    status_code=303,
    responses={
        303: {"description": "To the platform's return URL, with `outcome` (and `reason`)"},
        **problem_responses(
            {
                404: "No such provider, or none that connects through OAuth",
                429: "Too many refused callbacks from this address; retry after Retry-After",
            }
        ),
    },
)
def finish_connect(
    provider: ProviderName, request: Request, limiter: LimiterDep
) -> RedirectResponse:
    """Verify the provider's signed callback, store the tokens, redirect to the platform."""
    # A refused callback is a failed authentication: past the address's limit, forged
    # callbacks get a 429 before any work (or audit row) is spent on them.
    ctx = context.current()
    key = f"addr:{ctx.client_addr if ctx else None}"
    if limiter.exceeded("auth_failures", key):
        wait = limiter.retry_after("auth_failures", key)
        raise RateLimited("too many refused callbacks; retry later", retry_after=wait)
    done = oauth.finish_connect(
        _oauth(request), provider=provider, query=request.query_params.multi_items()
    )
    if done.refused:
        with contextlib.suppress(RateLimited):
            limiter.hit("auth_failures", key)
    response = RedirectResponse(done.location, status_code=303)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
