"""Stripe, reached through the official SDK: payment-method references, never card data.

PCI-DSS keeps the broker out of card-data scope: Stripe.js collects the card in the
browser against a SetupIntent's ``client_secret``, and the broker keeps only the ``pm_``
reference with the brand, last four digits and expiry that Stripe reports.

Every Stripe error is translated here, at the edge, and raised ``from None`` outside
the ``except`` block, so Stripe's raw response never rides along; callers see only:

* ``CardError`` -> ValidationFailed (422) with Stripe's message, code and decline code;
* ``InvalidRequestError`` (``resource_missing``...) -> ValidationFailed (422), Stripe's
  message;
* ``IdempotencyError`` -> Conflict (409);
* ``RateLimitError``, ``APIConnectionError``, ``APIError`` -> UpstreamUnavailable (503)
  with Stripe's ``Retry-After`` when it sent one;
* ``AuthenticationError``, ``PermissionError`` -> StripeKeyRefused (500): the platform's
  key is wrong, which no caller can fix.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
import stripe
from pydantic import SecretStr

from broker.core.errors import BrokerError, Conflict, UpstreamUnavailable, ValidationFailed

__all__ = [
    "CardMethod",
    "SetupIntentInfo",
    "STRIPE_API_VERSION",
    "StripeGateway",
    "StripeKeyRefused",
]

log = logging.getLogger(__name__)

# With telemetry on, the SDK writes a persistent id under ~/.config/stripe on the first
# request and sends it, with platform.platform(), in every request's user agent.  A
# PCI-scoped service neither fingerprints its host to a third party nor writes to $HOME
# from a request path.  The flag is process-global in the SDK; nothing else here uses it.
stripe.enable_telemetry = False

# fullmatch, not `^...$`: `$` also matches before a trailing newline.
_PAYMENT_METHOD_ID = re.compile(r"pm_[A-Za-z0-9]{1,64}")
_CUSTOMER_ID = re.compile(r"cus_[A-Za-z0-9]{1,64}")

_MAX_RETRY_AFTER_S = 3600

# Every request names this API version, so a Stripe account's dashboard default (or an
# SDK upgrade) cannot change what the broker's parameters mean. It is the version the
# pinned SDK range (pyproject.toml) is generated for: change both together.
STRIPE_API_VERSION = "2026-10-28.endive"

_T = TypeVar("_T")

StripeObserver = Callable[[str, float, str | None], None]
"""``observe(operation, seconds, error_class_or_None)``: told of every Stripe call (metrics)."""


class StripeKeyRefused(BrokerError):
    """Stripe refused the platform's own API key: our misconfiguration, not the caller's."""

    status = 500
    title = "Payment provider misconfigured"

    def __init__(self) -> None:
        super().__init__("the platform's Stripe key was refused")


@dataclass(frozen=True)
class CardMethod:
    """The only payment-method data the broker keeps (a reference, never the card)."""

    id: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    customer: str | None


@dataclass(frozen=True)
class SetupIntentInfo:
    """What the front end needs to collect a card with Stripe.js."""

    id: str
    # Handed to the browser only: it lets its holder confirm the intent with a card.
    client_secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"SetupIntentInfo(id={self.id!r}, client_secret='***')"


class _HttpxTransport(stripe.HTTPClient):
    """The SDK's transport over one shared, thread-safe ``httpx.Client``.

    The SDK's own choices do not fit a threaded server: ``RequestsClient`` opens one
    session per thread and its ``close()`` closes only the calling thread's, and
    ``HTTPXClient`` sends the form body as ``data=<str>``, which httpx deprecates.
    """

    name = "httpx"

    def __init__(self, *, timeout_s: float) -> None:
        super().__init__()
        self._client = httpx.Client(
            timeout=timeout_s,
            follow_redirects=False,
            # The CA bundle the SDK ships and uses by default.
            verify=ssl.create_default_context(cafile=stripe.ca_bundle_path),
        )

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        try:
            response = self._client.request(
                method.upper(), url, headers=headers, content=post_data or None
            )
        except httpx.TransportError as exc:
            # Connect/read failures and timeouts.  The SDK retries these when
            # max_network_retries allows; POSTs carry an Idempotency-Key, so that is safe.
            # The message names the failure only: no URL, no headers.
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"could not reach Stripe ({type(exc).__name__})", should_retry=True
            ) from None
        return response.text, response.status_code, response.headers

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        raise NotImplementedError("the broker does not stream from Stripe")

    def close(self) -> None:
        self._client.close()


class StripeGateway:
    """The broker's only way to Stripe: one SDK client per instance, errors translated."""

    def __init__(
        self,
        *,
        api_key: str | SecretStr,
        api_base: str = "https://api.stripe.com",
        timeout_s: float = 10.0,
        max_retries: int = 0,
        retry_after_s: int = 5,
        observe: StripeObserver | None = None,
    ) -> None:
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        if not key:
            raise ValueError("a Stripe API key is required")
        self._api_base = api_base.rstrip("/")
        self._retry_after_s = retry_after_s
        self._observe: StripeObserver = observe or (lambda operation, seconds, error: None)
        self._transport = _HttpxTransport(timeout_s=timeout_s)
        # The key lives only inside the SDK client; never the global stripe.api_key, and
        # never an attribute of ours that a repr or a debugger dump could show.
        self._client = stripe.StripeClient(
            key,
            base_addresses={"api": self._api_base},
            stripe_version=STRIPE_API_VERSION,
            max_network_retries=max_retries,
            http_client=self._transport,
        )

    def __repr__(self) -> str:
        return f"StripeGateway(api_base={self._api_base!r})"

    # ------------------------------------------------------------------ customers

    def create_customer(self, *, tenant_id: str, name: str) -> str:
        """Create the tenant's Stripe customer and return its ``cus_`` id."""
        if not tenant_id:
            raise ValidationFailed("a tenant id is required")
        # A key derived from the tenant: a retried first use (a timeout after Stripe
        # created the customer, a crash before we stored the id) replays Stripe's first
        # answer instead of creating a second customer.  Stripe keeps keys for 24 hours.
        digest = hashlib.sha256(tenant_id.encode()).hexdigest()[:40]
        customer = self._call(
            "create_customer",
            lambda: self._client.v1.customers.create(
                params={"name": name, "metadata": {"tenant_id": tenant_id}},
                options={"idempotency_key": f"broker-customer-{digest}"},
            ),
        )
        return customer.id

    def retrieve_customer(self, customer_id: str) -> dict[str, object]:
        """The customer as Stripe returns it (a deleted one counts as missing)."""
        _check(customer_id, _CUSTOMER_ID, "customer")
        customer = self._call(
            "retrieve_customer", lambda: self._client.v1.customers.retrieve(customer_id)
        )
        # Stripe answers a deleted customer with 200 and `deleted: true`.
        if "deleted" in customer and customer.deleted:
            raise ValidationFailed(f"No such customer: '{customer_id}'")
        return customer.to_dict()

    def default_card(self, customer_id: str) -> str | None:
        """The card Stripe Billing charges: the customer's invoice default payment method."""
        customer = self.retrieve_customer(customer_id)
        settings = customer.get("invoice_settings")
        default = settings.get("default_payment_method") if isinstance(settings, dict) else None
        if isinstance(default, dict):  # expanded
            default = default.get("id")
        return default if isinstance(default, str) else None

    def set_default_card(self, customer_id: str, payment_method_id: str | None) -> None:
        """Make a card (attached to the customer) the one Billing charges; None clears it."""
        _check(customer_id, _CUSTOMER_ID, "customer")
        if payment_method_id is not None:
            _check(payment_method_id, _PAYMENT_METHOD_ID, "payment method")
        self._call(
            "update_customer",
            lambda: self._client.v1.customers.update(
                customer_id,
                # Stripe reads an empty string as "unset".
                params={"invoice_settings": {"default_payment_method": payment_method_id or ""}},
            ),
        )

    # ------------------------------------------------------------ payment methods

    def retrieve_card(self, payment_method_id: str) -> CardMethod:
        """The card behind ``payment_method_id``; anything else is refused."""
        _check(payment_method_id, _PAYMENT_METHOD_ID, "payment method")
        method = self._call(
            "retrieve_payment_method",
            lambda: self._client.v1.payment_methods.retrieve(payment_method_id),
        )
        return _card(method)

    def attach(self, payment_method_id: str, *, customer_id: str) -> CardMethod:
        """Attach a card to a customer; a card already attached to it is returned as is."""
        _check(payment_method_id, _PAYMENT_METHOD_ID, "payment method")
        _check(customer_id, _CUSTOMER_ID, "customer")
        # Look first: attaching, then finding out it is not a card, would leave a
        # half-done attachment behind (and detaching is permanent in Stripe).
        card = self.retrieve_card(payment_method_id)
        if card.customer == customer_id:
            return card
        method = self._call(
            "attach_payment_method",
            lambda: self._client.v1.payment_methods.attach(
                payment_method_id, params={"customer": customer_id}
            ),
        )
        return _card(method)

    def detach(self, payment_method_id: str, *, customer_id: str | None = None) -> None:
        """Detach a payment method (permanent in Stripe).

        With ``customer_id``, only a method attached to that customer is detached;
        one attached elsewhere is answered exactly like a missing one, so a tenant
        cannot probe, or detach, another tenant's card.
        """
        _check(payment_method_id, _PAYMENT_METHOD_ID, "payment method")
        if customer_id is not None:
            _check(customer_id, _CUSTOMER_ID, "customer")
            method = self._call(
                "retrieve_payment_method",
                lambda: self._client.v1.payment_methods.retrieve(payment_method_id),
            )
            if _customer_of(method) != customer_id:
                raise ValidationFailed(
                    f"No such PaymentMethod: '{payment_method_id}'",
                    stripe={"code": "resource_missing"},
                )
        self._call(
            "detach_payment_method",
            lambda: self._client.v1.payment_methods.detach(payment_method_id),
        )

    # -------------------------------------------------------------- setup intents

    def create_setup_intent(self, *, customer_id: str) -> SetupIntentInfo:
        """A SetupIntent for saving a card for later, off-session use."""
        _check(customer_id, _CUSTOMER_ID, "customer")
        intent = self._call(
            "create_setup_intent",
            lambda: self._client.v1.setup_intents.create(
                params={
                    "customer": customer_id,
                    "usage": "off_session",
                    # Since API version 2026-09-30 (STRIPE_API_VERSION is later),
                    # `payment_method_types` is read-only: sending it is a 400.
                    "allowed_payment_method_types": ["card"],
                }
            ),
        )
        if not intent.client_secret:
            raise BrokerError("Stripe returned a SetupIntent without a client secret")
        return SetupIntentInfo(id=intent.id, client_secret=intent.client_secret)

    def close(self) -> None:
        """Close the pooled connections."""
        self._transport.close()

    # ------------------------------------------------------------------ errors

    def _call(self, operation: str, call: Callable[[], _T]) -> _T:
        """Run one SDK call, measured; Stripe's exceptions come out as broker errors."""
        started = time.perf_counter()
        try:
            result = call()
        except stripe.StripeError as exc:
            self._observe(operation, time.perf_counter() - started, type(exc).__name__)
            error = _translate(exc, self._retry_after_s)
        else:
            self._observe(operation, time.perf_counter() - started, None)
            return result
        # Raised outside the `except` and `from None`: the SDK's exception carries
        # Stripe's whole response (body, headers), which must not ride along as the
        # broker error's context into tracebacks or logs.
        raise error from None


