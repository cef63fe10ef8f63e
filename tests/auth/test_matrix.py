"""The authorization matrix: every route, every kind of caller.

`ROUTES` lists every non-public route with the scopes that must pass and a
scope that must not. `test_every_route_declares_scopes_and_is_in_the_matrix`
fails as soon as someone adds a route without `require(...)` or without a row
here, so the matrix cannot silently fall behind the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import ROUTERS
from broker.auth.dependencies import declared_scopes
from broker.health.routes import PUBLIC_PATHS
from broker.integrations.routes import UNAUTHENTICATED_PATHS
from tests.fakes.providers import VALID
from tests.fakes.stripe import FakeStripe
from tests.support.tenants import make_tenant, new_tenant_id
from tests.support.tokens import bearer, token

# The OAuth callback carries no bearer token: Shopify's signature and the single-use
# state are its proof (tests/integrations/test_oauth.py attacks it).
PUBLIC = (
    PUBLIC_PATHS
    | UNAUTHENTICATED_PATHS
    | {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


@dataclass(frozen=True)
class Case:
    """One route and who may call it."""

    method: str
    path: str  # "{tenant}" is replaced by the caller's tenant
    allowed: tuple[tuple[str, ...], ...]
    insufficient: tuple[str, ...]
    body: Callable[[], Any] | None = None
    tenant_bound: bool = True
    kind: str = "user"
    extra_claims: dict[str, Any] = field(default_factory=dict)
    # Runs before an allowed call; may return path substitutions, e.g. {"{pm}": "pm_123"}.
    setup: Callable[[TestClient, str], dict[str, str] | None] | None = None
    # An answer past authorization that still proves the caller got through: the fake
    # Graph here issues no signup code (the success is in test_oauth_meta.py).
    passed: tuple[int, ...] = ()


OPENAI = "/v1/tenants/settings/integrations/openai"
INTEGRATION = "/v1/tenants/settings/integrations/{provider}"


def _openai_body() -> dict[str, Any]:
    return {"fields": dict(VALID["openai"]), "skip_connection_test": True}


def _configure_openai(client: TestClient, tenant_id: str) -> None:
    response = client.put(
        OPENAI, json=_openai_body(), headers=bearer(token("tenant:admin", tenant_id=tenant_id))
    )
    assert response.status_code == 200, response.text


STRIPE: list[FakeStripe] = []
PAYMENT_METHODS = "/v1/tenants/settings/payment-methods"
PAYOUT_BODY = {"method": "paypal", "details": {"email": "owner@example.com"}}


@pytest.fixture(autouse=True)
def _stripe_handle(stripe_server: FakeStripe) -> Iterator[None]:
    STRIPE.append(stripe_server)
    yield
    STRIPE.clear()


def _new_card() -> dict[str, str]:
    return {"payment_method_id": STRIPE[0].add_card()}


def _card_on_file(client: TestClient, tenant_id: str) -> dict[str, str]:
    body = _new_card()
    response = client.post(
        PAYMENT_METHODS, json=body, headers=bearer(token("tenant:admin", tenant_id=tenant_id))
    )
    assert response.status_code == 201, response.text
    return {"{pm}": body["payment_method_id"]}


def _payout_on_file(client: TestClient, tenant_id: str) -> None:
    response = client.put(
        "/v1/tenants/settings/payout",
        json=PAYOUT_BODY,
        headers=bearer(token("tenant:admin", tenant_id=tenant_id)),
    )
    assert response.status_code == 200, response.text


ENDPOINT = "ep_" + "0" * 32
DELIVERY = "999999999"
HOOK_BODY = {"url": "http://127.0.0.1:9/hook", "event_types": ["webhook.endpoint_disabled"]}


def _endpoint_of(client: TestClient, tenant_id: str, *, platform: bool) -> dict[str, str]:
    """An endpoint (and one delivery to it) for the webhook routes."""
    from broker.core.db import unit_of_work
    from broker.events import outbox

    headers = bearer(
        token("platform:admin", subject="ops")
        if platform
        else token("tenant:admin", tenant_id=tenant_id)
    )
    prefix = "/v1/platform/webhooks" if platform else "/v1/webhooks"
    response = client.post(prefix, json=HOOK_BODY, headers=headers)
    assert response.status_code == 201, response.text
    endpoint = response.json()["id"]
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with unit_of_work(engine) as session:
        outbox.emit(session, outbox.ENDPOINT_DISABLED, actor="user:matrix", tenant_id=tenant_id)
    with engine.connect() as conn:
        delivery = conn.execute(
            text("SELECT max(id) FROM webhook_deliveries WHERE endpoint_id = :e"), {"e": endpoint}
        ).scalar_one()
    return {ENDPOINT: endpoint, DELIVERY: str(delivery)}


def _tenant_endpoint(client: TestClient, tenant_id: str) -> dict[str, str]:
    return _endpoint_of(client, tenant_id, platform=False)


def _platform_endpoint(client: TestClient, tenant_id: str) -> dict[str, str]:
    return _endpoint_of(client, tenant_id, platform=True)


def _webhook_cases(prefix: str, platform: bool) -> dict[tuple[str, str], Case]:
    allowed = (("platform:admin",),) if platform else (("tenant:admin",),)
    insufficient = ("tenant:admin",) if platform else ("integrations:manage",)
    setup = _platform_endpoint if platform else _tenant_endpoint
    one = f"{prefix}/{ENDPOINT}"
    rows = [
        ("POST", prefix, prefix, None, lambda: HOOK_BODY),
        ("GET", prefix, prefix, None, None),
        ("GET", prefix + "/{endpoint_id}", one, setup, None),
        ("DELETE", prefix + "/{endpoint_id}", one, setup, None),
        ("POST", prefix + "/{endpoint_id}/enable", one + "/enable", setup, None),
        ("GET", prefix + "/{endpoint_id}/deliveries", one + "/deliveries", setup, None),
        (
            "POST",
            prefix + "/{endpoint_id}/deliveries/{delivery_id}/replay",
            f"{one}/deliveries/{DELIVERY}/replay",
            setup,
            None,
        ),
    ]
    return {
        (method, route): Case(
            method,
            path,
            allowed=allowed,
            insufficient=insufficient,
            tenant_bound=not platform,
            setup=case_setup,
            body=body,
        )
        for method, route, path, case_setup, body in rows
    }


ROUTES: dict[tuple[str, str], Case] = {
    ("POST", "/v1/tenants"): Case(
        "POST",
        "/v1/tenants",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        body=lambda: {"id": new_tenant_id("m"), "name": "Matrix"},
        tenant_bound=False,
    ),
    ("GET", "/v1/tenants"): Case(
        "GET",
        "/v1/tenants",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("GET", "/v1/tenants/{tenant_id}"): Case(
        "GET",
        "/v1/tenants/{tenant}",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("GET", "/v1/tenants/settings"): Case(
        "GET",
        "/v1/tenants/settings",
        allowed=(("integrations:view",), ("integrations:manage",), ("tenant:admin",)),
        insufficient=("finance:manage",),
    ),
    ("PATCH", "/v1/tenants/settings"): Case(
        "PATCH",
        "/v1/tenants/settings",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=lambda: {"feature_flags": {"ai_responses_enabled": False}},
    ),
    ("DELETE", "/v1/tenants/{tenant_id}"): Case(
        "DELETE",
        "/v1/tenants/{tenant}",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("POST", "/v1/tenants/{tenant_id}/keys/rotate"): Case(
        "POST",
        "/v1/tenants/{tenant}/keys/rotate",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("GET", "/v1/credentials/{tenant_id}/{provider}"): Case(
        "GET",
        "/v1/credentials/{tenant}/openai",
        allowed=(("credentials:read",),),
        insufficient=("integrations:manage",),
        tenant_bound=False,
        kind="service",
        setup=_configure_openai,
    ),
    ("GET", "/v1/audit/events"): Case(
        "GET",
        "/v1/audit/events",
        allowed=(("audit:read",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("GET", PAYMENT_METHODS): Case(
        "GET",
        PAYMENT_METHODS,
        allowed=(("finance:view",), ("finance:manage",), ("tenant:admin",)),
        insufficient=("integrations:manage",),
    ),
    ("POST", PAYMENT_METHODS + "/setup-intent"): Case(
        "POST",
        PAYMENT_METHODS + "/setup-intent",
        allowed=(("finance:manage",), ("tenant:admin",)),
        insufficient=("finance:view",),
    ),
    ("POST", PAYMENT_METHODS): Case(
        "POST",
        PAYMENT_METHODS,
        allowed=(("finance:manage",), ("tenant:admin",)),
        insufficient=("finance:view",),
        body=_new_card,
    ),
    ("POST", PAYMENT_METHODS + "/{method_id}/default"): Case(
        "POST",
        PAYMENT_METHODS + "/{pm}/default",
        allowed=(("finance:manage",), ("tenant:admin",)),
        insufficient=("finance:view",),
        setup=_card_on_file,
    ),
    ("DELETE", PAYMENT_METHODS + "/{method_id}"): Case(
        "DELETE",
        PAYMENT_METHODS + "/{pm}",
        allowed=(("finance:manage",), ("tenant:admin",)),
        insufficient=("finance:view",),
        setup=_card_on_file,
    ),
    ("GET", "/v1/tenants/settings/payout"): Case(
        "GET",
        "/v1/tenants/settings/payout",
        allowed=(("finance:view",), ("finance:manage",), ("tenant:admin",)),
        insufficient=("integrations:manage",),
        setup=_payout_on_file,
    ),
    ("PUT", "/v1/tenants/settings/payout"): Case(
        "PUT",
        "/v1/tenants/settings/payout",
        allowed=(("finance:manage",), ("tenant:admin",)),
        insufficient=("finance:view",),
        body=lambda: PAYOUT_BODY,
    ),
    ("GET", "/v1/tenants/settings/integrations"): Case(
        "GET",
        "/v1/tenants/settings/integrations",
        allowed=(("integrations:view",), ("integrations:manage",), ("tenant:admin",)),
        insufficient=("finance:manage",),
    ),
    ("PUT", INTEGRATION): Case(
        "PUT",
        OPENAI,
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=_openai_body,
    ),
    ("POST", INTEGRATION + "/test"): Case(
        "POST",
        OPENAI + "/test",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=lambda: {"fields": dict(VALID["openai"])},
    ),
    ("DELETE", INTEGRATION): Case(
        "DELETE",
        OPENAI,
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        setup=_configure_openai,
    ),
    ("GET", INTEGRATION + "/versions"): Case(
        "GET",
        OPENAI + "/versions",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
    ),
    ("POST", INTEGRATION + "/connect"): Case(
        "POST",
        "/v1/tenants/settings/integrations/shopify/connect",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=lambda: {"shop": "matrix-shop.myshopify.com"},
    ),
    ("POST", INTEGRATION + "/embedded-signup"): Case(
        "POST",
        "/v1/tenants/settings/integrations/whatsapp/embedded-signup",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        passed=(422,),
        body=lambda: {
            "code": "AQmatrix",
            "waba_id": "100000000000001",
            "phone_number_id": "100000000000002",
            "business_id": "100000000000003",
        },
    ),
    ("POST", INTEGRATION + "/migrate-expiring"): Case(
        "POST",
        "/v1/tenants/settings/integrations/shopify/migrate-expiring",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
    ),
    ("PUT", INTEGRATION + "/delivery"): Case(
        "PUT",
        OPENAI + "/delivery",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=lambda: {"mode": "static"},
        setup=_configure_openai,
    ),
    ("GET", "/v1/tenants/settings/leases"): Case(
        "GET",
        "/v1/tenants/settings/leases",
        allowed=(("integrations:view",), ("integrations:manage",), ("tenant:admin",)),
        insufficient=("finance:manage",),
    ),
    ("POST", "/v1/tenants/settings/leases/revoke"): Case(
        "POST",
        "/v1/tenants/settings/leases/revoke",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        body=lambda: {},
    ),
    ("GET", "/v1/leases"): Case(
        "GET",
        "/v1/leases",
        allowed=(("audit:read",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("POST", "/v1/leases/revoke"): Case(
        "POST",
        "/v1/leases/revoke",
        allowed=(("leases:revoke",), ("platform:admin",)),
        insufficient=("tenant:admin",),
        body=lambda: {"subject": "matrix-service"},
        tenant_bound=False,
    ),
    ("POST", INTEGRATION + "/versions/{version}/restore"): Case(
        "POST",
        OPENAI + "/versions/1/restore",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        setup=_configure_openai,
    ),
    ("GET", INTEGRATION + "/health"): Case(
        "GET",
        OPENAI + "/health",
        allowed=(("integrations:view",), ("integrations:manage",), ("tenant:admin",)),
        insufficient=("finance:manage",),
        setup=_configure_openai,
    ),
    ("POST", INTEGRATION + "/health/check"): Case(
        "POST",
        OPENAI + "/health/check",
        allowed=(("integrations:manage",), ("tenant:admin",)),
        insufficient=("integrations:view",),
        setup=_configure_openai,
    ),
    ("GET", "/v1/tenants/settings/access-report"): Case(
        "GET",
        "/v1/tenants/settings/access-report",
        allowed=(("tenant:admin",),),
        insufficient=("integrations:manage",),
    ),
    ("GET", "/v1/platform/credentials/report"): Case(
        "GET",
        "/v1/platform/credentials/report",
        allowed=(("platform:admin",),),
        insufficient=("tenant:admin",),
        tenant_bound=False,
    ),
    ("GET", "/v1/events"): Case(
        "GET",
        "/v1/events",
        allowed=(("tenant:admin",), ("integrations:view",)),
        insufficient=("finance:view",),
    ),
    **_webhook_cases("/v1/webhooks", platform=False),
    **_webhook_cases("/v1/platform/webhooks", platform=True),
}


def _methods(route: APIRoute) -> set[str]:
    """The route's methods (FastAPI fills them in for every API route)."""
    return route.methods or set()


