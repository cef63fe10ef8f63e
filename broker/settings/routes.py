"""Tenant settings routes: read with an ETag, merge-patch with If-Match."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.deps import OutboundDep, SessionDep
from broker.settings import service
from broker.settings.schemas import SettingsPatch, SettingsView

router = APIRouter(prefix="/v1/tenants/settings", tags=["settings"])

SettingsReader = Annotated[
    Principal, require(Scope.INTEGRATIONS_VIEW, Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN)
]
SettingsWriter = Annotated[
    Principal, require(Scope.INTEGRATIONS_MANAGE, Scope.TENANT_ADMIN, limit="write")
]


@router.get(
    "",
    response_model=SettingsView,
    responses=problem_responses({404: "The token's tenant does not exist"}),
)
def read_settings(
    session: SessionDep, principal: SettingsReader, response: Response
) -> SettingsView:
    """The caller's tenant settings. Never contains a credential."""
    row = service.get_settings(session, tenant_id=own_tenant(principal))
    response.headers["ETag"] = service.etag(row)
    response.headers["Cache-Control"] = "private, no-cache"
    return service.to_view(row)


@router.patch(
    "",
    response_model=SettingsView,
    responses=problem_responses(
        {
            404: "The token's tenant does not exist",
            412: "If-Match did not match the current ETag",
        }
    ),
)
def patch_settings(
    body: SettingsPatch,
    session: SessionDep,
    principal: SettingsWriter,
    outbound: OutboundDep,
    response: Response,
    if_match: Annotated[str | None, Header(max_length=200)] = None,
) -> SettingsView:
    """Merge-patch one or more settings groups (RFC 7396); `null` resets to defaults."""
    row = service.patch_settings(
        session,
        principal=principal,
        tenant_id=own_tenant(principal),
        patch=body.model_dump(exclude_unset=True),
        if_match=if_match,
        # The guarded client's policy also judges the URLs stored in settings.
        egress=outbound.client,
    )
    response.headers["ETag"] = service.etag(row)
    return service.to_view(row)
