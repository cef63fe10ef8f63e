"""A local Stripe-compatible server for what the broker calls, driven by the real SDK.

``FakeStripe`` runs a ``ThreadingHTTPServer`` on 127.0.0.1 (random port) and answers like
``https://api.stripe.com``: form-encoded bodies as the SDK sends them
(``metadata[tenant_id]=...``, ``allowed_payment_method_types[0]=card``), ``Authorization:
Bearer <secret key>``, Stripe's JSON objects and error objects, ``Request-Id`` headers,
``Idempotency-Key`` replay (``Idempotent-Replayed: true``; a reused key with other
parameters is a 400 ``idempotency_error``) and unknown parameters refused.

| method | path                                  |
| POST   | /v1/customers                         |
| GET    | /v1/customers/{id}                    |
| POST   | /v1/customers/{id}                    |
| GET    | /v1/payment_methods/{id}              |
| POST   | /v1/payment_methods/{id}/attach       |
| POST   | /v1/payment_methods/{id}/detach       |
| POST   | /v1/setup_intents                     |
| POST   | /v1/payment_methods                   | publishable key: what Stripe.js sends     |
| POST   | /v1/setup_intents/{id}/confirm        | publishable key and the client secret     |
| GET    | /v3/, /v3/elements/card(.js)          | Stripe.js stand-in (fakes/stripe_js.py)   |

Stripe behaviours kept on purpose, since the broker must cope with them:

* a payment method carries only the hash of its own type (``card`` only on cards);
* detaching is permanent: a detached method cannot be attached again;
* a card seeded with a ``decline_code`` fails ``attach`` with a 402 ``card_error``;
* from API version 2026-09-30 on, ``payment_method_types`` is read-only on SetupIntents
  (400 ``payment_method_types_no_longer_supported``); ``allowed_payment_method_types``
  replaces it;
* a deleted customer is answered with 200 and ``{"deleted": true}``;
* ``invoice_settings[default_payment_method]`` (the card Stripe Billing charges) must
  name a method attached to that customer, and detaching that method clears it; an
  empty string clears it too.

Failure modes: :meth:`FakeStripe.fail_next` (500, 503, 429 with ``Retry-After``...),
:meth:`FakeStripe.delay_next` (a slow Stripe), :meth:`FakeStripe.down` /
:meth:`FakeStripe.up` (hang up on every connection, or refuse connections outright).
Nothing is logged; the recorded requests hold no ``Authorization`` header.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import socket
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.stripe_js import ASSETS
from tests.support.loopback import LoopbackServer, QuietHandler

UPSTREAM_DETAIL = "fake-stripe-internal-detail-8d41"
"""Planted in every 5xx and 429 body, so tests can prove it never reaches the caller."""

DECLINE_MESSAGE = "Your card was declined."

_READ_ONLY_PMT_SINCE = "2026-09-30"
_ALNUM = string.ascii_letters + string.digits

_CUSTOMER_PARAMS = frozenset({"name", "email", "description", "phone", "metadata", "expand"})
_ATTACH_PARAMS = frozenset({"customer", "expand"})
_CUSTOMER_UPDATE_PARAMS = _CUSTOMER_PARAMS | {"invoice_settings"}
_INVOICE_SETTINGS_PARAMS = frozenset(
    {"custom_fields", "default_payment_method", "footer", "rendering_options"}
)
_SETUP_INTENT_PARAMS = frozenset(
    {
        "customer",
        "usage",
        "allowed_payment_method_types",
        "payment_method_types",
        "description",
        "metadata",
        "expand",
    }
)


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


def _error(status: int, type_: str, message: str, **fields: Any) -> _Answer:
    return _Answer(status, {"error": {"type": type_, "message": message, **fields}})


def _missing(kind: str, object_id: str, param: str) -> _Answer:
    return _error(
        404,
        "invalid_request_error",
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
        doc_url="https://stripe.com/docs/error-codes/resource-missing",
    )


def _unexpected_state(message: str) -> _Answer:
    return _error(400, "invalid_request_error", message, code="payment_method_unexpected_state")


def parse_form(text: str) -> dict[str, Any]:
    """Stripe's form encoding back into nested dicts and lists.

    ``metadata[tenant_id]=t`` becomes ``{"metadata": {"tenant_id": "t"}}`` and
    ``types[0]=card`` becomes ``{"types": ["card"]}``.
    """
    result: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        head, _, tail = key.partition("[")
        parts = [head, *re.findall(r"([^\[\]]*)\]", "[" + tail)] if tail else [head]
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    parsed: dict[str, Any] = _listify(result)
    return parsed


def _listify(node: dict[str, Any]) -> Any:
    items = {k: _listify(v) if isinstance(v, dict) else v for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


@dataclass(frozen=True)
class StripeRequest:
    """One request the fake received (never its ``Authorization`` header)."""

    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    stripe_version: str | None


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    status: int
    retry_after: str | None


class FakeStripe(LoopbackServer):
    """Stripe's API for customers, payment methods and SetupIntents; a context manager."""

    thread_name = "fake-stripe"

    def __init__(self, *, secret_key: str | None = None) -> None:
        super().__init__()
        # Made up at runtime, so no realistic-looking key is committed.
        self.secret_key = secret_key or "sk_test_" + secrets.token_hex(16)
        # What a browser's Stripe.js uses: it may only create payment methods and confirm
        # SetupIntents whose client secret it holds.
        self.publishable_key = "pk_test_" + secrets.token_hex(12)
        self.requests: list[StripeRequest] = []
        self._lock = threading.Lock()
        self._customers: dict[str, dict[str, Any]] = {}
        self._payment_methods: dict[str, dict[str, Any]] = {}
        self._setup_intents: dict[str, dict[str, Any]] = {}
        self._declines: dict[str, str] = {}
        self._detached: set[str] = set()
        self._idempotent: dict[str, tuple[tuple[str, str, str], _Answer]] = {}
        self._failures: list[_Failure] = []
        self._delays: list[float] = []
        self._hang_up = False
        self._holder: socket.socket | None = None

    def __repr__(self) -> str:
        return f"FakeStripe(port={self._port})"

    # ------------------------------------------------------------- lifecycle

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """Stripe's API, answered from this fake's state."""
        return _make_handler(self)

    def close(self) -> None:
        """Stop serving; delayed answers are abandoned and every handler thread joined."""
        super().close()
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    @property
    def js_url(self) -> str:
        """Where the Stripe.js stand-in is served (the fake's `https://js.stripe.com/v3/`)."""
        return f"{self.base_url}/v3/"

    # ------------------------------------------------------------- seeding

    def add_card(
        self,
        brand: str = "visa",
        last4: str = "4242",
        exp_month: int = 12,
        exp_year: int = 2030,
        decline_code: str | None = None,
    ) -> str:
        """A card payment method, unattached; with ``decline_code`` it fails ``attach``."""
        method = self._new_payment_method("card")
        method["card"] = {
            "brand": brand,
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": brand,
            "exp_month": exp_month,
            "exp_year": exp_year,
            "fingerprint": _random_id("", 16),
            "funding": "credit",
            "generated_from": None,
            "last4": last4,
            "networks": {"available": [brand], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        }
        with self._lock:
            self._payment_methods[method["id"]] = method
            if decline_code is not None:
                self._declines[method["id"]] = decline_code
        return str(method["id"])

    def add_non_card(self, type: str = "sepa_debit") -> str:  # noqa: A002 (Stripe's name)
        """A payment method of another type (a SEPA debit by default), unattached."""
        method = self._new_payment_method(type)
        method[type] = (
            {
                "bank_code": "37040044",
                "branch_code": "",
                "country": "DE",
                "fingerprint": _random_id("", 16),
                "generated_from": {"charge": None, "setup_attempt": None},
                "last4": "3000",
            }
            if type == "sepa_debit"
            else {}
        )
        with self._lock:
            self._payment_methods[method["id"]] = method
        return str(method["id"])

    def delete_customer(self, customer_id: str) -> None:
        """Delete a customer the way Stripe does (a tombstone remains retrievable)."""
        with self._lock:
            self._customers[customer_id] = {
                "id": customer_id,
                "object": "customer",
                "deleted": True,
            }
            for method in self._payment_methods.values():
                if method["customer"] == customer_id:
                    method["customer"] = None

    @staticmethod
    def _new_payment_method(type_: str) -> dict[str, Any]:
        return {
            "id": _random_id("pm_"),
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": {
                "address": {
                    "city": None,
                    "country": None,
                    "line1": None,
                    "line2": None,
                    "postal_code": None,
                    "state": None,
                },
                "email": None,
                "name": None,
                "phone": None,
                "tax_id": None,
            },
            "created": int(time.time()),
            "customer": None,
            "livemode": False,
            "metadata": {},
            "type": type_,
        }

    # ------------------------------------------------------------- failures

    def fail_next(self, status: int, times: int = 1, retry_after: int | str | None = None) -> None:
        """Answer the next ``times`` requests with ``status`` (and ``Retry-After``)."""
        shown = None if retry_after is None else str(retry_after)
        with self._lock:
            self._failures.extend(_Failure(status, shown) for _ in range(times))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Sleep before answering the next ``times`` requests (cut short on close)."""
        with self._lock:
            self._delays.extend([seconds] * times)

    def down(self, *, refuse: bool = False) -> None:
        """Stripe unreachable: hang up on every request, or (``refuse``) refuse connects.

        Refusing keeps the port bound but not listening, so a connect is answered with
        a reset (ECONNREFUSED) and no other process can take the port meanwhile.
        """
        if not refuse:
            with self._lock:
                self._hang_up = True
            return
        if self._holder is not None:
            return
        port = self._port
        self.unlisten()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        self._holder = holder

    def up(self) -> None:
        """Back from :meth:`down`, on the same port."""
        with self._lock:
            self._hang_up = False
        if self._holder is not None:
            self._holder.close()
            self._holder = None
            self.listen()

    # ------------------------------------------------------------- inspection

    @property
    def calls(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request received, failed ones too."""
        with self._lock:
            return [(r.method, r.path) for r in self.requests]

    @property
    def customers(self) -> dict[str, dict[str, Any]]:
        """A copy of the stored customers, by id."""
        with self._lock:
            return copy.deepcopy(self._customers)

    @property
    def payment_methods(self) -> dict[str, dict[str, Any]]:
        """A copy of the stored payment methods; ``["customer"]`` is the attachment."""
        with self._lock:
            return copy.deepcopy(self._payment_methods)

    @property
    def setup_intents(self) -> dict[str, dict[str, Any]]:
        """A copy of the stored SetupIntents, by id."""
        with self._lock:
            return copy.deepcopy(self._setup_intents)

    def default_payment_method(self, customer_id: str) -> str | None:
        """The customer's ``invoice_settings.default_payment_method``: the card Billing charges."""
        with self._lock:
            settings = self._customers[customer_id].get("invoice_settings") or {}
            return settings.get("default_payment_method")

    def set_default_payment_method(self, customer_id: str, payment_method_id: str | None) -> None:
        """Change the Billing default behind the broker's back (a dashboard edit)."""
        with self._lock:
            self._customers[customer_id]["invoice_settings"]["default_payment_method"] = (
                payment_method_id
            )

    def attached_to(self, payment_method_id: str) -> str | None:
        """The customer a payment method is attached to, if any."""
        with self._lock:
            customer: str | None = self._payment_methods[payment_method_id]["customer"]
            return customer

    # ------------------------------------------------------------- answering

    def _answer(
        self, method: str, target: str, headers: dict[str, str], body: str
    ) -> _Answer | None:
        """The response to one request, or None to hang up without answering."""
        split = urlsplit(target)
        path = split.path
        params = parse_form(body if method == "POST" else split.query)
        key = headers.get("idempotency-key") if method == "POST" else None
        version = headers.get("stripe-version")
        with self._lock:
            self.requests.append(StripeRequest(method, path, params, key, version))
            hang_up = self._hang_up
            failure = self._failures.pop(0) if self._failures else None
            delay = self._delays.pop(0) if self._delays else None
        if hang_up:
            return None
        if delay is not None and self.stopping.wait(delay):
            return None
        if failure is not None:
            return _failure_answer(failure)

        refused = self._authenticate(method, path, headers.get("authorization", ""))
        if refused is not None:
            return refused
        return self._answer_once(method, path, params, key, version)

    def _authenticate(self, method: str, path: str, authorization: str) -> _Answer | None:
        """Stripe's 401 for a missing, wrong or publishable-where-not-allowed key; else None."""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return _error(
                401,
                "invalid_request_error",
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        publishable = secrets.compare_digest(presented, self.publishable_key)
        if publishable and not _publishable_may(method, path):
            return _error(
                401,
                "invalid_request_error",
                "This API call cannot be made with a publishable API key. Please use a "
                "secret API key.",
            )
        if not publishable and not secrets.compare_digest(presented, self.secret_key):
            # Stripe masks all but the prefix and the last four characters.
            masked = presented[:8] + "*" * max(0, len(presented) - 12) + presented[-4:]
            return _error(401, "invalid_request_error", f"Invalid API Key provided: {masked}")
        return None

    def _answer_once(
        self, method: str, path: str, params: dict[str, Any], key: str | None, version: str | None
    ) -> _Answer:
        """The answer, or with an idempotency key seen before, the first answer replayed."""
        with self._lock:
            # One request at a time: keeps replay and state changes atomic, like
            # Stripe's lock on an idempotency key.
            fingerprint = (method, path, json.dumps(params, sort_keys=True))
            if key is not None and key in self._idempotent:
                first, answer = self._idempotent[key]
                if first != fingerprint:
                    return _error(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                    )
                return _Answer(
                    answer.status, answer.body, {**answer.headers, "Idempotent-Replayed": "true"}
                )
            answer = self._route(method, path, params, version)
            if key is not None:
                self._idempotent[key] = (fingerprint, answer)
            return answer

    def _route(
        self, method: str, path: str, params: dict[str, Any], version: str | None
    ) -> _Answer:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        match method, parts:
            case "POST", ["v1", "customers"]:
                return self._create_customer(params)
            case "GET", ["v1", "customers", customer_id]:
                return self._retrieve_customer(customer_id, params)
            case "POST", ["v1", "customers", customer_id]:
                return self._update_customer(customer_id, params)
            case "GET", ["v1", "payment_methods", pm_id]:
                return self._retrieve_payment_method(pm_id, params)
            case "POST", ["v1", "payment_methods", pm_id, "attach"]:
                return self._attach(pm_id, params)
            case "POST", ["v1", "payment_methods", pm_id, "detach"]:
                return self._detach(pm_id, params)
            case "POST", ["v1", "setup_intents"]:
                return self._create_setup_intent(params, version)
            case "POST", ["v1", "payment_methods"]:
                return self._create_card(params)
            case "POST", ["v1", "setup_intents", intent_id, "confirm"]:
                return self._confirm_setup_intent(intent_id, params)
        return _error(
            404,
            "invalid_request_error",
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    # Each handler below runs with self._lock held.

    def _create_customer(self, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, _CUSTOMER_PARAMS)) is not None:
            return refused
        customer = {
            "id": _random_id("cus_", 14),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(time.time()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": params.get("description"),
            "email": params.get("email"),
            "invoice_prefix": _random_id("", 8).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": params.get("metadata", {}),
            "name": params.get("name"),
            "phone": params.get("phone"),
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._customers[customer["id"]] = customer
        return _Answer(200, customer)

    def _retrieve_customer(self, customer_id: str, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, frozenset({"expand"}))) is not None:
            return refused
        customer = self._customers.get(customer_id)
        if customer is None:
            return _missing("customer", customer_id, "id")
        return _Answer(200, customer)

    def _not_attached(self, customer_id: str, pm_id: str | None) -> _Answer | None:
        """Stripe's refusal of a default payment method the customer does not have."""
        if pm_id is None:
            return None
        method = self._payment_methods.get(pm_id)
        if method is None:
            return _missing("PaymentMethod", pm_id, "invoice_settings[default_payment_method]")
        if method["customer"] != customer_id:
            return _error(
                400,
                "invalid_request_error",
                f"The customer does not have a payment method with the ID {pm_id}. "
                "The payment method must be attached to the customer.",
                code="resource_missing",
                param="invoice_settings[default_payment_method]",
            )
        return None

    def _update_customer(self, customer_id: str, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, _CUSTOMER_UPDATE_PARAMS)) is not None:
            return refused
        customer = self._customers.get(customer_id)
        if customer is None or customer.get("deleted"):
            return _missing("customer", customer_id, "id")
        invoice = params.get("invoice_settings", {})
        if not isinstance(invoice, dict):
            return _error(
                400,
                "invalid_request_error",
                "Invalid object",
                code="parameter_invalid_type",
                param="invoice_settings",
            )
        if (refused := _unknown(invoice, _INVOICE_SETTINGS_PARAMS)) is not None:
            return refused
        if "default_payment_method" in invoice:
            pm_id = invoice["default_payment_method"] or None
            if (refused := self._not_attached(customer_id, pm_id)) is not None:
                return refused
            customer["invoice_settings"]["default_payment_method"] = pm_id
        for name in ("name", "email", "description", "phone"):
            if name in params:
                customer[name] = params[name]
        if "metadata" in params:
            customer["metadata"] = {**customer["metadata"], **params["metadata"]}
        return _Answer(200, customer)

    def _retrieve_payment_method(self, pm_id: str, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, frozenset({"expand"}))) is not None:
            return refused
        method = self._payment_methods.get(pm_id)
        if method is None:
            return _missing("PaymentMethod", pm_id, "payment_method")
        return _Answer(200, method)

    def _attach(self, pm_id: str, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, _ATTACH_PARAMS)) is not None:
            return refused
        method = self._payment_methods.get(pm_id)
        if method is None:
            return _missing("PaymentMethod", pm_id, "payment_method")
        customer_id = params.get("customer")
        if not customer_id:
            return _error(
                400,
                "invalid_request_error",
                "Missing required param: customer.",
                code="parameter_missing",
                param="customer",
            )
        customer = self._customers.get(customer_id)
        if customer is None or customer.get("deleted"):
            return _missing("customer", customer_id, "customer")
        if pm_id in self._detached:
            return _unexpected_state(
                "This PaymentMethod was previously used without being attached to a "
                "Customer or was detached from a Customer, and may not be used again."
            )
        if method["customer"] not in (None, customer_id):
            return _unexpected_state(
                "The payment method you provided has already been attached to a customer."
            )
        decline_code = self._declines.get(pm_id)
        if decline_code is not None:
            return _error(
                402,
                "card_error",
                DECLINE_MESSAGE,
                code="card_declined",
                decline_code=decline_code,
                param="",
                doc_url="https://stripe.com/docs/error-codes/card-declined",
            )
        method["customer"] = customer_id
        return _Answer(200, method)

    def _detach(self, pm_id: str, params: dict[str, Any]) -> _Answer:
        if (refused := _unknown(params, frozenset({"expand"}))) is not None:
            return refused
        method = self._payment_methods.get(pm_id)
        if method is None:
            return _missing("PaymentMethod", pm_id, "payment_method")
        if method["customer"] is None:
            return _unexpected_state(
                "The payment method you provided is not attached to a customer so "
                "detachment is impossible."
            )
        owner = self._customers.get(method["customer"]) or {}
        invoice = owner.get("invoice_settings") or {}
        if invoice.get("default_payment_method") == pm_id:
            invoice["default_payment_method"] = None  # as Stripe does
        method["customer"] = None
        self._detached.add(pm_id)
        return _Answer(200, method)

    def _create_card(self, params: dict[str, Any]) -> _Answer:
        """What Stripe.js does with a typed card: a payment method, checked like Stripe does."""
        if (
            refused := _unknown(params, frozenset({"type", "card", "billing_details"}))
        ) is not None:
            return refused
        if params.get("type") != "card":
            return _error(400, "invalid_request_error", "Invalid type", param="type")
        card = params.get("card") or {}
        number = str(card.get("number", ""))
        if not (number.isdigit() and 13 <= len(number) <= 19 and _luhn(number)):
            return _card_error("incorrect_number", "Your card number is incorrect.", "number")
        month, year = str(card.get("exp_month", "")), str(card.get("exp_year", ""))
        if not (month.isdigit() and 1 <= int(month) <= 12):
            return _card_error(
                "invalid_expiry_month", "Your card's expiration month is invalid.", "exp_month"
            )
        if not (year.isdigit() and int(year) >= time.gmtime().tm_year):
            return _card_error(
                "invalid_expiry_year", "Your card's expiration year is invalid.", "exp_year"
            )
        cvc = str(card.get("cvc", ""))
        if not (cvc.isdigit() and len(cvc) in (3, 4)):
            return _card_error("invalid_cvc", "Your card's security code is invalid.", "cvc")
        method = self._new_payment_method("card")
        method["card"] = {
            "brand": _brand(number),
            "exp_month": int(month),
            "exp_year": int(year),
            "last4": number[-4:],
            "country": "US",
            "funding": "credit",
            "fingerprint": _random_id("", 16),
        }
        self._payment_methods[method["id"]] = method
        if number == DECLINED_CARD:
            self._declines[method["id"]] = "generic_decline"
        return _Answer(200, method)

    def _confirm_setup_intent(self, intent_id: str, params: dict[str, Any]) -> _Answer:
        """Confirm with a payment method: on success it is attached to the intent's customer."""
        allowed = frozenset({"payment_method", "client_secret", "expand", "return_url"})
        if (refused := _unknown(params, allowed)) is not None:
            return refused
        intent = self._setup_intents.get(intent_id)
        secret = str(params.get("client_secret", ""))
        if intent is None or not secrets.compare_digest(secret, intent["client_secret"]):
            return _missing("setup_intent", intent_id, "intent")
        pm_id = str(params.get("payment_method", ""))
        method = self._payment_methods.get(pm_id)
        if method is None:
            return _missing("PaymentMethod", pm_id, "payment_method")
        if pm_id in self._declines:
            return _error(
                402,
                "card_error",
                DECLINE_MESSAGE,
                code="card_declined",
                decline_code=self._declines[pm_id],
                setup_intent=intent,
            )
        if intent["customer"] is not None:
            method["customer"] = intent["customer"]
        intent["payment_method"] = pm_id
        intent["status"] = "succeeded"
        return _Answer(200, intent)

    def _create_setup_intent(self, params: dict[str, Any], version: str | None) -> _Answer:
        if (refused := _unknown(params, _SETUP_INTENT_PARAMS)) is not None:
            return refused
        if "payment_method_types" in params and (version or "") >= _READ_ONLY_PMT_SINCE:
            return _error(
                400,
                "invalid_request_error",
                "The `payment_method_types` parameter is no longer supported on this API "
                "version. Use `allowed_payment_method_types` instead.",
                code="payment_method_types_no_longer_supported",
                param="payment_method_types",
            )
        customer_id = params.get("customer")
        if customer_id is not None:
            customer = self._customers.get(customer_id)
            if customer is None or customer.get("deleted"):
                return _missing("customer", customer_id, "customer")
        usage = params.get("usage", "off_session")
        if usage not in ("on_session", "off_session"):
            return _error(
                400,
                "invalid_request_error",
                "Invalid usage: must be one of on_session or off_session",
                code="parameter_invalid_string",
                param="usage",
            )
        intent = _new_setup_intent(params, customer_id, usage)
        intent_id = intent["id"]
        self._setup_intents[intent_id] = intent
        return _Answer(200, intent)