def _translate(exc: stripe.StripeError, retry_after_s: int) -> BrokerError:
    """The broker error for one of the SDK's exceptions."""
    if isinstance(exc, stripe.CardError):
        decline_code = exc.error.decline_code if exc.error is not None else None
        return ValidationFailed(
            exc.user_message or "the card was declined",
            stripe={"code": exc.code, "decline_code": decline_code},
        )
    if isinstance(exc, stripe.InvalidRequestError):
        # resource_missing reads "No such PaymentMethod: 'pm_...'": the id was
        # validated before the call, so echoing it is safe.
        return ValidationFailed(
            exc.user_message or "Stripe refused the request", stripe={"code": exc.code}
        )
    if isinstance(exc, stripe.IdempotencyError):
        return Conflict("a retried Stripe request had different parameters")
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError | stripe.APIError):
        return UpstreamUnavailable(
            "Stripe is unavailable", retry_after=_retry_after(exc.headers, retry_after_s)
        )
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        log.error(
            "Stripe refused the platform key",
            extra={"fields": {"stripe_status": exc.http_status, "stripe_request": exc.request_id}},
        )
        return StripeKeyRefused()
    log.error(
        "unexpected Stripe error",
        extra={"fields": {"error": type(exc).__name__, "stripe_request": exc.request_id}},
    )
    return BrokerError("unexpected answer from Stripe")


