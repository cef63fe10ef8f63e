"""Events over HTTP: the change feed services follow, and webhook endpoints.

Tenant admins manage their own tenant's endpoints under `/v1/webhooks`; the
platform manages endpoints that receive every tenant's events under
`/v1/platform/webhooks`. Both share one set of handlers (`_endpoint_routes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.core.identifiers import TENANT_ID_PATTERN
from broker.deps import EngineDep, SessionDep, SettingsDep, VaultDep
from broker.events import feed, outbox, webhooks
from broker.events.delivery import webhook_egress
from broker.events.schemas import (
    DeliveryView,
    EndpointCreate,
    EndpointCreated,
    EndpointView,
    EventPage,
    EventView,
)

router = APIRouter(prefix="/v1/events", tags=["events"])
tenant_router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
platform_router = APIRouter(prefix="/v1/platform/webhooks", tags=["webhooks"])

Reader = Annotated[
    Principal,
    require(
        Scope.CREDENTIALS_READ,
        Scope.TENANT_ADMIN,
        Scope.INTEGRATIONS_VIEW,
        Scope.AUDIT_READ,
        Scope.PLATFORM_ADMIN,
    ),
]
NOT_FOUND = "No such endpoint or delivery (another owner's are not found either)"


def _watch(request: Request) -> feed.FeedWatch:
    state = request.app.state
    watch: feed.FeedWatch | None = getattr(state, "feed_watch", None)
    if watch is None:
        watch = state.feed_watch = feed.FeedWatch(
            state.engine, poll_s=state.settings.events_feed_poll_s
        )
    return watch


@router.get("", response_model=EventPage, responses=problem_responses({403: "Tenant not served"}))
async def follow_events(
    request: Request,
    settings: SettingsDep,
    principal: Reader,
    after: Annotated[
        str | None,
        Query(max_length=40, description="The cursor of the last page; omit to start now."),
    ] = None,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Seconds to wait for a first event (long-poll).")
    ] = 0,
    tenant: Annotated[str | None, Query(max_length=63, pattern=TENANT_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventPage:
    """Events after `after` in the caller's tenants, oldest first; waits up to `wait` s."""
    events, cursor = await feed.follow(
        _watch(request),
        after=None if after is None else outbox.Cursor.parse(after),
        scope=feed.reader_scope(principal, tenant),
        wait_s=min(wait, settings.events_feed_max_wait_s),
        limit=limit,
    )
    return EventPage(events=[EventView.of(e) for e in events], cursor=str(cursor))


# -- webhook endpoints ---------------------------------------------------------------------

EndpointId = Annotated[str, Path(max_length=40, pattern=r"^ep_[0-9a-f]{32}$")]


def owner_dependency(scope: Scope, owner_of: Callable[[Principal], str | None], **kw: Any) -> Any:
    """A dependency that authorises the caller (`scope`) and names whose endpoints it acts on."""

    def owner(principal: Principal = require(scope, **kw)) -> webhooks.Owner:
        return webhooks.Owner(principal, owner_of(principal))

    return Depends(owner)


def _endpoint_routes(
    target: APIRouter, scope: Scope, owner_of: Callable[[Principal], str | None]
) -> None:
    """Register the endpoint routes on `target`, for the owner `owner_of` names.

    Reads need `scope`; changes need it too, rate-limited as writes.
    """
    reader = owner_dependency(scope, owner_of)
    writer = owner_dependency(scope, owner_of, limit="write")
    _register_route(target, writer)
    _read_routes(target, reader)
    _change_routes(target, writer)
    _replay_route(target, writer)


def _register_route(target: APIRouter, writer: Any) -> None:
    @target.post(
        "", status_code=201, response_model=EndpointCreated, responses=problem_responses({})
    )
    def register_endpoint(
        body: EndpointCreate,
        engine: EngineDep,
        vault: VaultDep,
        settings: SettingsDep,
        owner: webhooks.Owner = writer,
    ) -> EndpointCreated:
        """Register a receiver; the answer carries its signing secret, this once."""
        client = webhook_egress(settings)
        try:
            made = webhooks.register(
                engine,
                vault,
                client,
                principal=owner.principal,
                tenant_id=owner.tenant_id,
                url=body.url,
                event_types=body.event_types,
                description=body.description,
            )
        finally:
            client.close()
        return EndpointCreated(**EndpointView.of(made.endpoint).model_dump(), secret=made.secret)


