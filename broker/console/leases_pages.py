"""Live leases: the keys the broker minted for the shop's services, and revoking them.

The page is the API's lease registry (`GET /v1/tenants/settings/leases`) for the
signed-in tenant, with the same scopes; a revoke button is the API's tenant revocation
(`POST /v1/tenants/settings/leases/revoke`), through the same service and scopes.
Nothing secret is on the page: a lease shows its service, the provider's key id and times.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.auth.dependencies import own_tenant
from broker.console.access import Visitor, form, page
from broker.console.rendering import ConsoleRoute, render, see_other
from broker.deps import SessionDep
from broker.leases import service
from broker.leases.routes import Viewer, Writer
from broker.leases.schemas import LeaseView

router = APIRouter(prefix="/console/leases", route_class=ConsoleRoute, include_in_schema=False)

PageViewer = Annotated[Visitor, page(Viewer)]
FormWriter = Annotated[Visitor, form(Writer)]
LeaseId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
# A page, not an export: a shop holds a handful of live leases per service.
SHOWN = 500

DONE = {
    "revoked": "Revoked. The key no longer works at the provider.",
    "pending": "Marked for revocation. The provider did not answer yet; the broker keeps trying.",
    "none": "Nothing was live to revoke.",
}


def _leasing(request: Request) -> service.Leasing:
    leasing: service.Leasing = request.app.state.leasing
    return leasing


def _live(session: Session, tenant_id: str) -> list[LeaseView]:
    rows = [
        row
        for state in ("active", "minting")
        for row in service.list_leases(session, tenant_id=tenant_id, state=state, limit=SHOWN)
    ]
    return sorted((LeaseView.of(row) for row in rows), key=lambda v: v.expires_at)


@router.get("", name="console_leases")
def leases(request: Request, session: SessionDep, visitor: PageViewer) -> Response:
    """The tenant's live leases: which service holds a key of which provider, until when."""
    live = _live(session, own_tenant(visitor.principal))
    return render(
        request,
        "leases/index.html",
        visitor=visitor,
        leases=live,
        may_revoke=visitor.may(Writer),
        done=DONE.get(request.query_params.get("done") or ""),
    )


@router.post("/{lease_id}/revoke", name="console_lease_revoke")
async def revoke(lease_id: LeaseId, request: Request, visitor: FormWriter) -> Response:
    """Revoke one lease now: its key is deleted at the provider."""
    return await _revoke(request, visitor, lease_id=lease_id)


@router.post("/revoke", name="console_leases_revoke_all")
async def revoke_all(request: Request, visitor: FormWriter) -> Response:
    """Revoke every live lease of the shop (a suspected leak)."""
    return await _revoke(request, visitor, lease_id=None)


async def _revoke(request: Request, visitor: Visitor, *, lease_id: str | None) -> Response:
    tenant_id = own_tenant(visitor.principal)
    result = await run_in_threadpool(
        lambda: service.revoke_matching(
            _leasing(request),
            service.Selector(tenant_id=tenant_id, lease_id=lease_id),
            principal=visitor.principal,
            reason="requested",
        )
    )
    if result.failed or result.queued:
        done = "pending"
    elif result.revoked:
        done = "revoked"
    else:
        done = "none"
    return see_other(f"/console/leases?done={done}")