def _new_setup_intent(
    params: dict[str, Any], customer_id: str | None, usage: str
) -> dict[str, Any]:
    """A SetupIntent object as Stripe creates it, awaiting its payment method."""
    allowed = params.get("allowed_payment_method_types")
    types = allowed or params.get("payment_method_types") or ["card"]
    intent_id = _random_id("seti_")
    intent = {
        "id": intent_id,
        "object": "setup_intent",
        "allowed_payment_method_types": allowed,
        "application": None,
        "automatic_payment_methods": None,
        "cancellation_reason": None,
        "client_secret": f"{intent_id}_secret_{_random_id('', 24)}",
        "created": int(time.time()),
        "customer": customer_id,
        "description": params.get("description"),
        "excluded_payment_method_types": None,
        "flow_directions": None,
        "last_setup_error": None,
        "latest_attempt": None,
        "livemode": False,
        "mandate": None,
        "metadata": params.get("metadata", {}),
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": None,
        "payment_method_options": {
            "card": {
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": types,
        "single_use_mandate": None,
        "status": "requires_payment_method",
        "usage": usage,
    }
    return intent


def _publishable_may(method: str, path: str) -> bool:
    """What a publishable key may do here: create a card, confirm a SetupIntent."""
    parts = path.strip("/").split("/")
    return method == "POST" and (
        parts == ["v1", "payment_methods"]
        or (len(parts) == 4 and parts[:2] == ["v1", "setup_intents"] and parts[3] == "confirm")
    )


def _luhn(number: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _brand(number: str) -> str:
    if number.startswith("4"):
        return "visa"
    if number[:2] in {"51", "52", "53", "54", "55"} or "2221" <= number[:4] <= "2720":
        return "mastercard"
    if number[:2] in {"34", "37"}:
        return "amex"
    return "unknown"


# Stripe's test card that is declined when it is used (attached or confirmed).
DECLINED_CARD = "4000000000000002"


def _card_error(code: str, message: str, param: str) -> _Answer:
    return _error(402, "card_error", message, code=code, param=param)


def _unknown(params: dict[str, Any], allowed: frozenset[str]) -> _Answer | None:
    extra = sorted(set(params) - allowed)
    if not extra:
        return None
    return _error(
        400,
        "invalid_request_error",
        f"Received unknown parameter: {extra[0]}",
        code="parameter_unknown",
        param=extra[0],
    )


def _failure_answer(failure: _Failure) -> _Answer:
    headers = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
    if failure.status == 429:
        answer = _error(
            429,
            "invalid_request_error",
            "Request rate limit exceeded. Learn more about rate limits here "
            f"https://stripe.com/docs/rate-limits. ({UPSTREAM_DETAIL})",
            code="rate_limit",
        )
    else:
        answer = _error(
            failure.status,
            "api_error",
            f"Sorry, something went wrong on Stripe's end. ({UPSTREAM_DETAIL})",
        )
    return _Answer(answer.status, answer.body, headers)


class _Handler(QuietHandler):
    """Stripe's API and Stripe.js; `fake` is the FakeStripe whose state answers."""

    protocol_version = "HTTP/1.1"
    timeout = 5  # a client that never sends its request cannot pin the thread
    fake: ClassVar[FakeStripe]

    def do_GET(self) -> None:
        asset = ASSETS.get(self.path.split("?", 1)[0])
        if asset is not None:
            self.answer(200, asset[1].encode(), {"Content-Type": asset[0]})
        else:
            self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        answer = self.fake._answer(method, self.path, headers, body)
        self.close_connection = True
        if answer is None:
            return  # hang up without a word
        sent = {"Content-Type": "application/json", "Request-Id": _random_id("req_", 14)}
        if "stripe-version" in headers:
            sent["Stripe-Version"] = headers["stripe-version"]
        self.answer(answer.status, json.dumps(answer.body).encode(), sent | answer.headers)


def _make_handler(fake: FakeStripe) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": fake})
