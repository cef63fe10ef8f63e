"""Tenant settings routes: read with an ETag, merge-patch with If-Match."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Response

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core import db
from broker.core.http import problem_responses
from broker.deps import EngineDep, OutboundDep
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
async def read_settings(engine: EngineDep, principal: SettingsReader) -> Response:
    """The caller's tenant settings. Never contains a credential."""
    read = partial(service.read_document, tenant_id=own_tenant(principal))
    tag, body = await db.read(engine, read)
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    return Response(body, media_type="application/json", headers=headers)


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
async def patch_settings(
    body: SettingsPatch,
    engine: EngineDep,
    principal: SettingsWriter,
    outbound: OutboundDep,
    if_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Merge-patch one or more settings groups (RFC 7396); `null` resets to defaults."""
    tag, document = await service.patch_document(
        engine,
        principal=principal,
        tenant_id=own_tenant(principal),
        patch=body.model_dump(exclude_unset=True),
        if_match=if_match,
        # The guarded client's policy also judges the URLs stored in settings.
        egress=outbound.client,
    )
    return Response(document, media_type="application/json", headers={"ETag": tag})
