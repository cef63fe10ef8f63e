"""Caller input that the HTTP plumbing keeps: request ids, the access log, denials and 422s.

None of it may carry a card number or a secret the caller sent: request ids are validated
or replaced, the access log and the audit trail name route templates, and a 422 gives an
unknown field by its position, never by its name.
"""

from __future__ import annotations

import ast
import logging
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

import broker.core
from broker.models import AuditEvent
from tests.support.apps import VaultEndpoint
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

# Shapes of secrets a caller might paste into a URL, a header or a field name.
TWILIO_TOKEN = secrets.token_hex(16)
STRIPE_KEY = "sk_live_" + secrets.token_hex(12)
VAULT_TOKEN = "hvs." + secrets.token_urlsafe(24)
META_TOKEN = "EAAB" + secrets.token_hex(20)
IBAN = "DE89370400440532013000"
PAN = "4242424242424242"


def trail_rows(engine: Engine, **where: Any) -> list[AuditEvent]:
    with Session(engine) as session:
        query = select(AuditEvent).order_by(col(AuditEvent.id))
        for name, value in where.items():
            query = query.where(getattr(AuditEvent, name) == value)
        return list(session.exec(query))


def trail_text(engine: Engine, request_id: str) -> str:
    return " ".join(
        f"{row.action} {row.resource} {row.request_id} {row.detail}"
        for row in trail_rows(engine, request_id=request_id)
    )


# --- request ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "incoming",
    [STRIPE_KEY, VAULT_TOKEN, "req-" + "9" * 70, "req 42", "4242.4242.4242.4242.x"],
    ids=["stripe-key", "vault-token", "too-long", "space", "card"],
)
def test_a_request_id_that_is_not_a_plain_id_is_replaced(
    client: TestClient, engine: Engine, incoming: str
) -> None:
    response = client.get("/v1/tenants", headers={"X-Request-Id": incoming})

    assert response.status_code in (401, 422)
    replacement = response.headers["x-request-id"]
    assert replacement != incoming
    assert str(uuid.UUID(replacement)) == replacement
    assert incoming not in response.text
    assert trail_rows(engine, request_id=incoming) == []


def test_a_plain_request_id_is_kept_end_to_end(client: TestClient, engine: Engine) -> None:
    request_id = f"req-{uuid.uuid4().hex[:16]}"

    response = client.get("/v1/tenants", headers={"X-Request-Id": request_id})

    assert response.status_code == 401
    assert response.headers["x-request-id"] == request_id
    assert response.json()["request_id"] == request_id
    assert [row.outcome for row in trail_rows(engine, request_id=request_id)] == ["denied"]


# --- the access log --------------------------------------------------------------------