def _retry_after(headers: Mapping[str, str] | None, default: int) -> int:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else ``default``."""
    value = next((v for k, v in (headers or {}).items() if k.lower() == "retry-after"), None)
    if value is None:
        return default
    value = value.strip()
    seconds: float
    if re.fullmatch(r"[0-9]{1,9}", value):
        seconds = int(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(1, math.ceil(seconds)), _MAX_RETRY_AFTER_S)


def _check(value: object, pattern: re.Pattern[str], what: str) -> None:
    # The message never echoes the input: it may be anything, a pasted card number too.
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValidationFailed(f"not a valid Stripe {what} id")


def _customer_of(method: stripe.PaymentMethod) -> str | None:
    customer = method.customer
    if customer is None or isinstance(customer, str):
        return customer
    return customer.id


def _card(method: stripe.PaymentMethod) -> CardMethod:
    # Check the type first: Stripe includes only the hash of the method's own type, and
    # the SDK raises AttributeError for `method.card` on anything else.
    if method.type != "card" or "card" not in method or method.card is None:
        raise ValidationFailed("payment method is not a card")
    card = method.card
    return CardMethod(
        id=method.id,
        brand=card.brand,
        last4=card.last4,
        exp_month=card.exp_month,
        exp_year=card.exp_year,
        customer=_customer_of(method),
    )
