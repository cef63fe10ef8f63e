"""Settings pages: one form per settings group, saved through the API's own service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.auth.dependencies import own_tenant
from broker.console import forms
from broker.console.access import Visitor, form, page
from broker.console.rendering import ConsoleRoute, render, see_other
from broker.core.errors import NotFound, PreconditionFailed, ValidationFailed
from broker.deps import SessionDep, outbound_of
from broker.integrations.egress import EgressClient
from broker.settings import service
from broker.settings.routes import SettingsReader, SettingsWriter
from broker.settings.schemas import READ_ONLY_GROUPS, SETTINGS_GROUPS, group_model

router = APIRouter(prefix="/console/settings", route_class=ConsoleRoute, include_in_schema=False)

Reader = Annotated[Visitor, page(SettingsReader)]
Writer = Annotated[Visitor, form(SettingsWriter)]

EDITABLE = [name for name in SETTINGS_GROUPS if name not in READ_ONLY_GROUPS]


def _group(name: str) -> str:
    if name not in EDITABLE:
        raise NotFound("no such settings group")
    return name


@router.get("", name="console_settings")
def settings_index(request: Request, session: SessionDep, visitor: Reader) -> Response:
    """The settings groups, with who changed them last."""
    row = service.get_settings(session, tenant_id=own_tenant(visitor.principal))
    groups = [(name, forms.label_of(name)) for name in EDITABLE]
    return render(request, "settings/index.html", visitor=visitor, groups=groups, row=row)


@router.get("/{group}", name="console_settings_group")
def settings_group(group: str, request: Request, session: SessionDep, visitor: Reader) -> Response:
    """One group's form, filled with the stored values and the version it was read at."""
    name = _group(group)
    row = service.get_settings(session, tenant_id=own_tenant(visitor.principal))
    value = getattr(row, name) or {}
    return _form_page(
        request,
        visitor,
        name,
        value,
        version=row.version,
        saved=request.query_params.get("saved") == "1",
    )


@router.post("/{group}", name="console_settings_save")
async def save_group(
    group: str, request: Request, session: SessionDep, visitor: Writer
) -> Response:
    """Save one group as a merge patch, with If-Match: the version the form was read at."""
    name = _group(group)
    posted = await request.form()
    parsed = forms.parse(group_model(name), posted)
    version = str(posted.get("version") or "")
    if parsed.errors:
        return _form_page(request, visitor, name, parsed.value, version, errors=parsed.errors)
    egress = outbound_of(request).client
    try:
        await run_in_threadpool(_patch, session, visitor, name, parsed.value, version, egress)
    except ValidationFailed as invalid:
        session.rollback()
        errors = forms.field_errors(name, invalid.extra.get("errors"))
        errors = errors or {"": invalid.message}
        return _form_page(request, visitor, name, parsed.value, version, errors=errors)
    except PreconditionFailed:
        session.rollback()
        return _form_page(request, visitor, name, parsed.value, version, conflict=True)
    return see_other(f"/console/settings/{name}?saved=1")


def _patch(
    session: Session,
    visitor: Visitor,
    name: str,
    value: dict[str, Any],
    version: str,
    egress: EgressClient,
) -> None:
    service.patch_settings(
        session,
        principal=visitor.principal,
        tenant_id=own_tenant(visitor.principal),
        patch={name: value},
        # The version this form was read at: a save over someone else's change is refused.
        if_match=f'"{version}"' if version.isdigit() else '"0"',
        egress=egress,
    )


def _form_page(
    request: Request,
    visitor: Visitor,
    name: str,
    value: dict[str, Any],
    version: Any,
    *,
    errors: dict[str, str] | None = None,
    conflict: bool = False,
    saved: bool = False,
) -> Response:
    status = 412 if conflict else 422 if errors else 200
    return render(
        request,
        "settings/group.html",
        visitor=visitor,
        status=status,
        group=name,
        title=forms.label_of(name),
        controls=forms.controls(group_model(name), value),
        version=version,
        errors=errors or {},
        conflict=conflict,
        saved=saved,
        may_edit=visitor.may(SettingsWriter),
    )