def test_the_access_log_names_route_templates_never_raw_paths_or_queries(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = make_tenant(client)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    caplog.set_level(logging.INFO, logger="broker.access")

    client.get(f"/v1/tenants/{TWILIO_TOKEN}", headers=admin)
    client.get(f"/v1/audit/events?actor={STRIPE_KEY}&tenant_id={tenant}", headers=admin)
    client.get("/v1/tenants?after=4242%204242%204242%204242", headers=admin)
    client.get("/v1/tenants/4242+4242+4242+4242", headers=admin)

    access = [r for r in caplog.records if r.name == "broker.access"]
    assert [r.getMessage() for r in access][-4:] == [
        "GET /v1/tenants/{tenant_id} 403",
        "GET /v1/audit/events 403",
        "GET unmatched 422",
        "GET unmatched 422",
    ]
    logged = " ".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    for secret in (TWILIO_TOKEN, STRIPE_KEY, "4242"):
        assert secret not in logged


def test_the_access_log_names_only_known_methods_and_checked_request_ids(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    # A request id with a credential in it is replaced, and an unknown method is not repeated:
    # both reach the access line unscanned, so they are checked where they are made.
    caplog.set_level(logging.INFO, logger="broker.access")

    client.get("/v1/tenants", headers={"X-Request-Id": STRIPE_KEY})
    client.request(f"X{TWILIO_TOKEN[:12].upper()}", "/v1/tenants")

    access = [r for r in caplog.records if r.name == "broker.access"][-2:]
    assert [r.fields["method"] for r in access] == ["GET", "OTHER"]  # type: ignore[attr-defined]
    logged = " ".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    for secret in (STRIPE_KEY, TWILIO_TOKEN[:12].upper()):
        assert secret not in logged


# --- denials in the audit trail -----------------------------------------------------------


@pytest.mark.parametrize(
    "segment",
    [TWILIO_TOKEN, META_TOKEN, IBAN.lower(), STRIPE_KEY, VAULT_TOKEN],
    ids=["twilio-token", "meta-token", "iban", "stripe-key", "vault-token"],
)
def test_a_denied_request_is_recorded_by_its_template_not_its_raw_path(
    client: TestClient, engine: Engine, segment: str
) -> None:
    tenant = make_tenant(client)
    request_id = f"deny-{uuid.uuid4().hex[:16]}"

    response = client.get(
        f"/v1/tenants/{segment}?note={STRIPE_KEY}",
        headers={**bearer(token("tenant:admin", tenant_id=tenant)), "X-Request-Id": request_id},
    )

    assert response.status_code == 403, response.text
    [event] = trail_rows(engine, request_id=request_id)
    assert event.outcome == "denied"
    assert event.resource == "/v1/tenants/{tenant_id}"
    assert event.action == "GET /v1/tenants/{tenant_id}"
    assert segment not in trail_text(engine, request_id)
    assert STRIPE_KEY not in trail_text(engine, request_id)
    # The audit API serves the trail: it must not hand the raw input back either.
    auditor = bearer(token("audit:read", subject="security"))
    served = client.get(f"/v1/audit/events?tenant_id={tenant}", headers=auditor)
    assert served.status_code == 200
    assert segment not in served.text


@pytest.mark.parametrize(
    "other_id",
    [
        pytest.param(
            lambda: "shop-" + "".join(secrets.choice("abcdefgh") for _ in range(10)),
            id="letters",
        ),
        pytest.param(lambda: f"t-{secrets.randbelow(10**12):012d}", id="digits"),
    ],
)
def test_a_denied_request_names_a_registered_tenant_whatever_its_digits(
    client: TestClient, engine: Engine, other_id: Callable[[], str]
) -> None:
    """The validated tenant id is kept, however much it looks like a generated value."""
    tenant = make_tenant(client)
    other = make_tenant(client, other_id())
    request_id = f"deny-{uuid.uuid4().hex[:16]}"

    response = client.delete(
        f"/v1/tenants/{other}",
        headers={**bearer(token("tenant:admin", tenant_id=tenant)), "X-Request-Id": request_id},
    )

    assert response.status_code == 403, response.text
    [event] = trail_rows(engine, request_id=request_id)
    assert event.resource == f"/v1/tenants/{other}"
    assert event.tenant_id == tenant


# --- 422s never echo a rejected name ---------------------------------------------------


def finance(tenant: str) -> dict[str, str]:
    return bearer(token("finance:manage", tenant_id=tenant, subject="fin"))


def test_an_unknown_body_field_is_given_by_position_with_the_allowed_names(
    client: TestClient,
) -> None:
    tenant = make_tenant(client)

    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": "paypal", "details": {"email": "a@example.com"}, STRIPE_KEY: 1},
        headers=finance(tenant),
    )

    assert response.status_code == 422, response.text
    assert STRIPE_KEY not in response.text
    assert response.json()["errors"] == [
        {"field": "(field 3)", "message": "unknown field; the allowed fields are method, details"}
    ]


def test_an_unknown_payout_detail_is_given_by_position(client: TestClient) -> None:
    tenant = make_tenant(client)

    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": "paypal", "details": {"email": "a@example.com", TWILIO_TOKEN: "x"}},
        headers=finance(tenant),
    )

    assert response.status_code == 422, response.text
    assert TWILIO_TOKEN not in response.text
    assert response.json()["errors"] == [
        {"field": "details.(field 2)", "message": "unknown field; the allowed fields are email"}
    ]


