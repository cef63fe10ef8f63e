"""The access report: who read the shop's credentials, when, from where, allowed or not.

The same report, service and scope as the API's `GET /v1/tenants/settings/access-report`
(tenant admins only), for the signed-in tenant. Producing it is audited either way.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response

from broker.audit import access
from broker.audit.routes import TenantAdmin
from broker.auth.dependencies import own_tenant
from broker.console.access import Visitor, page
from broker.console.rendering import ConsoleRoute, render
from broker.core.config import Settings
from broker.core.errors import ValidationFailed
from broker.deps import EngineDep
from broker.integrations.providers import PROVIDERS

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

PageAdmin = Annotated[Visitor, page(TenantAdmin)]
# A page shows the latest reads; the CSV carries them all.
SHOWN = 500
ProviderFilter = Annotated[str | None, Query(max_length=32)]


async def _report(
    request: Request, engine: EngineDep, visitor: Visitor, provider: str | None, fmt: str
) -> access.AccessReport:
    if provider is not None and provider not in PROVIDERS:
        raise ValidationFailed(f"provider: one of {', '.join(PROVIDERS)}")
    settings: Settings = request.app.state.settings
    tenant_id = own_tenant(visitor.principal)
    report = await run_in_threadpool(
        access.build, engine, access.log_paths(settings), tenant_id=tenant_id, provider=provider
    )
    await run_in_threadpool(
        access.record_reading,
        engine,
        visitor.principal,
        tenant_id=tenant_id,
        returned=len(report.rows),
        fmt=fmt,
    )
    return report


@router.get("/access", name="console_access")
async def access_report(
    request: Request, engine: EngineDep, visitor: PageAdmin, provider: ProviderFilter = None
) -> Response:
    """Each read of each provider's credentials, newest first."""
    report = await _report(request, engine, visitor, provider or None, "html")
    newest = list(reversed(report.rows))
    return render(
        request,
        "access/index.html",
        visitor=visitor,
        rows=newest[:SHOWN],
        total=len(newest),
        truncated=len(newest) > SHOWN,
        vault_log_read=report.vault_log_read,
        provider=provider or "",
        providers=[(name, spec.title) for name, spec in PROVIDERS.items()],
    )


@router.get("/access.csv", name="console_access_csv")
async def access_csv(
    request: Request, engine: EngineDep, visitor: PageAdmin, provider: ProviderFilter = None
) -> Response:
    """The whole report as CSV (cells a spreadsheet would run are quoted)."""
    report = await _report(request, engine, visitor, provider or None, "csv")
    return PlainTextResponse(
        access.render_csv(report.rows),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="access-report.csv"'},
    )