def _api_routes(app: Any) -> list[APIRoute]:
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    # Cross-check with the OpenAPI document, so a router left out of ROUTERS is caught.
    listed = {(m, r.path_format) for r in routes for m in _methods(r)}
    served = {
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        for method in ops
        if path not in PUBLIC
    }
    assert served <= listed, f"routes served but not in broker.app.ROUTERS: {served - listed}"
    return [r for r in routes if r.path_format not in PUBLIC]


def _requires(route: APIRoute) -> tuple[str, ...] | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        scopes = declared_scopes(dep.call)
        if scopes:
            return scopes
        stack.extend(dep.dependencies)
    return None


def test_every_route_declares_scopes_and_is_in_the_matrix(app: Any) -> None:
    missing_scopes, missing_rows = [], []
    for route in _api_routes(app):
        for method in _methods(route):
            if _requires(route) is None:
                missing_scopes.append(f"{method} {route.path_format}")
            if (method, route.path_format) not in ROUTES:
                missing_rows.append(f"{method} {route.path_format}")
    assert not missing_scopes, f"routes without require(...): {missing_scopes}"
    assert not missing_rows, f"routes missing from the authorization matrix: {missing_rows}"


def test_matrix_rows_name_real_routes(app: Any) -> None:
    real = {(m, r.path_format) for r in _api_routes(app) for m in _methods(r)}
    assert set(ROUTES) <= real, f"stale matrix rows: {set(ROUTES) - real}"


