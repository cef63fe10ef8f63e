"""The one card detector: every notation of a card number is found, ordinary identifiers are not."""

from __future__ import annotations

import pytest

from broker.core.carddata import contains_card_number, normalise, redact_card_numbers
from broker.core.logging import REDACTED, redact_text
from tests.support.cards import AMEX, PAN, VARIANTS, grouped, in_digits


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_notation_of_a_card_number_is_found(text: str) -> None:
    assert contains_card_number(text)


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_notation_is_redacted_from_log_text_and_the_rest_kept(text: str) -> None:
    redacted = redact_text(f"refused {text} at the edge")
    assert REDACTED in redacted
    assert not contains_card_number(redacted)
    assert redacted.startswith("refused ")
    assert redacted.endswith(" at the edge")


URL_FORMS = {
    "percent-spaces": "/v1/x?q=4242%204242%204242%204242",
    "plus-spaces": "/v1/x?q=4242+4242+4242+4242",
    "percent-digits": "/v1/x?q=%34%32%34%32%34%32%34%32%34%32%34%32%34%32%34%32",
    "percent-fullwidth": "/v1/x?q=" + "".join(f"%EF%BC%9{c}" for c in "4242") + PAN[4:],
    "percent-nbsp": "/v1/x/" + "%C2%A0".join(grouped(PAN, " ").split()),
    "percent-plus": "/v1/x?phone=%2B" + PAN,
}


@pytest.mark.parametrize("line", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_card_numbers_in_encoded_urls_are_found_and_redacted(line: str) -> None:
    assert contains_card_number(line, url=True)
    logged = redact_text(f'127.0.0.1:5000 - "GET {line} HTTP/1.1" 422')
    assert REDACTED in logged
    assert "4242" not in logged
    assert "%34%32" not in logged
    assert logged.endswith(' HTTP/1.1" 422')


ORDINARY = {
    "luhn-invalid": "4242424242424241",
    "e164-phone": "+4915112345678",
    "e164-phone-spaced": "+254 712 345 678",
    "epoch-ms": "1718000000000",
    "iccid": "89014103211118510720",
    "iso-timestamp": "2024-06-01T23:34:56.123456+00:00",
    "compact-timestamp": "20240601233456",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "sha256": "a3f5c1b2d4e6f7089a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "twilio-sid": "AC" + "0123456789" * 3 + "ab",
    "hex-key": "9" * 24 + "deadbeef",
    "mongo-id": "507f1f77bcf86cd799439011",
    "span-id": "0b" + "4242424242424242"[2:],
    "stripe-id": "pm_1MqM05LkdIwHu7ixlDxxO6Mc",
    "iban-glued": "BE68539007547034",
    "iban-spaced": "DE89 3704 0044 0532 0130 00",
    "iban-letters": "GB82WEST12345698765432",
    "decimal": "36.8219123456789",
    "version-and-ip": "1.2.3 192.168.100.200:8080",
    "ip-and-port": "52.168.100.200:8443",
    "date-and-time": "30/11/2026 23:59:59.123456",
    "ipv6": "[2001:4860:4860::8888]:8443",
    "resolution": "1920:1080 3840:2160",
    "prose": "order 12345 for 2 items",
    "arabic-short": in_digits("2024", "\u0660"),
    "years-a-line": "2021\n2022\n2023\n2024\n2025",
    "uneven-lines": "4242\n4242\n4242  4242",
}


@pytest.mark.parametrize("text", ORDINARY.values(), ids=ORDINARY.keys())
def test_ordinary_identifiers_are_not_cards(text: str) -> None:
    assert not contains_card_number(text)
    assert redact_card_numbers(text, REDACTED) == text


def test_two_cards_in_one_line_are_both_redacted() -> None:
    redacted = redact_card_numbers(f"{PAN} and {grouped(AMEX, '.')} refused", "#")
    assert redacted == "# and # refused"


def test_normalise_folds_digits_and_drops_format_characters() -> None:
    assert normalise(in_digits("12 34", "\u0660") + "\u200b\uff15") == "12 345"
