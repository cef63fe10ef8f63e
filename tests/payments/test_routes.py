"""Payment methods and payouts over HTTP, through the real stripe SDK and a local Stripe."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import stripe
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.models import PaymentMethod
from broker.payments.service import (
    default_payment_method,
    reconcile_default_card,
    reconcile_default_cards,
)
from broker.payments.stripe_gateway import STRIPE_API_VERSION
from broker.vault.gateway import VaultGateway
from tests.fakes.stripe import FakeStripe
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

BASE = "/v1/tenants/settings/payment-methods"


def finance(tenant: str, *scopes: str) -> dict[str, str]:
    return bearer(token(*(scopes or ("finance:manage",)), tenant_id=tenant, subject="fin"))


def add(client: TestClient, tenant: str, pm: str) -> Any:
    return client.post(BASE, json={"payment_method_id": pm}, headers=finance(tenant))


def test_full_flow(client: TestClient, stripe_server: FakeStripe, engine: Engine) -> None:
    tenant = make_tenant(client)
    intent = client.post(f"{BASE}/setup-intent", headers=finance(tenant))
    assert intent.status_code == 200, intent.text
    assert "_secret_" in intent.json()["client_secret"]
    visa = stripe_server.add_card(brand="visa", last4="4242", exp_month=12, exp_year=2030)
    master = stripe_server.add_card(brand="mastercard", last4="4444", exp_month=1, exp_year=2031)

    first = add(client, tenant, visa)
    assert first.status_code == 201, first.text
    assert first.json() == {
        "id": visa,
        "brand": "visa",
        "last4": "4242",
        "exp_month": 12,
        "exp_year": 2030,
        "is_default": True,
    }
    second = add(client, tenant, master)
    assert second.json()["is_default"] is False
    customer = stripe_server.attached_to(visa)
    assert customer is not None
    assert stripe_server.attached_to(master) == customer

    listed = client.get(BASE, headers=finance(tenant, "finance:view"))
    assert listed.status_code == 200
    assert [(m["id"], m["is_default"]) for m in listed.json()] == [(visa, True), (master, False)]
    assert all(
        set(m) == {"id", "brand", "last4", "exp_month", "exp_year", "is_default"}
        for m in listed.json()
    )

    made_default = client.post(f"{BASE}/{master}/default", headers=finance(tenant))
    assert made_default.json()["is_default"] is True
    listed = client.get(BASE, headers=finance(tenant)).json()
    assert [m["is_default"] for m in listed] == [False, True]

    deleted = client.delete(f"{BASE}/{master}", headers=finance(tenant))
    assert deleted.status_code == 204
    assert stripe_server.attached_to(master) is None
    listed = client.get(BASE, headers=finance(tenant)).json()
    assert [(m["id"], m["is_default"]) for m in listed] == [(visa, True)]

    with engine.connect() as conn:
        actions = [
            row.action
            for row in conn.execute(
                text("SELECT action FROM audit_events WHERE tenant_id = :t ORDER BY id"),
                {"t": tenant},
            )
        ]
    for action in (
        "payment_method.setup_intent",
        "payment_method.add",
        "payment_method.list",
        "payment_method.set_default",
        "payment_method.remove",
    ):
        assert action in actions


def test_the_customer_is_created_once(client: TestClient, stripe_server: FakeStripe) -> None:
    tenant = make_tenant(client)
    before = len(stripe_server.customers)
    client.post(f"{BASE}/setup-intent", headers=finance(tenant))
    client.post(f"{BASE}/setup-intent", headers=finance(tenant))
    add(client, tenant, stripe_server.add_card())
    assert len(stripe_server.customers) == before + 1


def test_a_declined_card_is_422_with_stripes_reason_and_nothing_kept(
    client: TestClient, stripe_server: FakeStripe
) -> None:
    tenant = make_tenant(client)
    declined = stripe_server.add_card(decline_code="insufficient_funds")
    response = add(client, tenant, declined)
    assert response.status_code == 422
    assert "declined" in response.json()["detail"].lower()
    assert client.get(BASE, headers=finance(tenant)).json() == []
    assert stripe_server.attached_to(declined) is None


def test_missing_and_non_card_methods_are_422(
    client: TestClient, stripe_server: FakeStripe
) -> None:
    tenant = make_tenant(client)
    assert add(client, tenant, "pm_doesnotexist123").status_code == 422
    sepa = stripe_server.add_non_card()
    response = add(client, tenant, sepa)
    assert response.status_code == 422
    assert "card" in response.json()["detail"]
    assert client.get(BASE, headers=finance(tenant)).json() == []


@pytest.mark.parametrize("status", [429, 500, 503])
def test_stripe_down_or_rate_limited_is_503_with_retry_after_and_nothing_kept(
    client: TestClient, stripe_server: FakeStripe, status: int
) -> None:
    tenant = make_tenant(client)
    client.post(f"{BASE}/setup-intent", headers=finance(tenant))  # customer exists
    card = stripe_server.add_card()
    stripe_server.fail_next(status, times=1, retry_after=7)  # the first Stripe call fails
    response = add(client, tenant, card)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert client.get(BASE, headers=finance(tenant)).json() == []
    assert stripe_server.attached_to(card) is None


def test_delete_when_stripe_is_down_keeps_the_card(
    client: TestClient, stripe_server: FakeStripe
) -> None:
    tenant = make_tenant(client)
    card = stripe_server.add_card()
    assert add(client, tenant, card).status_code == 201
    stripe_server.fail_next(503, times=1)
    response = client.delete(f"{BASE}/{card}", headers=finance(tenant))
    assert response.status_code == 503, response.text
    assert [m["id"] for m in client.get(BASE, headers=finance(tenant)).json()] == [card]
    assert stripe_server.attached_to(card) is not None


def test_unknown_method_is_404_for_default_and_delete(client: TestClient) -> None:
    tenant = make_tenant(client)
    assert client.post(f"{BASE}/pm_nothere/default", headers=finance(tenant)).status_code == 404
    assert client.delete(f"{BASE}/pm_nothere", headers=finance(tenant)).status_code == 404


def test_a_card_on_file_twice_is_a_conflict(client: TestClient, stripe_server: FakeStripe) -> None:
    tenant = make_tenant(client)
    card = stripe_server.add_card()
    assert add(client, tenant, card).status_code == 201
    assert add(client, tenant, card).status_code == 409


def _method(pm: str, default: bool) -> PaymentMethod:
    return PaymentMethod(
        tenant_id="t",
        id=pm,
        brand="visa",
        last4="4242",
        exp_month=1,
        exp_year=2030,
        is_default=default,
        created_by="x",
    )


def test_seed_default_payment_method_semantics() -> None:
    a, b = _method("pm_a", False), _method("pm_b", True)
    assert default_payment_method([a, b]) is b
    assert default_payment_method([a, _method("pm_c", False)]) is a
    assert default_payment_method([]) is None


def test_payout_is_sealed_in_vault_and_only_a_hint_is_in_postgres(
    client: TestClient, vault_admin: VaultGateway, engine: Engine
) -> None:
    tenant = make_tenant(client)
    iban = "DE89370400440532013000"
    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "Acme Ltd"}},
        headers=finance(tenant),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "bank_transfer"
    assert body["hint"].startswith("DE")
    assert body["hint"].endswith("3000")
    assert iban not in response.text
    read = client.get("/v1/tenants/settings/payout", headers=finance(tenant, "finance:view"))
    assert read.json()["hint"] == body["hint"]
    entry = vault_admin.kv.read(f"tenants/{tenant}/payout")
    assert entry is not None
    assert entry.data["ciphertext"].startswith("vault:v1:")
    assert iban not in str(entry.data)
    with engine.connect() as conn:
        dump = str(
            conn.execute(
                text("SELECT row_to_json(p)::text FROM payment_profiles p WHERE tenant_id = :t"),
                {"t": tenant},
            ).scalar_one()
        )
    assert iban not in dump
    assert "Acme" not in dump
    assert "bank_transfer" in dump


@pytest.mark.parametrize(
    ("method", "details", "field"),
    [
        ("bank_transfer", {"iban": "DE89370400440532013001"}, "iban"),
        ("bank_transfer", {"account_number": "12345678"}, "bank_code"),
        ("mobile_money", {"phone": "0712345678", "provider": "mpesa"}, "phone"),
        ("mobile_money", {"phone": "+254712345678", "provider": "pigeon"}, "provider"),
        ("paypal", {"email": "not-an-email"}, "email"),
        ("cheque", {"payee": "x"}, "method"),
    ],
)
def test_bad_payout_details_are_422(
    client: TestClient, method: str, details: dict[str, str], field: str
) -> None:
    tenant = make_tenant(client)
    response = client.put(
        "/v1/tenants/settings/payout",
        json={"method": method, "details": details},
        headers=finance(tenant),
    )
    assert response.status_code == 422, response.text
    assert field in response.text
    for value in details.values():
        if len(value) > 6:
            assert value not in response.text


def test_no_payout_yet_is_404(client: TestClient) -> None:
    tenant = make_tenant(client)
    assert client.get("/v1/tenants/settings/payout", headers=finance(tenant)).status_code == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (BASE, {"payment_method_id": "pm_x", "note": "4242 4242 4242 4242"}),
        (BASE, {"card_number": "hidden"}),
        ("/v1/tenants/settings", {"branding": {"footer_text": "5555-5555-5555-4444"}}),
        ("/v1/tenants/settings/payout", {"method": "paypal", "details": {"cvv": "123"}}),
        ("/v1/tenants/settings/integrations/openai", {"fields": {"api_key": "378282246310005"}}),
    ],
)
def test_raw_card_data_is_refused_on_every_route(
    client: TestClient, engine: Engine, path: str, body: dict[str, Any]
) -> None:
    tenant = make_tenant(client)
    method = (
        "PATCH"
        if path.endswith("/settings")
        else ("PUT" if "payout" in path or "openai" in path else "POST")
    )
    response = client.request(
        method, path, json=body, headers=bearer(token("tenant:admin", tenant_id=tenant))
    )
    assert response.status_code == 422
    assert "raw card data is not accepted" in response.text
    for digits in ("4242 4242 4242 4242", "5555-5555-5555-4444", "378282246310005"):
        assert digits not in response.text
    with unit_of_work(engine) as session:
        assert session.get(PaymentMethod, (tenant, "pm_x")) is None


def _customer(engine: Engine, tenant: str) -> str:
    with engine.connect() as conn:
        customer: str = conn.execute(
            text("SELECT stripe_customer_id FROM payment_profiles WHERE tenant_id = :t"),
            {"t": tenant},
        ).scalar_one()
    return customer


def test_the_default_card_is_the_one_stripe_billing_charges(
    client: TestClient, stripe_server: FakeStripe, engine: Engine
) -> None:
    tenant = make_tenant(client)
    visa, master = stripe_server.add_card(), stripe_server.add_card(last4="4444")
    assert add(client, tenant, visa).status_code == 201
    customer = _customer(engine, tenant)
    assert stripe_server.default_payment_method(customer) == visa  # the first card

    assert add(client, tenant, master).json()["is_default"] is False
    assert stripe_server.default_payment_method(customer) == visa

    assert client.post(f"{BASE}/{master}/default", headers=finance(tenant)).status_code == 200
    assert stripe_server.default_payment_method(customer) == master

    # Removing the default moves it, in Stripe too (Stripe alone would leave none).
    assert client.delete(f"{BASE}/{master}", headers=finance(tenant)).status_code == 204
    assert stripe_server.default_payment_method(customer) == visa
    assert [m["is_default"] for m in client.get(BASE, headers=finance(tenant)).json()] == [True]


def test_a_default_stripe_refuses_changes_nothing(
    client: TestClient, stripe_server: FakeStripe, engine: Engine
) -> None:
    tenant = make_tenant(client)
    visa, master = stripe_server.add_card(), stripe_server.add_card(last4="4444")
    add(client, tenant, visa)
    add(client, tenant, master)
    stripe_server.fail_next(503, times=1)
    response = client.post(f"{BASE}/{master}/default", headers=finance(tenant))
    assert response.status_code == 503, response.text
    listed = client.get(BASE, headers=finance(tenant)).json()
    assert [(m["id"], m["is_default"]) for m in listed] == [(visa, True), (master, False)]
    assert stripe_server.default_payment_method(_customer(engine, tenant)) == visa


def test_a_drifted_stripe_default_is_reconciled_to_the_brokers(
    client: TestClient, stripe_server: FakeStripe, engine: Engine, app: Any
) -> None:
    tenant = make_tenant(client)
    visa, master = stripe_server.add_card(), stripe_server.add_card(last4="4444")
    add(client, tenant, visa)
    add(client, tenant, master)
    customer = _customer(engine, tenant)
    stripe_server.set_default_payment_method(customer, master)  # a dashboard edit

    assert reconcile_default_cards(engine, app.state.stripe) >= 1
    assert stripe_server.default_payment_method(customer) == visa
    assert reconcile_default_card(engine, app.state.stripe, tenant_id=tenant) is False


def test_every_stripe_call_names_the_pinned_api_version(
    client: TestClient, stripe_server: FakeStripe
) -> None:
    # The SDK's typed parameters are generated for one API version: the pin must match.
    assert stripe._api_version._ApiVersion.CURRENT == STRIPE_API_VERSION
    before = len(stripe_server.requests)
    tenant = make_tenant(client)
    add(client, tenant, stripe_server.add_card())
    sent = stripe_server.requests[before:]
    assert sent
    assert {r.stripe_version for r in sent} == {STRIPE_API_VERSION}


def test_no_platform_key_is_a_clear_problem_not_a_retry(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    unset = settings.model_copy(update={"stripe_key_path": "platform/stripe-never-stored"})
    client = TestClient(create_app(unset, engine=engine, vault=broker_vault))
    tenant = make_tenant(client)
    response = client.post(f"{BASE}/setup-intent", headers=finance(tenant))
    assert response.status_code == 501, response.text
    assert "retry-after" not in response.headers
    assert response.json()["title"] == "Stripe is not configured"
    assert "platform/stripe-never-stored" in response.json()["detail"]
    documented = client.app.openapi()["paths"][f"{BASE}/setup-intent"]["post"]["responses"]  # type: ignore[attr-defined]
    assert "501" in documented
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["stripe"] == "not_configured"


def test_concurrent_first_payout_writes_never_fail_and_each_answers_its_own(
    client: TestClient,
) -> None:
    tenant = make_tenant(client)
    ibans = [
        "DE89370400440532013000",
        "GB82WEST12345698765432",
        "NL91ABNA0417164300",
        "BE68539007547034",
        "CH9300762011623852957",
        "FR1420041010050500013M02606",
    ]
    barrier = threading.Barrier(len(ibans))
    answers: dict[str, Any] = {}

    def put(iban: str) -> None:
        barrier.wait()
        answers[iban] = client.put(
            "/v1/tenants/settings/payout",
            json={"method": "bank_transfer", "details": {"iban": iban, "account_holder": "A"}},
            headers=finance(tenant),
        )

    threads = [threading.Thread(target=put, args=(iban,)) for iban in ibans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The first writes race to create the tenant's payment profile: one wins, none is a 500.
    assert {r.status_code for r in answers.values()} <= {200, 409}, {
        iban[-4:]: r.status_code for iban, r in answers.items()
    }
    accepted = {iban: r for iban, r in answers.items() if r.status_code == 200}
    assert accepted
    for iban, response in accepted.items():
        assert response.json()["hint"].endswith(iban[-4:])


def test_payout_writes_racing_the_tenants_deletion_never_fail(client: TestClient) -> None:
    ops = bearer(token("platform:admin", subject="ops"))
    statuses: list[int] = []
    for _ in range(10):  # the steps interleave differently each time
        tenant = make_tenant(client)
        barrier = threading.Barrier(4)

        def call(n: int, tenant: str = tenant, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            if n == 0:
                client.delete(f"/v1/tenants/{tenant}", headers=ops)
                return
            response = client.put(
                "/v1/tenants/settings/payout",
                json={
                    "method": "bank_transfer",
                    "details": {"iban": "DE89370400440532013000", "account_holder": "A"},
                },
                headers=finance(tenant),
            )
            statuses.append(response.status_code)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # Done before the deletion, or refused because the tenant is (being) deleted.
    assert set(statuses) <= {200, 404, 409, 410}, statuses
