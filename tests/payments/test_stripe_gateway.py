"""StripeGateway driving the real Stripe SDK over HTTP against a local FakeStripe."""

from __future__ import annotations

import email.utils
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stripe

from broker.core.errors import BrokerError, UpstreamUnavailable, ValidationFailed
from broker.payments.stripe_gateway import (
    CardMethod,
    StripeGateway,
    StripeKeyRefused,
)
from tests.fakes.stripe import DECLINE_MESSAGE, UPSTREAM_DETAIL, FakeStripe


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def make_gateway(fake: FakeStripe, **overrides: Any) -> StripeGateway:
    options: dict[str, Any] = {
        "api_key": fake.secret_key,
        "api_base": fake.base_url,
        "timeout_s": 2.0,
        **overrides,
    }
    return StripeGateway(**options)


@pytest.fixture
def gateway(fake: FakeStripe) -> Iterator[StripeGateway]:
    gw = make_gateway(fake)
    yield gw
    gw.close()


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def make_customer(gateway: StripeGateway) -> str:
    return gateway.create_customer(tenant_id=new_tenant(), name="Acme GmbH")


# ---------------------------------------------------------------- customers


def test_create_customer_records_the_tenant_in_metadata(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    tenant = new_tenant()

    customer_id = gateway.create_customer(tenant_id=tenant, name="Acme GmbH")

    assert customer_id.startswith("cus_")
    stored = fake.customers[customer_id]
    assert stored["name"] == "Acme GmbH"
    assert stored["metadata"] == {"tenant_id": tenant}


def test_a_retried_first_use_does_not_create_a_second_customer(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    tenant = new_tenant()

    first = gateway.create_customer(tenant_id=tenant, name="Acme GmbH")
    again = gateway.create_customer(tenant_id=tenant, name="Acme GmbH")
    other = gateway.create_customer(tenant_id=new_tenant(), name="Acme GmbH")

    assert again == first
    assert other != first
    assert set(fake.customers) == {first, other}
    keys = [r.idempotency_key for r in fake.requests]
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] is not None
    assert tenant not in keys[0]  # derived from the tenant, not the tenant id itself


def test_a_network_retry_after_a_5xx_creates_one_customer(fake: FakeStripe) -> None:
    gateway = make_gateway(fake, max_retries=1)
    fake.fail_next(500)
    try:
        customer_id = gateway.create_customer(tenant_id=new_tenant(), name="Acme GmbH")
    finally:
        gateway.close()

    assert list(fake.customers) == [customer_id]
    assert fake.calls == [("POST", "/v1/customers")] * 2
    assert fake.requests[0].idempotency_key == fake.requests[1].idempotency_key


def test_retrieve_customer_returns_stripe_shape(fake: FakeStripe, gateway: StripeGateway) -> None:
    customer_id = make_customer(gateway)

    customer = gateway.retrieve_customer(customer_id)

    assert customer["id"] == customer_id
    assert customer["object"] == "customer"
    assert customer["invoice_settings"] == fake.customers[customer_id]["invoice_settings"]


def test_a_deleted_customer_counts_as_missing(fake: FakeStripe, gateway: StripeGateway) -> None:
    customer_id = make_customer(gateway)
    fake.delete_customer(customer_id)

    with pytest.raises(ValidationFailed, match="No such customer"):
        gateway.retrieve_customer(customer_id)


def test_a_missing_customer_is_stripes_reason(gateway: StripeGateway) -> None:
    with pytest.raises(ValidationFailed) as caught:
        gateway.retrieve_customer("cus_doesnotexist")

    assert caught.value.status == 422
    assert caught.value.message == "No such customer: 'cus_doesnotexist'"
    assert caught.value.extra == {"stripe": {"code": "resource_missing"}}


# ---------------------------------------------------------------- payment methods


def test_retrieve_card_keeps_only_the_reference_data(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    pm = fake.add_card(brand="mastercard", last4="4444", exp_month=3, exp_year=2031)

    card = gateway.retrieve_card(pm)

    assert card == CardMethod(
        id=pm, brand="mastercard", last4="4444", exp_month=3, exp_year=2031, customer=None
    )


def test_a_non_card_payment_method_is_rejected(fake: FakeStripe, gateway: StripeGateway) -> None:
    pm = fake.add_non_card("sepa_debit")

    with pytest.raises(ValidationFailed, match="payment method is not a card") as caught:
        gateway.retrieve_card(pm)
    assert caught.value.status == 422


def test_a_missing_payment_method_is_stripes_reason(gateway: StripeGateway) -> None:
    with pytest.raises(ValidationFailed) as caught:
        gateway.retrieve_card("pm_doesnotexist")

    assert caught.value.message == "No such PaymentMethod: 'pm_doesnotexist'"
    assert caught.value.extra == {"stripe": {"code": "resource_missing"}}


def test_attach_then_detach_is_visible_in_stripe(fake: FakeStripe, gateway: StripeGateway) -> None:
    customer_id = make_customer(gateway)
    pm = fake.add_card()

    card = gateway.attach(pm, customer_id=customer_id)

    assert card.customer == customer_id
    assert (card.brand, card.last4) == ("visa", "4242")
    assert fake.attached_to(pm) == customer_id

    gateway.detach(pm, customer_id=customer_id)

    assert fake.attached_to(pm) is None
    assert fake.calls[-1] == ("POST", f"/v1/payment_methods/{pm}/detach")


def test_attach_again_to_the_same_customer_is_a_no_op(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    customer_id = make_customer(gateway)
    pm = fake.add_card()
    gateway.attach(pm, customer_id=customer_id)
    before = len(fake.calls)

    card = gateway.attach(pm, customer_id=customer_id)

    assert card.customer == customer_id
    assert fake.calls[before:] == [("GET", f"/v1/payment_methods/{pm}")]


def test_attaching_a_non_card_leaves_nothing_attached(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    customer_id = make_customer(gateway)
    pm = fake.add_non_card()

    with pytest.raises(ValidationFailed, match="not a card"):
        gateway.attach(pm, customer_id=customer_id)

    assert fake.attached_to(pm) is None
    assert ("POST", f"/v1/payment_methods/{pm}/attach") not in fake.calls


def test_a_declined_card_is_stripes_reason_and_stays_unattached(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    customer_id = make_customer(gateway)
    pm = fake.add_card(decline_code="insufficient_funds")

    with pytest.raises(ValidationFailed) as caught:
        gateway.attach(pm, customer_id=customer_id)

    assert caught.value.status == 422
    assert caught.value.message == DECLINE_MESSAGE
    assert caught.value.extra == {
        "stripe": {"code": "card_declined", "decline_code": "insufficient_funds"}
    }
    assert fake.attached_to(pm) is None


def test_another_customers_card_cannot_be_attached(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    owner, intruder = make_customer(gateway), make_customer(gateway)
    pm = fake.add_card()
    gateway.attach(pm, customer_id=owner)

    with pytest.raises(ValidationFailed, match="already been attached"):
        gateway.attach(pm, customer_id=intruder)

    assert fake.attached_to(pm) == owner


def test_another_customers_card_is_not_detached_and_looks_missing(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    owner, intruder = make_customer(gateway), make_customer(gateway)
    pm = fake.add_card()
    gateway.attach(pm, customer_id=owner)
    with pytest.raises(ValidationFailed) as missing:
        gateway.retrieve_card("pm_doesnotexist")

    with pytest.raises(ValidationFailed) as foreign:
        gateway.detach(pm, customer_id=intruder)

    assert fake.attached_to(pm) == owner
    assert ("POST", f"/v1/payment_methods/{pm}/detach") not in fake.calls
    assert foreign.value.message == missing.value.message.replace("pm_doesnotexist", pm)
    assert foreign.value.extra == missing.value.extra


def test_a_detached_card_cannot_be_attached_again(fake: FakeStripe, gateway: StripeGateway) -> None:
    customer_id = make_customer(gateway)
    pm = fake.add_card()
    gateway.attach(pm, customer_id=customer_id)
    gateway.detach(pm)

    with pytest.raises(ValidationFailed, match="may not be used again"):
        gateway.attach(pm, customer_id=customer_id)
    assert fake.attached_to(pm) is None


# ---------------------------------------------------------------- setup intents


def test_setup_intent_hands_out_the_client_secret_masked_in_repr(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    customer_id = make_customer(gateway)

    intent = gateway.create_setup_intent(customer_id=customer_id)

    stored = fake.setup_intents[intent.id]
    assert intent.id.startswith("seti_")
    assert intent.client_secret == stored["client_secret"]
    assert intent.client_secret.startswith(f"{intent.id}_secret_")
    assert intent.client_secret not in repr(intent)
    assert intent.client_secret not in str(intent)
    assert stored["customer"] == customer_id
    assert stored["usage"] == "off_session"
    assert stored["payment_method_types"] == ["card"]


def test_the_sdks_api_version_refuses_payment_method_types(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    """Why the gateway sends `allowed_payment_method_types` (read through the raw SDK)."""
    customer_id = make_customer(gateway)
    client = gateway._client  # the SDK client, to show the raw answer

    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.setup_intents.create(
            params={"customer": customer_id, "payment_method_types": ["card"]}  # type: ignore[arg-type]
        )
    assert caught.value.code == "payment_method_types_no_longer_supported"
    assert (fake.requests[-1].stripe_version or "") >= "2026-09-30"


def test_a_retried_setup_intent_is_created_once(fake: FakeStripe) -> None:
    gateway = make_gateway(fake, max_retries=1)
    try:
        customer_id = make_customer(gateway)
        fake.fail_next(503)
        intent = gateway.create_setup_intent(customer_id=customer_id)
    finally:
        gateway.close()

    assert list(fake.setup_intents) == [intent.id]
    first, second = fake.requests[-2:]
    assert first.idempotency_key == second.idempotency_key is not None


# ---------------------------------------------------------------- failures


def test_a_refused_key_is_our_misconfiguration(fake: FakeStripe) -> None:
    wrong_key = "sk_test_" + uuid.uuid4().hex
    gateway = make_gateway(fake, api_key=wrong_key)
    try:
        with pytest.raises(StripeKeyRefused) as caught:
            gateway.retrieve_card(fake.add_card())
    finally:
        gateway.close()

    assert caught.value.status == 500
    assert caught.value.message == "the platform's Stripe key was refused"
    assert "Invalid API Key" not in str(caught.value)
    assert wrong_key[-4:] not in str(caught.value)


def test_rate_limited_carries_stripes_retry_after(fake: FakeStripe, gateway: StripeGateway) -> None:
    fake.fail_next(429, retry_after=7)

    with pytest.raises(UpstreamUnavailable) as caught:
        gateway.retrieve_card(fake.add_card())

    assert caught.value.status == 503
    assert caught.value.retry_after == 7
    assert caught.value.message == "Stripe is unavailable"


def test_an_http_date_retry_after_is_turned_into_seconds(
    fake: FakeStripe, gateway: StripeGateway
) -> None:
    fake.fail_next(503, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))

    with pytest.raises(UpstreamUnavailable) as caught:
        gateway.retrieve_card(fake.add_card())

    assert 25 <= caught.value.retry_after <= 31


def test_a_server_error_without_retry_after_uses_the_default(fake: FakeStripe) -> None:
    gateway = make_gateway(fake, retry_after_s=11)
    fake.fail_next(500)
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            gateway.retrieve_card(fake.add_card())
    finally:
        gateway.close()

    assert caught.value.retry_after == 11


def test_connection_refused_is_unavailable(fake: FakeStripe, gateway: StripeGateway) -> None:
    pm = fake.add_card()
    fake.down(refuse=True)

    with pytest.raises(UpstreamUnavailable):
        gateway.retrieve_card(pm)

    fake.up()
    assert gateway.retrieve_card(pm).id == pm


def test_a_hang_up_is_unavailable(fake: FakeStripe, gateway: StripeGateway) -> None:
    pm = fake.add_card()
    fake.down()

    with pytest.raises(UpstreamUnavailable):
        gateway.retrieve_card(pm)

    fake.up()
    assert gateway.retrieve_card(pm).id == pm


def test_a_slow_stripe_times_out_as_unavailable(fake: FakeStripe) -> None:
    gateway = make_gateway(fake, timeout_s=0.2)
    pm = fake.add_card()
    fake.delay_next(3)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamUnavailable):
            gateway.retrieve_card(pm)
    finally:
        gateway.close()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "call",
    [
        lambda gw: gw.retrieve_card("card_1234"),
        lambda gw: gw.retrieve_card("pm_"),
        lambda gw: gw.retrieve_card("pm_abc\n"),
        lambda gw: gw.retrieve_card("pm_../../v1/customers"),
        lambda gw: gw.retrieve_card("4242424242424242"),
        lambda gw: gw.retrieve_card("pm_" + "a" * 65),
        lambda gw: gw.attach("pm_abc", customer_id="cus_abc?x=1"),
        lambda gw: gw.attach("pm_ab c", customer_id="cus_abc"),
        lambda gw: gw.detach("pm_%2e%2e"),
        lambda gw: gw.detach("pm_abc", customer_id="acct_123"),
        lambda gw: gw.create_setup_intent(customer_id="cus_"),
        lambda gw: gw.retrieve_customer("cus_abc/../x"),
    ],
)
def test_bad_ids_are_rejected_without_calling_stripe(
    fake: FakeStripe, gateway: StripeGateway, call: Callable[[StripeGateway], object]
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        call(gateway)

    assert caught.value.status == 422
    assert caught.value.message in (
        "not a valid Stripe payment method id",
        "not a valid Stripe customer id",
    )
    assert fake.calls == []


# ---------------------------------------------------------------- secrets


def test_the_api_key_never_shows(
    fake: FakeStripe, gateway: StripeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = fake.secret_key
    customer_id = make_customer(gateway)
    raised: list[BrokerError] = []

    def attempt(call: Callable[[], object]) -> None:
        try:
            call()
        except BrokerError as exc:
            raised.append(exc)

    attempt(lambda: gateway.retrieve_card("pm_doesnotexist"))
    attempt(lambda: gateway.retrieve_card(fake.add_non_card()))
    attempt(
        lambda: gateway.attach(fake.add_card(decline_code="do_not_honor"), customer_id=customer_id)
    )
    for status in (429, 500, 503):
        fake.fail_next(status, retry_after=3)
        attempt(lambda: gateway.create_setup_intent(customer_id=customer_id))
    fake.down()
    attempt(lambda: gateway.retrieve_customer(customer_id))
    fake.up()
    wrong = make_gateway(fake, api_key=key[:-4] + "zzzz")
    attempt(lambda: wrong.create_setup_intent(customer_id=customer_id))
    wrong.close()

    assert len(raised) == 8
    assert key not in repr(gateway)
    assert repr(gateway) == f"StripeGateway(api_base={fake.base_url!r})"
    for exc in raised:
        shown = f"{exc!s} {exc!r} {exc.extra!r}"
        assert key not in shown
        assert key[8:] not in shown
        assert UPSTREAM_DETAIL not in shown
        # Stripe's exception (its raw body and headers) does not ride along.
        assert exc.__cause__ is None
        assert exc.__context__ is None
    assert key not in caplog.text


def test_the_sdks_global_state_is_left_alone(
    fake: FakeStripe, gateway: StripeGateway, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    make_customer(gateway)

    assert stripe.api_key is None
    # SDK telemetry would write a persistent id under $XDG_CONFIG_HOME/stripe.
    assert not (tmp_path / "stripe").exists()
