"""Request and response bodies for payment methods. Card data never appears here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from broker.payments.payout import PayoutRequest, PayoutView

# What Stripe.js hands the browser; anything else is not a payment method (and
# a NUL would fail at PostgreSQL instead of here).
PAYMENT_METHOD_ID = r"^pm_[A-Za-z0-9]{1,64}$"

__all__ = [
    "PAYMENT_METHOD_ID",
    "PaymentMethodAdd",
    "PaymentMethodView",
    "PayoutRequest",
    "PayoutView",
    "SetupIntentView",
]


class PaymentMethodAdd(BaseModel):
    """A Stripe payment method id produced by Stripe.js (`pm_...`), never a card number."""

    model_config = ConfigDict(extra="forbid")

    payment_method_id: str = Field(pattern=PAYMENT_METHOD_ID, max_length=100)


class PaymentMethodView(BaseModel):
    """Exactly what the broker keeps of a card: the token and non-sensitive metadata."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    is_default: bool


class SetupIntentView(BaseModel):
    """The SetupIntent's client secret, for Stripe.js in the tenant's browser."""

    id: str
    client_secret: str