def test_declared_scopes_match_the_matrix(app: Any) -> None:
    for route in _api_routes(app):
        for method in _methods(route):
            declared = set(_requires(route) or ())
            case = ROUTES[(method, route.path_format)]
            for scopes in case.allowed:
                assert declared & set(scopes) or "tenant:admin" in scopes, (method, route.path)


CASES = sorted(ROUTES.values(), key=lambda c: (c.path, c.method))
IDS = [f"{c.method} {c.path}" for c in CASES]


def _call(
    client: TestClient,
    case: Case,
    tenant_id: str,
    headers: dict[str, str],
    substitutions: dict[str, str] | None = None,
) -> Any:
    path = case.path.replace("{tenant}", tenant_id)
    for placeholder, value in (substitutions or {"{pm}": "pm_notonfile"}).items():
        path = path.replace(placeholder, value)
    body = case.body() if case.body else None
    return client.request(case.method, path, json=body, headers=headers)


def _token(case: Case, scopes: tuple[str, ...], tenant_id: str, **kwargs: Any) -> str:
    if case.kind == "service":
        return token(*scopes, kind="service", tenants=(tenant_id,), subject="worker", **kwargs)
    return token(*scopes, tenant_id=tenant_id if case.tenant_bound else None, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_owner_with_each_allowed_scope_gets_through(
    client: TestClient, tenant: str, case: Case
) -> None:
    for scopes in case.allowed:
        substitutions = case.setup(client, tenant) if case.setup else None
        response = _call(client, case, tenant, bearer(_token(case, scopes, tenant)), substitutions)
        assert response.status_code < 400 or response.status_code in case.passed, (
            scopes,
            response.text,
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_missing_scope_is_forbidden(client: TestClient, tenant: str, case: Case) -> None:
    response = _call(client, case, tenant, bearer(_token(case, case.insufficient, tenant)))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_anonymous_is_unauthenticated(client: TestClient, tenant: str, case: Case) -> None:
    response = _call(client, case, tenant, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


BAD_TOKENS: dict[str, Callable[[Case, tuple[str, ...], str], str]] = {
    "expired": lambda c, s, t: _token(c, s, t, ttl_s=-3600),
    "not yet valid": lambda c, s, t: _token(c, s, t, not_before_s=3600, ttl_s=7200),
    "wrong audience": lambda c, s, t: _token(c, s, t, audience="another-service"),
    "wrong issuer": lambda c, s, t: _token(c, s, t, issuer="https://evil.example"),
    "bad signature": lambda c, s, t: _token(
        c, s, t, key="not-the-signing-key-but-long-enough-for-hs256"
    ),
    "truncated": lambda c, s, t: _token(c, s, t)[:-8],
    "not a jwt": lambda c, s, t: "definitely-not-a-jwt",
}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("flaw", sorted(BAD_TOKENS))
def test_bad_tokens_are_unauthenticated(
    client: TestClient, tenant: str, case: Case, flaw: str
) -> None:
    bad = BAD_TOKENS[flaw](case, case.allowed[0], tenant)
    response = _call(client, case, tenant, bearer(bad))
    assert response.status_code == 401, response.text
    assert bad not in response.text


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_scope_is_denied_even_beside_a_good_one(
    client: TestClient, tenant: str, case: Case
) -> None:
    scopes = (*case.allowed[0], "superuser:everything")
    response = _call(client, case, tenant, bearer(_token(case, scopes, tenant)))
    assert response.status_code == 403


@pytest.mark.parametrize("case", [c for c in CASES if c.tenant_bound], ids=lambda c: c.path)
def test_foreign_tenant_never_sees_another_tenants_data(client: TestClient, case: Case) -> None:
    victim, intruder = make_tenant(client), make_tenant(client)
    marker = f"Victim {new_tenant_id('x')}"
    admin = bearer(token("tenant:admin", tenant_id=victim))
    assert (
        client.patch(
            "/v1/tenants/settings", json={"branding": {"business_name": marker}}, headers=admin
        ).status_code
        == 200
    )
    response = _call(client, case, victim, bearer(_token(case, case.allowed[0], intruder)))
    assert marker not in response.text
    # The intruder acted on its own tenant, never the victim's.
    after = client.get("/v1/tenants/settings", headers=admin).json()
    assert after["branding"]["business_name"] == marker
    assert after["feature_flags"]["ai_responses_enabled"] is True


def test_a_token_for_a_missing_tenant_gets_404(client: TestClient) -> None:
    ghost = bearer(token("tenant:admin", tenant_id=new_tenant_id("ghost")))
    assert client.get("/v1/tenants/settings", headers=ghost).status_code == 404


def test_denied_requests_are_in_the_audit_trail(
    client: TestClient, engine: Engine, tenant: str
) -> None:
    forbidden = client.get(
        "/v1/tenants/settings", headers=bearer(token("finance:view", tenant_id=tenant))
    )
    anonymous = client.patch("/v1/tenants/settings", json={})
    with engine.connect() as conn:
        rows = {
            row.request_id: row
            for row in conn.execute(
                text(
                    "SELECT request_id, actor, tenant_id, outcome, action, client_addr"
                    " FROM audit_events WHERE request_id IN (:a, :b)"
                ),
                {
                    "a": forbidden.headers["x-request-id"],
                    "b": anonymous.headers["x-request-id"],
                },
            )
        }
    denied = rows[forbidden.headers["x-request-id"]]
    assert (denied.actor, denied.tenant_id, denied.outcome) == ("user:alice", tenant, "denied")
    assert denied.action == "GET /v1/tenants/settings"
    assert denied.client_addr
    anon = rows[anonymous.headers["x-request-id"]]
    assert (anon.actor, anon.outcome) == ("anonymous", "denied")
