"""Payout details: per-method validation, masked hints, and no echo of planted values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from broker.core.errors import ValidationFailed
from broker.payments.payout import (
    MOBILE_MONEY_PROVIDERS,
    BankTransferDetails,
    MobileMoneyDetails,
    PayoutRequest,
    PayoutView,
    PayPalDetails,
    iban_checksum_valid,
    parse_details,
)


def rejected(method: str, details: Any) -> ValidationFailed:
    """The ValidationFailed that parse_details raises for these details."""
    with pytest.raises(ValidationFailed) as info:
        parse_details(method, details)
    return info.value


def error_fields(exc: ValidationFailed) -> list[str]:
    return [error["field"] for error in exc.extra["errors"]]


def everything_said(exc: ValidationFailed) -> str:
    """Every text a caller or a log line could see of the error."""
    return " ".join([str(exc), exc.message, repr(exc.extra), repr(exc.__cause__)])


# --- bank transfer ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("iban", "normalised", "hint"),
    [
        ("DE89370400440532013000", "DE89370400440532013000", "DE****3000"),
        ("DE89 3704 0044 0532 0130 00", "DE89370400440532013000", "DE****3000"),
        ("gb82 west 1234 5698 7654 32", "GB82WEST12345698765432", "GB****5432"),
        ("FR1420041010050500013M02606", "FR1420041010050500013M02606", "FR****2606"),
        ("NO9386011117947", "NO9386011117947", "NO****7947"),
    ],
)
def test_valid_iban(iban: str, normalised: str, hint: str) -> None:
    details = parse_details("bank_transfer", {"iban": iban, "bic": "deut de ff"})
    assert isinstance(details, BankTransferDetails)
    assert details.secret_values() == {"iban": normalised, "bic": "DEUTDEFF"}
    assert details.masked_hint() == hint


@pytest.mark.parametrize(
    "iban",
    [
        "DE89370400440532013001",  # checksum broken (last digit)
        "DE98370400440532013000",  # check digits swapped
        "DE8937040044053201300",  # one short for Germany
        "GB82WEST1234569876543299",  # too long for the UK
        "XX1234",  # too short for any country
        "D E",
        "DE89-3704-0044-0532-0130-0Ä",
    ],
)
def test_invalid_iban_is_refused_without_echo(iban: str) -> None:
    exc = rejected("bank_transfer", {"iban": iban})
    assert error_fields(exc) == ["details.iban"]
    assert exc.status == 422
    assert iban not in everything_said(exc)


def test_iban_checksum() -> None:
    assert iban_checksum_valid("GB82WEST12345698765432")
    assert not iban_checksum_valid("GB82WEST12345698765433")
    assert not iban_checksum_valid("GB82 WEST")


def test_account_number_with_bank_code() -> None:
    details = parse_details(
        "bank_transfer",
        {"account_number": "0123 4567 89", "bank_code": "20-00-00", "account_holder": " Jane Doe "},
    )
    assert isinstance(details, BankTransferDetails)
    assert details.secret_values() == {
        "account_number": "0123456789",
        "bank_code": "200000",
        "account_holder": "Jane Doe",
    }
    assert details.masked_hint() == "****6789"


@pytest.mark.parametrize(
    ("details", "field"),
    [
        (
            {
                "iban": "DE89370400440532013000",
                "account_number": "0123456789",
                "bank_code": "200000",
                "account_holder": "Jane",
            },
            "details",
        ),
        ({}, "details"),
        ({"bic": "DEUTDEFF"}, "details"),
        ({"account_number": "0123456789", "account_holder": "Jane"}, "details.bank_code"),
        ({"account_number": "0123456789", "bank_code": "200000"}, "details.account_holder"),
        ({"iban": "DE89370400440532013000", "bank_code": "200000"}, "details.bank_code"),
        ({"account_number": "12345", "bank_code": "200", "account_holder": "J"}, None),
        ({"account_number": "0123456789", "bank_code": "2!", "account_holder": "J"}, None),
        ({"iban": "DE89370400440532013000", "bic": "DEUT"}, "details.bic"),
        ({"iban": "DE89370400440532013000", "account_holder": ""}, "details.account_holder"),
        ({"iban": "DE89370400440532013000", "account_holder": "x" * 141}, None),
        ({"iban": "DE89370400440532013000", "routing": "021000021"}, "details.(field 2)"),
    ],
)
def test_bank_transfer_form_errors(details: dict[str, Any], field: str | None) -> None:
    exc = rejected("bank_transfer", details)
    if field is not None:
        assert field in error_fields(exc)
    assert all(f.startswith("details") for f in error_fields(exc))


def test_both_forms_error_names_the_fields() -> None:
    exc = rejected(
        "bank_transfer",
        {"iban": "DE89370400440532013000", "account_number": "0123456789", "bank_code": "200"},
    )
    message = exc.extra["errors"][0]["message"]
    assert "iban" in message
    assert "account_number" in message


# --- mobile money -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "provider", "normalised", "hint"),
    [
        ("+254712345678", "mpesa", "+254712345678", "+254******678"),
        ("+254 712-345-678", "MPESA", "+254712345678", "+254******678"),
        ("+233 24 123 4567", "mtn_momo", "+233241234567", "+233******567"),
        ("+447911123456", "other", "+447911123456", "+44*******456"),
        ("+14155552671", "other", "+14155552671", "+1*******671"),
    ],
)
def test_valid_mobile_money(phone: str, provider: str, normalised: str, hint: str) -> None:
    details = parse_details("mobile_money", {"phone": phone, "provider": provider})
    assert isinstance(details, MobileMoneyDetails)
    assert details.secret_values() == {"phone": normalised, "provider": provider.lower()}
    assert details.masked_hint() == hint


@pytest.mark.parametrize("provider", MOBILE_MONEY_PROVIDERS)
def test_every_listed_provider_is_accepted(provider: str) -> None:
    assert parse_details("mobile_money", {"phone": "+255712345678", "provider": provider})


@pytest.mark.parametrize(
    "phone", ["0712345678", "254712345678", "+0712345678", "+2547", "+2547123456789012", "+254abc"]
)
def test_non_e164_phone_is_refused_without_echo(phone: str) -> None:
    exc = rejected("mobile_money", {"phone": phone, "provider": "mpesa"})
    assert error_fields(exc) == ["details.phone"]
    assert phone not in everything_said(exc)


def test_unknown_provider_and_missing_phone() -> None:
    exc = rejected("mobile_money", {"provider": "venmo"})
    assert sorted(error_fields(exc)) == ["details.phone", "details.provider"]
    assert "mpesa" in exc.extra["errors"][1]["message"]


def test_account_name_is_kept_for_vault() -> None:
    details = parse_details(
        "mobile_money", {"phone": "+254712345678", "provider": "mpesa", "account_name": "Jane"}
    )
    assert details.secret_values()["account_name"] == "Jane"


# --- paypal -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "normalised", "hint"),
    [
        ("jane@example.com", "jane@example.com", "j***@example.com"),
        (
            "  Jane.Doe+payouts@Example.CO.KE ",
            "Jane.Doe+payouts@example.co.ke",
            "J***@example.co.ke",
        ),
    ],
)
def test_valid_paypal(email: str, normalised: str, hint: str) -> None:
    details = parse_details("paypal", {"email": email})
    assert isinstance(details, PayPalDetails)
    assert details.secret_values() == {"email": normalised}
    assert details.masked_hint() == hint


@pytest.mark.parametrize(
    "email",
    ["jane", "jane@", "@example.com", "jane@example", "ja ne@example.com", "jane..d@example.com",
     "jane@-example.com", "jane@example.123"],
)  # fmt: skip
def test_invalid_email_is_refused_without_echo(email: str) -> None:
    exc = rejected("paypal", {"email": email})
    assert error_fields(exc) == ["details.email"]
    assert email not in everything_said(exc)


def test_non_string_values_are_refused() -> None:
    exc = rejected("paypal", {"email": 12345678})
    assert error_fields(exc) == ["details.email"]
    assert "12345678" not in everything_said(exc)


# --- method and request -------------------------------------------------------------


def test_unknown_method() -> None:
    exc = rejected("cash", {})
    assert error_fields(exc) == ["method"]


def test_details_must_be_an_object() -> None:
    exc = rejected("paypal", ["jane@example.com"])
    assert error_fields(exc) == ["details"]


def test_payout_request_parses_its_details() -> None:
    request = PayoutRequest.model_validate(
        {"method": "paypal", "details": {"email": "canary-7f3a@example.com"}}
    )
    assert request.parsed().masked_hint() == "c***@example.com"
    assert "canary-7f3a" not in repr(request)
    with pytest.raises(ValidationError):
        PayoutRequest.model_validate({"method": "cheque", "details": {}})


def test_payout_view_holds_only_the_masked_hint() -> None:
    view = PayoutView(
        method="bank_transfer",
        hint="DE****3000",
        updated_at=datetime(2024, 6, 1, tzinfo=UTC),
        updated_by="user:42",
    )
    assert set(view.model_dump()) == {"method", "hint", "updated_at", "updated_by"}


# --- canaries -----------------------------------------------------------------------

CANARY_IBAN = "GB82WEST12345698765432"
CANARY_ACCOUNT = "CANARY0042424299"
CANARY_PHONE = "+254799887766"
CANARY_EMAIL = "canary.d41d8cd9@example.org"
CANARY_HOLDER = "Canary Holder Qx7"


def test_planted_values_never_appear_in_reprs_or_dumps() -> None:
    models = [
        parse_details("bank_transfer", {"iban": CANARY_IBAN, "account_holder": CANARY_HOLDER}),
        parse_details(
            "bank_transfer",
            {"account_number": CANARY_ACCOUNT, "bank_code": "200", "account_holder": CANARY_HOLDER},
        ),
        parse_details("mobile_money", {"phone": CANARY_PHONE, "provider": "mpesa"}),
        parse_details("paypal", {"email": CANARY_EMAIL}),
    ]
    for model in models:
        shown = " ".join([repr(model), str(model), model.model_dump_json(), model.masked_hint()])
        for canary in (CANARY_IBAN, CANARY_ACCOUNT, CANARY_PHONE, CANARY_EMAIL, CANARY_HOLDER):
            assert canary not in shown
        assert "766" not in models[2].masked_hint()[:-3]


@pytest.mark.parametrize(
    ("model", "details"),
    [
        (BankTransferDetails, {"iban": CANARY_IBAN[:-1] + "3", "account_number": CANARY_ACCOUNT}),
        (BankTransferDetails, {"iban": CANARY_IBAN, "account_number": CANARY_ACCOUNT}),
        (MobileMoneyDetails, {"phone": CANARY_PHONE + "12345", "provider": CANARY_EMAIL}),
        (PayPalDetails, {"email": CANARY_EMAIL + "@", "extra": CANARY_PHONE}),
    ],
)
def test_planted_values_never_appear_in_errors(model: Any, details: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(details)
    pydantic_text = str(info.value) + repr(info.value)
    method = {
        BankTransferDetails: "bank_transfer",
        MobileMoneyDetails: "mobile_money",
        PayPalDetails: "paypal",
    }[model]
    said = everything_said(rejected(method, details)) + pydantic_text
    for value in details.values():
        assert value not in said


# --- checked after normalisation: what is checked is what is sealed ---------------------


@pytest.mark.parametrize(
    ("method", "details", "field"),
    [
        (
            "bank_transfer",
            {"account_number": "4242\n4242\n4242\n4242", "bank_code": "021000021"},
            "account_number",
        ),
        (
            "bank_transfer",
            {"account_number": "\uff14\uff12\uff14\uff12" * 4, "bank_code": "021000021"},
            "account_number",
        ),
        (
            "bank_transfer",
            {"account_number": "1234567", "bank_code": "4242\u200b4242\u200b4242\u200b4242"},
            "bank_code",
        ),
        ("mobile_money", {"phone": "+378282246310005", "provider": "mpesa"}, "phone"),
        ("paypal", {"email": "4242424242424242@example.com"}, "email"),
    ],
    ids=["newlines", "fullwidth", "zero-width", "amex-after-plus", "email"],
)
def test_a_card_number_is_refused_in_any_payout_field(
    method: str, details: dict[str, str], field: str
) -> None:
    holder = {"account_holder": "Acme Ltd"} if method == "bank_transfer" else {}
    exc = rejected(method, {**details, **holder})
    assert error_fields(exc) == [f"details.{field}"]
    assert "looks like a card number" in exc.extra["errors"][0]["message"]
    assert "4242" not in everything_said(exc)


def test_a_card_number_in_the_account_holder_is_refused() -> None:
    exc = rejected(
        "bank_transfer",
        {"iban": "DE89370400440532013000", "account_holder": "Jane 4242 4242 4242 4242"},
    )
    assert error_fields(exc) == ["details.account_holder"]


def test_unicode_digits_are_sealed_as_ascii() -> None:
    phone = "+\u0662\u0665\u0664\u0667\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668"
    details = parse_details("mobile_money", {"phone": phone, "provider": "mpesa"})
    assert details.secret_values()["phone"] == "+254712345678"
