"""Integrations pages: status and hints, paste-and-test, OAuth connect, versions, disconnect.

Secrets are write-only here as in the API: a form takes them, the page shows the masked
hints the service returns, and a secret is never put back into a form, not even after
a failed test.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.auth.dependencies import own_tenant
from broker.console.access import Visitor, form, page
from broker.console.rendering import ConsoleRoute, ago, render, see_other
from broker.console.security import Policy, origin_of
from broker.core.config import Settings
from broker.core.errors import PreconditionFailed, ValidationFailed
from broker.deps import EngineDep, VaultDep, outbound_of
from broker.integrations import oauth, service
from broker.integrations.providers import PROVIDERS, ConnectionResult, ProviderSpec, get_provider
from broker.integrations.routes import Manager, Viewer, Writer
from broker.integrations.schemas import ConnectRequest, IntegrationView, TestResult, VersionView
from broker.vault.gateway import VaultGateway

router = APIRouter(
    prefix="/console/integrations", route_class=ConsoleRoute, include_in_schema=False
)

PageViewer = Annotated[Visitor, page(Viewer)]
FormWriter = Annotated[Visitor, form(Writer)]
VersionNumber = Annotated[int, Path(ge=1, le=1_000_000)]

OUTCOMES = {
    "connected": "Connected. The broker now keeps the access token fresh by itself.",
    "refused": "The provider did not confirm the connection. Try connecting again.",
    "failed": "The connection could not be completed. Try again in a moment.",
}
_REASON = re.compile(r"[a-z_]{1,40}")
_SAMPLE = "console-csp-sample"


def _outbound(request: Request) -> service.Outbound:
    return outbound_of(request)


def consent_origins(request: Request) -> tuple[str, ...]:
    """Where the connect forms' redirects lead: each OAuth provider's consent page.

    Shopify's lives on the shop's own host, so the policy names `https://*.myshopify.com`.
    """
    found = []
    endpoints = _outbound(request).endpoints
    for spec in PROVIDERS.values():
        if spec.oauth is None or spec.oauth.flow != "redirect":
            continue
        url = spec.oauth.authorize_url(endpoints, f"{_SAMPLE}.myshopify.com")
        found.append(origin_of(url).replace(_SAMPLE, "*"))
    return tuple(found)


def health(view: IntegrationView) -> tuple[str, str]:
    """A one-word state and its explanation, from the scheduled health checks' verdict and
    the last test (a save's, a requested one, or a scheduled check's own)."""
    if not view.configured:
        return "not-connected", "Not connected"
    if view.needs_reconnect or view.health == "needs_reconnect":
        return "attention", "Needs reconnecting: the provider no longer accepts the grant"
    if view.sync_pending:
        return "pending", "A change is being confirmed with the vault"
    if view.health == "failing":
        # Flipped only after a retry also failed: the provider really refuses them now.
        return "attention", f"Failing its health checks: {view.health_reason or 'no reason given'}"
    if view.last_test is None:
        return "unknown", "Not tested yet" if not view.connection_test_skipped else "Saved untested"
    if not view.last_test.ok:
        return "attention", f"Last test failed: {view.last_test.reason}"
    return "ok", "Working (last test passed)"


def age_note(view: IntegrationView) -> tuple[str, str] | None:
    """What the credential's age asks of the shop owner, if anything (rotate, reconnect)."""
    if view.age == "due" and view.rotation_due_at is not None:
        return "attention", f"Due for rotation {ago(view.rotation_due_at)}: paste a new key"
    if view.age == "overdue":
        return "attention", f"Overdue for rotation since {ago(view.rotation_due_at)}"
    if view.age == "expiring":
        return "attention", f"Expires {ago(view.token_expires_at)}: reconnect before then"
    if view.age == "expired":
        return "attention", f"Expired {ago(view.token_expires_at)}: reconnect"
    return None


def _views(engine: Engine, vault: Any, settings: Settings, tenant_id: str) -> list[IntegrationView]:
    rows = service.list_integrations(engine, vault, tenant_id=tenant_id)
    return [IntegrationView.of(spec, row, settings=settings) for spec, row in rows]


