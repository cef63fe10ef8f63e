"""What schemathesis found, each as a regular test that runs without the fuzzer.

Four kinds of finding:
- undocumented answers: a status code or a content type the OpenAPI document
  did not list, so a client generated from it could not read the error;
- server errors: input PostgreSQL cannot store (NUL characters, values longer
  than a column) reached the database and came back as a 500;
- audit denials that failed: recording a refused request with such input
  failed, so the caller got a 500 and the trail missed the refusal;
- and one `make bench` found: fetch latency grew with the number of tenants,
  because the in-memory rate limiter never forgot a (principal, tenant) key.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from limits import parse
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.core.ratelimit import LocalWindows
from broker.models import AuditEvent
from tests.support.tenants import make_tenant, new_tenant_id
from tests.support.tokens import bearer, token

PROBLEM = "application/problem+json"
NEVER_A_TENANT = "no-such-tenant-anywhere"


@pytest.fixture(scope="module")
def shop(client: TestClient) -> str:
    """A tenant with nothing configured."""
    return make_tenant(client, new_tenant_id("regress"))


def caller(role: str, tenant: str) -> dict[str, str]:
    """A valid token for each kind of caller the requests below need."""
    jwts = {
        "admin": lambda: token("tenant:admin", tenant_id=tenant),
        "finance": lambda: token("finance:manage", tenant_id=tenant),
        "platform": lambda: token("platform:admin", subject="ops"),
        "auditor": lambda: token("audit:read", subject="security"),
        "service": lambda: token("credentials:read", kind="service", tenants=(tenant,)),
        "nobody": lambda: token(),
    }
    return bearer(jwts[role]())


def send(client: TestClient, method: str, url: str, headers: dict[str, str], body: Any) -> Any:
    """One request; a `bytes` body is sent as is, with a JSON content type."""
    if isinstance(body, bytes):
        headers = {**headers, "Content-Type": "application/json"}
        return client.request(method, url, headers=headers, content=body)
    return client.request(method, url, headers=headers, json=body)


# (method, path template, url, caller, body, status): answers the fuzzer found
# missing from the OpenAPI document, or documented with the wrong content type.
UNDOCUMENTED: list[tuple[str, str, str, str | None, Any, int]] = [
    ("GET", "/v1/tenants", "/v1/tenants?limit=0", "platform", None, 422),
    ("POST", "/v1/tenants", "/v1/tenants", "platform", {"id": "{tenant}", "name": "x"}, 409),
    ("GET", "/v1/tenants/{tenant_id}", f"/v1/tenants/{NEVER_A_TENANT}", "platform", None, 404),
    ("DELETE", "/v1/tenants/{tenant_id}", f"/v1/tenants/{NEVER_A_TENANT}", "platform", None, 404),
    (
        "POST",
        "/v1/tenants/{tenant_id}/keys/rotate",
        f"/v1/tenants/{NEVER_A_TENANT}/keys/rotate",
        "platform",
        None,
        404,
    ),
    ("PATCH", "/v1/tenants/settings", "/v1/tenants/settings", "admin", {}, 422),
    ("PATCH", "/v1/tenants/settings", "/v1/tenants/settings", "admin", b"\xff{", 400),
    ("GET", "/v1/tenants/settings", "/v1/tenants/settings", "nobody", None, 403),
    (
        "PUT",
        "/v1/tenants/settings/integrations/{provider}",
        "/v1/tenants/settings/integrations/nosuch",
        "admin",
        {"fields": {}},
        404,
    ),
    (
        "DELETE",
        "/v1/tenants/settings/integrations/{provider}",
        "/v1/tenants/settings/integrations/nosuch",
        "admin",
        None,
        404,
    ),
    (
        "POST",
        "/v1/tenants/settings/integrations/{provider}/test",
        "/v1/tenants/settings/integrations/nosuch/test",
        "admin",
        None,
        404,
    ),
    (
        "GET",
        "/v1/tenants/settings/integrations/{provider}/versions",
        "/v1/tenants/settings/integrations/nosuch/versions",
        "admin",
        None,
        404,
    ),
    (
        "POST",
        "/v1/tenants/settings/integrations/{provider}/versions/{version}/restore",
        "/v1/tenants/settings/integrations/shopify/versions/7/restore",
        "admin",
        None,
        404,
    ),
    (
        "POST",
        "/v1/tenants/settings/payment-methods",
        "/v1/tenants/settings/payment-methods",
        "finance",
        b"\xffYW",
        400,
    ),
    (
        "POST",
        "/v1/tenants/settings/payment-methods/{method_id}/default",
        "/v1/tenants/settings/payment-methods/pm_nothere/default",
        "finance",
        None,
        404,
    ),
    (
        "DELETE",
        "/v1/tenants/settings/payment-methods/{method_id}",
        "/v1/tenants/settings/payment-methods/pm_nothere",
        "finance",
        None,
        404,
    ),
    ("GET", "/v1/tenants/settings/payout", "/v1/tenants/settings/payout", "finance", None, 404),
    (
        "PUT",
        "/v1/tenants/settings/payout",
        "/v1/tenants/settings/payout",
        "finance",
        {"method": "paypal", "details": {}},
        422,
    ),
    (
        "GET",
        "/v1/credentials/{tenant_id}/{provider}",
        "/v1/credentials/{tenant}/shopify?wrap_ttl=soon",
        "service",
        None,
        422,
    ),
    ("GET", "/v1/audit/events", "/v1/audit/events?limit=0", "auditor", None, 422),
    ("GET", "/v1/audit/events", "/v1/audit/events", None, None, 401),
    ("GET", "/healthz", "/healthz?cvc=123", None, None, 422),
]


@pytest.mark.parametrize(
    ("method", "template", "url", "role", "body", "status"),
    UNDOCUMENTED,
    ids=[f"{m} {u} -> {s}" for m, _, u, _, _, s in UNDOCUMENTED],
)
def test_every_error_answer_is_documented_as_problem_json(
    app: Any,
    client: TestClient,
    shop: str,
    method: str,
    template: str,
    url: str,
    role: str | None,
    body: Any,
    status: int,
) -> None:
    headers = caller(role, shop) if role else {}
    if isinstance(body, dict) and body.get("id") == "{tenant}":
        body = {**body, "id": shop}
    response = send(client, method, url.replace("{tenant}", shop), headers, body)
    assert response.status_code == status, response.text

    documented = app.openapi()["paths"][template][method.lower()]["responses"]
    assert str(status) in documented, sorted(documented)
    content = documented[str(status)].get("content", {})
    assert response.headers["content-type"] == PROBLEM
    assert list(content) == [PROBLEM]
    assert content[PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
    problem = response.json()
    required = app.openapi()["components"]["schemas"]["Problem"]["required"]
    assert set(required) <= set(problem)
    assert problem["status"] == status


def test_the_problem_schema_replaces_fastapis_validation_error(app: Any) -> None:
    document = app.openapi()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answer = operation["responses"]["422"]
            assert list(answer["content"]) == [PROBLEM], f"{method.upper()} {path}"


# Input that reached PostgreSQL and failed there with a 500. Each is refused
# before the database instead: NUL characters cannot be stored in text or JSONB.
NUL_INPUTS = [
    ("GET", "/v1/tenants/a%00b", "platform", None),
    ("DELETE", "/v1/tenants/a%00b", "platform", None),
    ("POST", "/v1/tenants/a%00b/keys/rotate", "platform", None),
    ("GET", "/v1/tenants?after=a%00", "platform", None),
    ("POST", "/v1/tenants", "platform", {"id": "nul-in-name", "name": "Shop\x00"}),
    ("GET", "/v1/audit/events?tenant_id=a%00", "auditor", None),
    ("GET", "/v1/audit/events?actor=user:a%00", "auditor", None),
    ("POST", "/v1/tenants/settings/payment-methods", "finance", {"payment_method_id": "000\x00"}),
    ("DELETE", "/v1/tenants/settings/payment-methods/pm_%00x", "finance", None),
    ("PATCH", "/v1/tenants/settings", "admin", {"branding": {"footer_text": "a\x00b"}}),
    (
        "PATCH",
        "/v1/tenants/settings",
        "admin",
        {"messaging": {"templates": [{"name": "x", "body": "\x00"}]}},
    ),
]


@pytest.mark.parametrize(
    ("method", "url", "role", "body"),
    NUL_INPUTS,
    ids=[f"{m} {u} {b!r}" for m, u, _, b in NUL_INPUTS],
)
def test_a_nul_character_is_refused_as_invalid_input(
    client: TestClient, shop: str, method: str, url: str, role: str, body: Any
) -> None:
    before = client.get("/v1/tenants/settings", headers=caller("admin", shop)).json()
    response = send(client, method, url, caller(role, shop), body)
    assert response.status_code == 422, response.text
    assert "\x00" not in response.text
    after = client.get("/v1/tenants/settings", headers=caller("admin", shop)).json()
    assert after["version"] == before["version"]


def test_a_tenant_named_with_a_nul_is_not_created(client: TestClient) -> None:
    tenant_id = new_tenant_id("nul")
    platform = caller("platform", tenant_id)
    response = client.post("/v1/tenants", json={"id": tenant_id, "name": "a\x00"}, headers=platform)
    assert response.status_code == 422
    assert client.get(f"/v1/tenants/{tenant_id}", headers=platform).status_code == 404


def events(engine: Engine, request_id: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.request_id == request_id)))


def test_a_denied_request_with_a_long_path_is_refused_and_recorded(
    client: TestClient, engine: Engine, shop: str
) -> None:
    path = "/v1/tenants/" + "a" * 400
    response = client.get(path, headers=caller("admin", shop))
    assert response.status_code == 403, response.text
    [event] = events(engine, response.headers["x-request-id"])
    assert event.outcome == "denied"
    # Recorded by its route template: an overlong id is not a validated identifier.
    assert event.resource == "/v1/tenants/{tenant_id}"


def test_a_denied_request_with_a_nul_in_its_path_is_refused_and_recorded(
    client: TestClient, engine: Engine, shop: str
) -> None:
    response = client.get("/v1/tenants/a%00b", headers=caller("admin", shop))
    assert response.status_code == 403, response.text
    [event] = events(engine, response.headers["x-request-id"])
    assert event.outcome == "denied"
    assert event.resource == "/v1/tenants/{tenant_id}"


def test_a_service_asking_for_an_overlong_tenant_gets_the_usual_404(
    client: TestClient, engine: Engine, shop: str
) -> None:
    response = client.get(f"/v1/credentials/{'a' * 100}/shopify", headers=caller("service", shop))
    assert response.status_code == 404, response.text
    [event] = events(engine, response.headers["x-request-id"])
    assert event.outcome == "denied"
    # No tenant id has that shape: the trail keeps only validated identifiers, never raw input.
    assert event.tenant_id is None
    assert event.resource == "tenants/{tenant_id}/integrations/shopify"


# Signed tokens whose claims cannot be stored: every audited write by such a
# caller used to fail at the database with a 500.
@pytest.mark.parametrize(
    "claims",
    [
        {"subject": "s" * 200},
        {"subject": "alice\x00"},
        {"tenant_id": "shop\x00"},
    ],
    ids=["subject too long for the actor column", "NUL in subject", "NUL in tenant"],
)
def test_a_token_whose_claims_cannot_be_stored_is_refused(
    client: TestClient, shop: str, claims: dict[str, str]
) -> None:
    jwt = token("tenant:admin", **{"tenant_id": shop, **claims})  # type: ignore[arg-type]
    response = client.patch(
        "/v1/tenants/settings", json={"branding": {"footer_text": "hi"}}, headers=bearer(jwt)
    )
    assert response.status_code == 401, response.text


def test_the_longest_storable_subject_still_works(client: TestClient, shop: str) -> None:
    jwt = token("credentials:read", kind="service", tenants=(shop,), subject="s" * 192)
    response = client.get(f"/v1/credentials/{shop}/shopify", headers=bearer(jwt))
    assert response.status_code == 404, response.text
    admin = token("tenant:admin", tenant_id=shop, subject="s" * 192)
    response = client.patch(
        "/v1/tenants/settings", json={"branding": {"footer_text": "hi"}}, headers=bearer(admin)
    )
    assert response.status_code == 200, response.text


def test_the_rate_limiter_forgets_keys_whose_window_has_passed() -> None:
    # Keys are per (principal, tenant). The moving window of `limits` kept an
    # empty entry for every key it ever saw and swept them all every 10 ms, so
    # each request got slower as tenants were added (x1.7 at 10,000 tenants).
    now = [1_000_000.0]
    windows = LocalWindows(sweep_every_s=30, clock=lambda: now[0])
    item = parse("1000/second")
    for i in range(500):
        windows.hit(item, "fetch", f"who:service:worker:tenant-{i}")
    now[0] += 60  # past every window, and past the next sweep
    windows.hit(item, "fetch", "addr:127.0.0.1")  # any use may sweep
    assert len(windows) == 1
