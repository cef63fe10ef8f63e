"""CardDataGuard: raw card data is refused before any route sees it, and never echoed or logged."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient

from broker.core.http import Metrics, RequestContextMiddleware
from broker.payments.guard import (
    DETAIL,
    MAX_INSPECTED_BYTES,
    TITLE,
    CardDataGuard,
    find_card_data,
    luhn_valid,
)
from tests.support.cards import VARIANTS

REQUEST_ID = "guard-test-request"

# Well-known test PANs: Visa, Mastercard, Amex (15 digits), Discover, Visa
# debit, and a 19-digit UnionPay.
TEST_PANS = [
    "4242424242424242",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "4000056655665556",
    "6205500000000000004",
]


def spaced(pan: str, sep: str = " ") -> str:
    """The PAN grouped in fours, as printed on a card."""
    return sep.join(pan[i : i + 4] for i in range(0, len(pan), 4))


@dataclass
class GuardedApp:
    """A tiny app behind the guard, and what its route received."""

    client: TestClient
    calls: list[bytes] = field(default_factory=list)

    def post(self, path: str = "/echo", **kwargs: Any) -> Any:
        headers = {"x-request-id": REQUEST_ID, **kwargs.pop("headers", {})}
        return self.client.post(path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, headers={"x-request-id": REQUEST_ID}, **kwargs)


def make_guarded_app(**guard_options: Any) -> Iterator[GuardedApp]:
    """FastAPI app wrapped as the broker wraps it: request context outside, guard inside."""
    app = FastAPI()
    state = GuardedApp(client=TestClient(app))

    @app.api_route("/echo", methods=["GET", "POST", "PUT"])
    async def echo(request: Request) -> Response:
        body = await request.body()
        state.calls.append(body)
        return Response(body, media_type="application/octet-stream")

    app.add_middleware(CardDataGuard, **guard_options)
    app.add_middleware(RequestContextMiddleware, metrics=Metrics(), trusted_proxies=[])
    with state.client:
        yield state


@pytest.fixture
def guarded() -> Iterator[GuardedApp]:
    yield from make_guarded_app()


def assert_refused(response: Any, app: GuardedApp, *secrets: str) -> None:
    """422 problem+json with the fixed text, the route never called, no secret echoed."""
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": TITLE,
        "status": 422,
        "detail": DETAIL,
        "request_id": REQUEST_ID,
    }
    assert app.calls == []
    for secret in secrets:
        assert secret not in response.text
        assert secret.replace(" ", "").replace("-", "") not in response.text


# --- card numbers in bodies -------------------------------------------------------


@pytest.mark.parametrize("pan", TEST_PANS)
def test_pan_in_json_string_is_refused(guarded: GuardedApp, pan: str) -> None:
    response = guarded.post(json={"note": pan})
    assert_refused(response, guarded, pan)


@pytest.mark.parametrize(
    "payload",
    [
        {"customer": {"billing": {"notes": ["hello", {"deep": "4242424242424242"}]}}},
        {"items": [1, 2, "x", ["5555 5555 5555 4444"]]},
        {"amount": 4242424242424242},
        {"amount": 4242424242424242.0},
        [{"card": "4242-4242-4242-4242"}],
        {"pasted": "card 4242 4242 4242 4242 exp 12/29 cvc 123"},
        {"amex": "3782 822463 10005"},
        {"4242424242424242": "the number as a key"},
    ],
    ids=[
        "nested",
        "in-list-spaced",
        "json-number",
        "json-float",
        "dashed",
        "in-prose",
        "amex-4-6-5",
        "as-key",
    ],
)
def test_pan_anywhere_in_json_is_refused(guarded: GuardedApp, payload: Any) -> None:
    response = guarded.post(json=payload)
    assert_refused(response, guarded, "4242424242424242", "5555555555554444", "378282246310005")


def test_pan_in_a_duplicated_json_key_is_refused(guarded: GuardedApp) -> None:
    # A parser keeps the last duplicate; the guard must still see the first.
    body = b'{"note": "4242424242424242", "note": "harmless"}'
    response = guarded.post(content=body, headers={"content-type": "application/json"})
    assert_refused(response, guarded, "4242424242424242")


@pytest.mark.parametrize("pan", ["4242424242424242", "4242 4242 4242 4242", "6011-1111-1111-1117"])
def test_pan_in_form_body_is_refused(guarded: GuardedApp, pan: str) -> None:
    response = guarded.post(data={"description": pan, "amount": "10"})
    assert_refused(response, guarded, pan)


def test_pan_in_multipart_body_is_refused(guarded: GuardedApp) -> None:
    files = {"upload": ("cards.csv", b"name,number\nJane,4000056655665556\n", "text/csv")}
    response = guarded.post(files=files)
    assert_refused(response, guarded, "4000056655665556")


@pytest.mark.parametrize("pan", ["4242424242424242", "4242 4242 4242 4242"])
def test_pan_in_query_string_is_refused(guarded: GuardedApp, pan: str) -> None:
    response = guarded.get("/echo", params={"q": pan})
    assert_refused(response, guarded, pan)


def test_pan_in_text_plain_is_refused(guarded: GuardedApp) -> None:
    body = "please charge 5555-5555-5555-4444 for the order"
    response = guarded.post(content=body, headers={"content-type": "text/plain"})
    assert_refused(response, guarded, "5555-5555-5555-4444")


def test_pan_in_invalid_json_is_caught_by_raw_text(guarded: GuardedApp) -> None:
    body = b'{"note": "4242424242424242", oops'
    response = guarded.post(content=body, headers={"content-type": "application/json"})
    assert_refused(response, guarded, "4242424242424242")


def test_pan_in_body_without_content_type_is_refused(guarded: GuardedApp) -> None:
    response = guarded.post(content=b'{"n": 378282246310005}')
    assert_refused(response, guarded, "378282246310005")


def test_pan_in_a_get_body_is_refused(guarded: GuardedApp) -> None:
    response = guarded.client.request(
        "GET",
        "/echo",
        content=b'{"n": "4242424242424242"}',
        headers={"x-request-id": REQUEST_ID, "content-type": "application/json"},
    )
    assert_refused(response, guarded, "4242424242424242")


# --- sensitive field names --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "card_number",
        "cardNumber",
        "card-number",
        "CARD_NUMBER",
        "cc_number",
        "pan",
        "PAN",
        "cvc",
        "CVV",
        "cvv2",
        "cvc2",
        "security_code",
        "securityCode",
        "pin",
        "Pin",
    ],
)
def test_sensitive_field_name_in_json_is_refused(guarded: GuardedApp, name: str) -> None:
    response = guarded.post(json={"payment": {name: "9731"}})
    assert_refused(response, guarded, "9731")


@pytest.mark.parametrize("name", ["cvc", "card[cvc]", "card[number]", "pin", "card-number"])
def test_sensitive_field_name_in_form_is_refused(guarded: GuardedApp, name: str) -> None:
    response = guarded.post(data={name: "9731", "amount": "10"})
    assert_refused(response, guarded, "9731")


def test_sensitive_field_name_in_multipart_is_refused(guarded: GuardedApp) -> None:
    response = guarded.post(data={"cvv": "9731"}, files={"f": ("a.txt", b"hello", "text/plain")})
    assert_refused(response, guarded, "9731")


def test_sensitive_field_name_in_query_is_refused(guarded: GuardedApp) -> None:
    response = guarded.get("/echo", params={"cvv": "9731"})
    assert_refused(response, guarded, "9731")


# --- what passes through ------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "123e4567-e89b-12d3-a456-426614174000"},
        {"id": "12345678-1234-1234-1234-123456789012"},
        {"at": "2024-06-01T12:34:56.123456+00:00"},
        {"at": "2024-06-01 12:34:56"},
        {"phone": "+254712345678"},
        {"phone": "+4915112345678"},
        {"phone": "+254 712 345 678"},
        {"ref": "4242424242424241"},
        {"ref": 4242424242424241},
        {"epoch_ms": 1718000000000},
        {"sha": "a3f5c1b2d4e6f7089a1b2c3d4e5f60718293a4b5c6d7e8f9"},
        {"payment_method": "pm_1MqM05LkdIwHu7ixlDxxO6Mc"},
        {"twilio": "AC" + "0123456789" * 3 + "ab", "token": "9" * 24 + "deadbeef"},
        {"iban": "BE68539007547034", "spaced": "DE89 3704 0044 0532 0130 00"},
        {"mongo_id": "507f1f77bcf86cd799439011", "at": "2024-06-01T23:34:56.123456+00:00"},
        {"price": "36.8219123456789", "version": "1.2.3", "ip": "192.168.100.200:8080"},
        {"pinned": True, "company": "Acme", "spinner": "x", "span": 2, "pane": 1},
        {"pin_code_hint": "set", "card_brand": "visa", "last4": "4242"},
        {"amount": 1999, "currency": "kes", "note": "order 12345 for 2 items"},
    ],
)
def test_clean_json_passes_through_byte_identical(guarded: GuardedApp, payload: Any) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    response = guarded.post(content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.content == body
    assert guarded.calls == [body]


def test_clean_form_and_binary_bodies_pass_through(guarded: GuardedApp) -> None:
    form = guarded.post(data={"company": "Acme", "pinned": "yes"})
    assert form.status_code == 200
    assert form.content == b"company=Acme&pinned=yes"
    binary = bytes(range(256)) * 64
    raw = guarded.post(content=binary, headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200
    assert raw.content == binary
    assert guarded.calls == [b"company=Acme&pinned=yes", binary]


def test_streamed_body_is_replayed_whole(guarded: GuardedApp) -> None:
    chunks = [b'{"a": "', b"x" * 70_000, b'", "b": 1}']
    response = guarded.post(content=iter(chunks), headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.content == b"".join(chunks)


def test_clean_query_passes(guarded: GuardedApp) -> None:
    response = guarded.get("/echo", params={"page": "2", "since": "2024-06-01T00:00:00Z"})
    assert response.status_code == 200
    assert guarded.calls == [b""]


# --- size cap -----------------------------------------------------------------------


def test_body_over_the_cap_is_refused_with_413() -> None:
    for app in make_guarded_app(max_body_bytes=1024):
        response = app.post(content=b"x" * 1025, headers={"content-type": "text/plain"})
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert app.calls == []
        # Streamed without a Content-Length, the cap still holds.
        streamed = app.post(content=iter([b"x" * 600, b"x" * 600]))
        assert streamed.status_code == 413
        assert app.calls == []
        at_cap = app.post(content=b"x" * 1024, headers={"content-type": "text/plain"})
        assert at_cap.status_code == 200


def test_default_cap_is_one_mebibyte(guarded: GuardedApp) -> None:
    assert guarded.post(content=b"x" * (1024 * 1024)).status_code == 200
    assert guarded.post(content=b"x" * (1024 * 1024 + 1)).status_code == 413


# --- logging --------------------------------------------------------------------------


def test_refusal_logs_method_and_kind_but_never_the_value_or_the_path(
    guarded: GuardedApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    guarded.post(json={"note": "4242 4242 4242 4242"})
    guarded.post(json={"cvc": "9731"})
    guarded.get("/echo/4242424242424242")

    warnings = [r for r in caplog.records if r.name == "broker.payments.guard"]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 3
    assert [r.fields["hit"] for r in warnings] == [  # type: ignore[attr-defined]
        "card_number",
        "sensitive_field:cvc",
        "card_number",
    ]
    assert [r.fields["method"] for r in warnings] == ["POST", "POST", "GET"]  # type: ignore[attr-defined]
    assert all("path" not in r.fields for r in warnings)  # type: ignore[attr-defined]
    # httpx is the test's own client logging the URL it requested; every
    # record the server side writes must be clean.
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    everything = "".join(r.getMessage() + repr(r.__dict__) for r in server)
    for secret in ("4242424242424242", "4242 4242 4242 4242", "9731"):
        assert secret not in everything


# --- the detector itself ----------------------------------------------------------


@pytest.mark.parametrize("pan", TEST_PANS)
def test_test_pans_are_luhn_valid(pan: str) -> None:
    assert luhn_valid(pan)
    assert not luhn_valid(pan[:-1] + str((int(pan[-1]) + 1) % 10))


@pytest.mark.parametrize("value", ["", "abc", "4242 4242", "٤٢٤٢"])
def test_luhn_rejects_non_digits(value: str) -> None:
    assert not luhn_valid(value)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (spaced("4242424242424242"), "card_number"),
        (spaced("6205500000000000004", "-"), "card_number"),
        ({"a": [{"b": (4242424242424242,)}]}, "card_number"),
        ({"Card Number": None}, "sensitive_field:cardnumber"),
        ({"x": {"CVV2": ""}}, "sensitive_field:cvv2"),
        ({"payment_method_data[card][number]": "x"}, "sensitive_field:cardnumber"),
        ({"pinned": 1, "company": 2, "spinner": 3, "pan_id": 4}, None),
        ("4242424242424241", None),
        ("+4242424242424242", "card_number"),
        ("+4915112345678", None),
        ("1234567890123", None),
        ("89014103211118510720", None),
        ("x4242424242424242y", "card_number"),
        (True, None),
        (None, None),
    ],
)
def test_find_card_data(obj: Any, expected: str | None) -> None:
    assert find_card_data(obj) == expected


# --- every notation, everywhere (one detector for the guard and the logs) ---------------


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_notation_of_a_card_in_a_body_is_refused(guarded: GuardedApp, text: str) -> None:
    assert_refused(guarded.post(json={"note": text}), guarded)
    assert_refused(guarded.post(data={"note": text}), guarded)


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_notation_of_a_card_in_a_query_is_refused(guarded: GuardedApp, text: str) -> None:
    assert_refused(guarded.get("/echo", params={"q": text}), guarded)


@pytest.mark.parametrize(
    "path",
    ["/echo/4242+4242+4242+4242", "/echo/4242.4242.4242.4242", "/echo/card4242424242424242"],
)
def test_card_in_the_path_is_refused(guarded: GuardedApp, path: str) -> None:
    assert_refused(guarded.get(path), guarded)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-request-id", "4242424242424242"),
        ("x-request-id", "req-4242-4242-4242-4242"),
        ("x-note", "4242 4242 4242 4242"),
        ("user-agent", ("client/1.0 (" + VARIANTS["arabic-indic"] + ")").encode()),
        ("x-card", "%34%32%34%32%34%32%34%32%34%32%34%32%34%32%34%32"),
        ("cvc", "123"),
    ],
)
def test_card_data_in_a_header_is_refused_and_not_echoed(
    guarded: GuardedApp, name: str, value: str | bytes
) -> None:
    response = guarded.client.get("/echo", headers={name: value})
    assert response.status_code == 422
    assert response.json()["title"] == TITLE
    assert guarded.calls == []
    # The refused request id is not echoed either: a fresh one names the request.
    assert "4242" not in response.headers["x-request-id"]
    assert "4242" not in response.text


def test_ordinary_headers_pass(guarded: GuardedApp) -> None:
    response = guarded.client.get(
        "/echo",
        headers={
            "x-request-id": "req-2024-06-01-000123",
            "authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl",
            "if-match": '"42"',
            "user-agent": "python-httpx/0.27.0",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-4242424242424242-01",
            "x-datadog-trace-id": "4242424242424242",
            "x-b3-spanid": "a3ce929d0e0e4736",
        },
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-2024-06-01-000123"


def test_a_header_seen_clean_does_not_let_a_card_through_later(guarded: GuardedApp) -> None:
    """Clean headers are remembered (by digest) and not inspected again; a card is always
    inspected, under a name seen clean before or not, and refused every time."""
    for _ in range(2):
        clean = guarded.client.get("/echo", headers={"x-note": "order 4242"})
        assert clean.status_code == 200
    for _ in range(2):
        refused = guarded.client.get("/echo", headers={"x-note": "4242 4242 4242 4242"})
        assert refused.status_code == 422
        assert "4242" not in refused.text
    assert len(guarded.calls) == 2


# --- cost --------------------------------------------------------------------------------

# Far above what the inspection takes (about a second on a busy CI core), far below what a
# detector that is quadratic in the number of digit groups took (minutes).
INSPECTION_BUDGET_S = 30


@pytest.mark.parametrize(
    "body",
    [
        "1234 5678 9012 " * 69905,
        "DE89 3704 0044 0532 0130 00 " * 37449,
        "a3f5c1b2d4e6f7089a1b2c3d4e5f6071 " * 31775,
        "\u00e9 1234 5678 " * 80659,
    ],
    ids=["digit-groups", "ibans", "hex-tokens", "non-ascii"],
)
def test_a_full_size_body_is_inspected_within_the_budget(guarded: GuardedApp, body: str) -> None:
    raw = body.encode()[: MAX_INSPECTED_BYTES - 16]
    started = time.monotonic()
    response = guarded.post(content=raw, headers={"content-type": "text/plain"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < INSPECTION_BUDGET_S