@router.get("", name="console_integrations")
def integrations(
    request: Request, engine: EngineDep, vault: VaultDep, visitor: PageViewer
) -> Response:
    """Every provider: health, hints, version, age and expiry."""
    views = _views(engine, vault, request.app.state.settings, own_tenant(visitor.principal))
    outcome = request.query_params.get("outcome")
    reason = request.query_params.get("reason") or ""
    return render(
        request,
        "integrations/index.html",
        visitor=visitor,
        views=[(view, health(view), age_note(view)) for view in views],
        outcome=OUTCOMES.get(outcome or ""),
        outcome_ok=outcome == "connected",
        reason=reason if _REASON.fullmatch(reason) else "",
    )


@router.get("/{provider}", name="console_integration")
def integration(
    provider: str, request: Request, engine: EngineDep, vault: VaultDep, visitor: PageViewer
) -> Response:
    """One provider: its state and hints, and (for managers) its forms and versions."""
    return _provider_page(request, engine, vault, visitor, get_provider(provider))


def _provider_page(
    request: Request,
    engine: Engine,
    vault: Any,
    visitor: Visitor,
    spec: ProviderSpec,
    *,
    status: int = 200,
    test: TestResult | None = None,
    error: str | None = None,
    field_errors: dict[str, str] | None = None,
    identifiers: dict[str, str] | None = None,
) -> Response:
    tenant_id = own_tenant(visitor.principal)
    settings: Settings = request.app.state.settings
    view = next(v for v in _views(engine, vault, settings, tenant_id) if v.provider == spec.name)
    may_manage = visitor.may(Manager)
    kept: list[VersionView] = []
    if may_manage and view.version:
        found = service.versions(vault, tenant_id=tenant_id, provider=spec.name)
        kept = sorted((VersionView.model_validate(v) for v in found), key=lambda v: -v.version)
    connect = spec.oauth is not None and spec.oauth.flow == "redirect"
    return render(
        request,
        "integrations/provider.html",
        visitor=visitor,
        status=status,
        policy=Policy(form_targets=consent_origins(request)) if connect else Policy(),
        spec=spec,
        view=view,
        state=health(view),
        age=age_note(view),
        may_manage=may_manage,
        may_write=visitor.may(Writer),
        connect=connect,
        # Paste-and-test for key-based providers; OAuth ones connect instead.
        paste=not connect and spec.oauth is None,
        versions=kept,
        test=test,
        error=error,
        field_errors=field_errors or {},
        # Non-secret identifiers (a store URL) prefill the form; secrets never do.
        identifiers=identifiers or view.identifiers,
        saved=request.query_params.get("done"),
    )


@router.post("/{provider}/credentials", name="console_integration_credentials")
async def paste_credentials(
    provider: str, request: Request, engine: EngineDep, vault: VaultDep, visitor: FormWriter
) -> Response:
    """Test pasted credentials, or test and save them (the service tests before storing)."""
    spec = get_provider(provider)
    posted = await request.form()
    fields = {
        f.name: value
        for f in spec.fields
        if isinstance(value := posted.get(f"field.{f.name}"), str) and value.strip()
    }
    # Non-secret values may be shown again; secrets never are.
    identifiers = {f.name: fields[f.name] for f in spec.fields if not f.secret and f.name in fields}
    pasted = _Pasted(engine, vault, _outbound(request), visitor, spec, fields)
    try:
        if posted.get("action") == "test":
            result = TestResult.of(await run_in_threadpool(pasted.test))
            return await run_in_threadpool(
                lambda: _provider_page(
                    request, engine, vault, visitor, spec, test=result, identifiers=identifiers
                )
            )
        await run_in_threadpool(pasted.save, str(posted.get("version") or ""))
    except ValidationFailed as invalid:
        test, error, errors = _explain_refusal(invalid)
        return await run_in_threadpool(
            lambda: _provider_page(
                request,
                engine,
                vault,
                visitor,
                spec,
                status=422,
                test=test,
                error=error,
                field_errors=errors,
                identifiers=identifiers,
            )
        )
    except PreconditionFailed:
        message = "These credentials were changed by someone else meanwhile. Reload and retry."
        return await run_in_threadpool(
            lambda: _provider_page(request, engine, vault, visitor, spec, status=412, error=message)
        )
    return see_other(f"/console/integrations/{spec.name}?done=saved")