def _read_routes(target: APIRouter, reader: Any) -> None:
    @target.get("", response_model=list[EndpointView])
    def list_endpoints(session: SessionDep, owner: webhooks.Owner = reader) -> list[EndpointView]:
        """The owner's endpoints."""
        rows = webhooks.list_endpoints(session, tenant_id=owner.tenant_id)
        return [EndpointView.of(row) for row in rows]

    @target.get(
        "/{endpoint_id}", response_model=EndpointView, responses=problem_responses({404: NOT_FOUND})
    )
    def get_endpoint(
        endpoint_id: EndpointId, session: SessionDep, owner: webhooks.Owner = reader
    ) -> EndpointView:
        """One endpoint."""
        row = webhooks.get_endpoint(session, tenant_id=owner.tenant_id, endpoint_id=endpoint_id)
        return EndpointView.of(row)

    @target.get(
        "/{endpoint_id}/deliveries",
        response_model=list[DeliveryView],
        responses=problem_responses({404: NOT_FOUND}),
    )
    def list_deliveries(
        endpoint_id: EndpointId,
        session: SessionDep,
        owner: webhooks.Owner = reader,
        status: Literal["pending", "delivered", "failed"] | None = None,
        before: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[DeliveryView]:
        """The endpoint's deliveries, newest first."""
        rows = webhooks.list_deliveries(
            session,
            tenant_id=owner.tenant_id,
            endpoint_id=endpoint_id,
            status=status,
            before=before,
            limit=limit,
        )
        return [DeliveryView.of(row) for row in rows]


def _change_routes(target: APIRouter, writer: Any) -> None:
    @target.delete(
        "/{endpoint_id}",
        status_code=204,
        response_class=Response,
        responses=problem_responses({404: NOT_FOUND}),
    )
    def delete_endpoint(
        endpoint_id: EndpointId, engine: EngineDep, vault: VaultDep, owner: webhooks.Owner = writer
    ) -> Response:
        """Remove an endpoint, its deliveries and its signing secret."""
        webhooks.delete_endpoint(
            engine,
            vault,
            principal=owner.principal,
            tenant_id=owner.tenant_id,
            endpoint_id=endpoint_id,
        )
        return Response(status_code=204)

    @target.post(
        "/{endpoint_id}/enable",
        response_model=EndpointView,
        responses=problem_responses({404: NOT_FOUND}),
    )
    def enable_endpoint(
        endpoint_id: EndpointId, engine: EngineDep, owner: webhooks.Owner = writer
    ) -> EndpointView:
        """Turn a disabled endpoint back on."""
        row = webhooks.enable_endpoint(
            engine, principal=owner.principal, tenant_id=owner.tenant_id, endpoint_id=endpoint_id
        )
        return EndpointView.of(row)


def _replay_route(target: APIRouter, writer: Any) -> None:
    @target.post(
        "/{endpoint_id}/deliveries/{delivery_id}/replay",
        response_model=DeliveryView,
        status_code=202,
        responses=problem_responses({404: NOT_FOUND, 422: "The endpoint is disabled"}),
    )
    def replay_delivery(
        endpoint_id: EndpointId,
        delivery_id: Annotated[int, Path(ge=1)],
        engine: EngineDep,
        owner: webhooks.Owner = writer,
    ) -> DeliveryView:
        """Send a delivery again, now, with the same webhook-id."""
        row = webhooks.replay(
            engine,
            principal=owner.principal,
            tenant_id=owner.tenant_id,
            endpoint_id=endpoint_id,
            delivery_id=delivery_id,
        )
        return DeliveryView.of(row)


_endpoint_routes(tenant_router, Scope.TENANT_ADMIN, own_tenant)
_endpoint_routes(platform_router, Scope.PLATFORM_ADMIN, lambda _: None)
