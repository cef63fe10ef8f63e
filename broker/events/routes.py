"""Events over HTTP: the change feed services follow, and webhook endpoints.

Tenant admins manage their own tenant's endpoints under `/v1/webhooks`; the
platform manages endpoints that receive every tenant's events under
`/v1/platform/webhooks`. Both share one set of handlers (`_endpoint_routes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.errors import Forbidden
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


def feed_scope(principal: Principal, tenant: str | None) -> outbox.Scope:
    """The tenants a reader may follow: all (platform, security), those a service serves,
    or a tenant user's own; narrowed to `tenant` when given."""
    if principal.has(Scope.PLATFORM_ADMIN) or principal.has(Scope.AUDIT_READ):
        return outbox.Scope(None if tenant is None else frozenset({tenant}))
    if principal.kind == "service" and principal.has(Scope.CREDENTIALS_READ):
        served = principal.tenants
    elif principal.tenant_id is not None:
        served = frozenset({principal.tenant_id})
    else:
        raise Forbidden("this token names no tenant")
    if tenant is not None:
        if tenant not in served:
            raise Forbidden("this token does not serve that tenant")
        served = frozenset({tenant})
    return outbox.Scope(served)


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
    engine: EngineDep,
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
    scope = feed_scope(principal, tenant)
    if after is None:
        return EventPage(events=[], cursor=str(await run_in_threadpool(feed.start, engine)))
    events, cursor = await feed.wait_for_events(
        _watch(request),
        after=outbox.Cursor.parse(after),
        scope=scope,
        wait_s=min(wait, settings.events_feed_max_wait_s),
        limit=limit,
    )
    return EventPage(events=[EventView.of(e) for e in events], cursor=str(cursor))


# -- webhook endpoints ---------------------------------------------------------------------

EndpointId = Annotated[str, Path(max_length=40, pattern=r"^ep_[0-9a-f]{32}$")]


def _endpoint_routes(
    target: APIRouter,
    reader_dep: Any,
    principal_dep: Any,
    owner_of: Callable[[Principal], str | None],
) -> None:
    """Register the endpoint routes on `target`, for the owner `owner_of` names.

    `reader_dep` guards the reads, `principal_dep` the changes (rate-limited as writes).
    """

    @target.post(
        "", status_code=201, response_model=EndpointCreated, responses=problem_responses({})
    )
    def register_endpoint(
        body: EndpointCreate,
        engine: EngineDep,
        vault: VaultDep,
        settings: SettingsDep,
        principal: Principal = principal_dep,
    ) -> EndpointCreated:
        """Register a receiver; the answer carries its signing secret, this once."""
        client = webhook_egress(settings)
        try:
            made = webhooks.register(
                engine,
                vault,
                client,
                principal=principal,
                tenant_id=owner_of(principal),
                url=body.url,
                event_types=body.event_types,
                description=body.description,
            )
        finally:
            client.close()
        return EndpointCreated(**EndpointView.of(made.endpoint).model_dump(), secret=made.secret)

    @target.get("", response_model=list[EndpointView])
    def list_endpoints(
        session: SessionDep, principal: Principal = reader_dep
    ) -> list[EndpointView]:
        """The owner's endpoints."""
        rows = webhooks.list_endpoints(session, tenant_id=owner_of(principal))
        return [EndpointView.of(row) for row in rows]

    @target.get(
        "/{endpoint_id}", response_model=EndpointView, responses=problem_responses({404: NOT_FOUND})
    )
    def get_endpoint(
        endpoint_id: EndpointId, session: SessionDep, principal: Principal = reader_dep
    ) -> EndpointView:
        """One endpoint."""
        row = webhooks.get_endpoint(session, tenant_id=owner_of(principal), endpoint_id=endpoint_id)
        return EndpointView.of(row)

    @target.delete(
        "/{endpoint_id}",
        status_code=204,
        response_class=Response,
        responses=problem_responses({404: NOT_FOUND}),
    )
    def delete_endpoint(
        endpoint_id: EndpointId,
        engine: EngineDep,
        vault: VaultDep,
        principal: Principal = principal_dep,
    ) -> Response:
        """Remove an endpoint, its deliveries and its signing secret."""
        webhooks.delete_endpoint(
            engine,
            vault,
            principal=principal,
            tenant_id=owner_of(principal),
            endpoint_id=endpoint_id,
        )
        return Response(status_code=204)

    @target.post(
        "/{endpoint_id}/enable",
        response_model=EndpointView,
        responses=problem_responses({404: NOT_FOUND}),
    )
    def enable_endpoint(
        endpoint_id: EndpointId, engine: EngineDep, principal: Principal = principal_dep
    ) -> EndpointView:
        """Turn a disabled endpoint back on."""
        row = webhooks.enable_endpoint(
            engine, principal=principal, tenant_id=owner_of(principal), endpoint_id=endpoint_id
        )
        return EndpointView.of(row)

    @target.get(
        "/{endpoint_id}/deliveries",
        response_model=list[DeliveryView],
        responses=problem_responses({404: NOT_FOUND}),
    )
    def list_deliveries(
        endpoint_id: EndpointId,
        session: SessionDep,
        principal: Principal = reader_dep,
        status: Literal["pending", "delivered", "failed"] | None = None,
        before: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[DeliveryView]:
        """The endpoint's deliveries, newest first."""
        rows = webhooks.list_deliveries(
            session,
            tenant_id=owner_of(principal),
            endpoint_id=endpoint_id,
            status=status,
            before=before,
            limit=limit,
        )
        return [DeliveryView.of(row) for row in rows]

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
        principal: Principal = principal_dep,
    ) -> DeliveryView:
        """Send a delivery again, now, with the same webhook-id."""
        row = webhooks.replay(
            engine,
            principal=principal,
            tenant_id=owner_of(principal),
            endpoint_id=endpoint_id,
            delivery_id=delivery_id,
        )
        return DeliveryView.of(row)


_endpoint_routes(
    tenant_router,
    require(Scope.TENANT_ADMIN),
    require(Scope.TENANT_ADMIN, limit="write"),
    own_tenant,
)
_endpoint_routes(
    platform_router,
    require(Scope.PLATFORM_ADMIN),
    require(Scope.PLATFORM_ADMIN, limit="write"),
    lambda _: None,
)