@pytest.mark.parametrize(
    "patch",
    [
        {VAULT_TOKEN: {"dark": True}},
        {"feature_flags": {META_TOKEN: True}},
        {"business_hours": {"monday": {TWILIO_TOKEN: "09:00"}}},
    ],
    ids=["group", "field", "nested-field"],
)
def test_an_unknown_settings_name_is_never_echoed(
    client: TestClient, patch: dict[str, Any]
) -> None:
    tenant = make_tenant(client)

    response = client.patch(
        "/v1/tenants/settings", json=patch, headers=bearer(token("tenant:admin", tenant_id=tenant))
    )

    assert response.status_code == 422, response.text
    for secret in (VAULT_TOKEN, META_TOKEN, TWILIO_TOKEN):
        assert secret not in response.text
    [error] = response.json()["errors"]
    assert "(field 1)" in error["field"]
    assert error["message"].startswith("unknown field; the allowed fields are ")


# --- payout fields are checked after normalisation ------------------------------------------


@pytest.mark.parametrize(
    "details",
    [
        {"account_number": "4242\n4242\n4242\n4242", "bank_code": "021000021"},
        {"account_number": "4242\r\n4242\r\n4242\r\n4242", "bank_code": "021000021"},
        {"account_number": "1234567", "bank_code": "4242\n4242\n4242\n4242"},
        {"account_number": "4242-4242\n4242 4242", "bank_code": "021000021"},
    ],
    ids=["account-lines", "account-crlf", "bank-code", "account-mixed-lines"],
)
def test_a_payout_account_number_that_is_a_card_is_refused(
    client: TestClient, engine: Engine, details: dict[str, str]
) -> None:
    tenant = make_tenant(client)

    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {**details, "account_holder": "Acme Ltd"}},
        headers=finance(tenant),
    )

    assert response.status_code == 422, response.text
    # The card guard refuses a card printed a group a line; the payout validator, which
    # strips every separator, refuses the rest.
    assert (
        "looks like a card number" in response.text
        or response.json()["title"] == "Raw card data is not accepted"
    )
    assert "4242" not in response.text
    viewer = bearer(token("finance:view", tenant_id=tenant, subject="fin"))
    assert client.get("/v1/tenants/settings/payout", headers=viewer).status_code == 404


def test_a_refused_request_id_never_reaches_vaults_audit_log(
    client: TestClient, vault_endpoint: VaultEndpoint
) -> None:
    if vault_endpoint.audit_log is None:
        pytest.skip("the external Vault's audit log is not readable from here")
    # Vault's audited headers are not HMAC-ed: whatever request id the broker sends is
    # written there in plain text.
    incoming = "sk_live_" + secrets.token_hex(12)
    tenant = f"rid-{uuid.uuid4().hex[:12]}"

    response = client.post(
        "/v1/tenants",
        json={"id": tenant, "name": "Request id"},
        headers={**bearer(token("platform:admin", subject="ops")), "X-Request-Id": incoming},
    )

    assert response.status_code == 201, response.text
    audit_log = vault_endpoint.audit_log.read_text()
    assert response.headers["x-request-id"] in audit_log
    assert incoming not in audit_log


def _imports(source: Path) -> set[str]:
    """The modules a Python file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_core_does_not_depend_on_the_audit_trail() -> None:
    # The app wires the trail into core (install_error_handlers(record_refusal=...)):
    # core stays below every domain folder.
    core = Path(broker.core.__file__).parent
    importers = [
        f"{module.name}: {name}"
        for module in sorted(core.glob("*.py"))
        for name in sorted(_imports(module))
        if name == "broker.audit" or name.startswith("broker.audit.")
    ]
    assert importers == []