class _Pasted:
    """Credentials pasted into a provider's form, tested or saved through the API's service."""

    def __init__(
        self,
        engine: Engine,
        vault: VaultGateway,
        outbound: service.Outbound,
        visitor: Visitor,
        spec: ProviderSpec,
        fields: dict[str, str],
    ) -> None:
        self.engine, self.vault, self.outbound = engine, vault, outbound
        self.principal = visitor.principal
        self.tenant_id = own_tenant(visitor.principal)
        self.provider = spec.name
        self.fields = fields

    def test(self) -> ConnectionResult:
        """The live connection test, nothing stored."""
        return service.run_connection_test(
            self.engine,
            self.vault,
            self.outbound,
            principal=self.principal,
            tenant_id=self.tenant_id,
            provider=self.provider,
            fields=self.fields,
        )

    def save(self, version: str) -> None:
        """Test, then store (against the version the form was showing, when it sent one)."""
        service.save_credentials(
            self.engine,
            self.vault,
            self.outbound,
            principal=self.principal,
            tenant_id=self.tenant_id,
            provider=self.provider,
            fields=self.fields,
            if_match=service.etag_of(int(version)) if version.isdigit() else None,
            skip_connection_test=False,
        )


def _explain_refusal(
    invalid: ValidationFailed,
) -> tuple[TestResult | None, str | None, dict[str, str]]:
    """A refused save or test as the page shows it: the failed connection test (or else
    the message), and each field's problem by its name in the form."""
    failed = invalid.extra.get("connection_test")
    test = None
    if isinstance(failed, dict):
        test = TestResult(ok=False, code=failed["code"], reason=failed["reason"])
    errors = {
        str(e.get("field", "")).removeprefix("fields."): str(e.get("message", ""))
        for e in invalid.extra.get("errors") or []
    }
    return test, None if test else invalid.message, errors


@router.post("/{provider}/connect", name="console_integration_connect")
async def connect(provider: str, request: Request, visitor: FormWriter) -> Response:
    """Start the provider's consent: a single-use state, then off to the provider."""
    spec = get_provider(provider)
    posted = await request.form()
    try:
        body = ConnectRequest(shop=str(posted.get("shop") or "").strip().lower())
    except ValidationError:
        raise ValidationFailed("the shop must be a domain like example.myshopify.com") from None
    access: oauth.OAuthAccess = request.app.state.oauth
    found = await run_in_threadpool(
        lambda: oauth.start_connect(
            access,
            principal=visitor.principal,
            tenant_id=own_tenant(visitor.principal),
            provider=spec.name,
            account=body.shop,
            return_url=_return_url(access),
        )
    )
    return see_other(found.url)


def _return_url(access: oauth.OAuthAccess) -> str | None:
    """The platform's allowed return URL that is this console's integrations page, if any."""
    for url in access.return_urls:
        if url.rstrip("/").endswith("/console/integrations"):
            return url
    return None


@router.post("/{provider}/versions/{version}/restore", name="console_integration_restore")
async def restore(
    provider: str,
    version: VersionNumber,
    request: Request,
    engine: EngineDep,
    vault: VaultDep,
    visitor: FormWriter,
) -> Response:
    """Make an earlier version current again (tested first, like a save)."""
    spec = get_provider(provider)
    if_match = await _if_match(request)
    outbound = _outbound(request)
    await run_in_threadpool(
        lambda: service.restore_version(
            engine,
            vault,
            outbound,
            principal=visitor.principal,
            tenant_id=own_tenant(visitor.principal),
            provider=spec.name,
            version=version,
            if_match=if_match,
        )
    )
    return see_other(f"/console/integrations/{spec.name}?done=restored")


@router.post("/{provider}/disconnect", name="console_integration_disconnect")
async def disconnect(
    provider: str, request: Request, engine: EngineDep, vault: VaultDep, visitor: FormWriter
) -> Response:
    """Remove the current credentials; earlier versions stay restorable."""
    spec = get_provider(provider)
    if_match = await _if_match(request)
    await run_in_threadpool(
        lambda: service.delete_credentials(
            engine,
            vault,
            principal=visitor.principal,
            tenant_id=own_tenant(visitor.principal),
            provider=spec.name,
            if_match=if_match,
        )
    )
    return see_other(f"/console/integrations/{spec.name}?done=disconnected")


async def _if_match(request: Request) -> str | None:
    """The version the page showed: a change made meanwhile by someone else is refused."""
    version = str((await request.form()).get("version") or "")
    return service.etag_of(int(version)) if version.isdigit() else None
