"""Payout details: validated per method, sealed in Vault, shown only as a masked hint.

`PUT /v1/tenants/settings/payout` takes `{method, details}`. The details (an
IBAN, an account number, a phone, an email) are the tenant's secrets: they are
carried as `SecretStr`, sealed with the tenant's Transit key, and PostgreSQL
keeps only the method and `masked_hint()`.

No message produced here repeats a value the caller sent: pydantic's own
errors carry the input, so every check raises a `PydanticCustomError` with a
fixed text, the models hide input from their error reprs, and `parse_details`
keeps only the field and the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from broker.core.carddata import contains_card_number, normalise
from broker.core.carddata import iban_checksum_valid as iban_checksum_valid  # one mod-97 check
from broker.core.errors import ValidationFailed, error_location, unknown_field_message

PayoutMethod: TypeAlias = Literal["bank_transfer", "mobile_money", "paypal"]
MobileMoneyProvider: TypeAlias = Literal[
    "mpesa", "mtn_momo", "airtel_money", "orange_money", "tigo_pesa", "ecocash", "other"
]
PAYOUT_METHODS: Final[tuple[str, ...]] = get_args(PayoutMethod)
MOBILE_MONEY_PROVIDERS: Final[tuple[str, ...]] = get_args(MobileMoneyProvider)

# IBAN lengths from the SWIFT IBAN registry. A country missing here is held to
# the ISO 13616 bounds (15..34) and the checksum only.
IBAN_LENGTHS: Final[Mapping[str, int]] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

_IBAN_SHAPE = re.compile(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$")
_BIC = re.compile(r"^[A-Z]{6}[A-Z0-9]{2}([A-Z0-9]{3})?$")
_ACCOUNT_NUMBER = re.compile(r"^[A-Z0-9]{6,34}$")
_BANK_CODE = re.compile(r"^[A-Z0-9]{3,20}$")
_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SPACES_DASHES = re.compile(r"[\s-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# E.164 country codes: 1 and 7 are one digit, these are two, all others three.
_TWO_DIGIT_COUNTRY_CODES: Final = frozenset(
    "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 "
    "60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98".split()
)


def _plain(value: Any, field: str) -> str:
    """The normalised text of a submitted value; a type error that does not repeat the value.

    Normalised (NFKC, every Unicode digit as ASCII, no zero-width characters) before any
    check, so that what is checked is what is sealed.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "{field} must be a string", {"field": field})
    return normalise(value)


def _invalid(field: str, message: str) -> PydanticCustomError:
    # The message names the field and the rule, never the value.
    return PydanticCustomError("payout_invalid", message, {"field": field})


def _name(value: Any, field: str) -> str:
    text = _plain(value, field).strip()
    if not 1 <= len(text) <= 140 or _CONTROL.search(text):
        raise _invalid(field, "{field} must be 1 to 140 characters, without control characters")
    return text


def _last(value: str, count: int) -> str:
    return value[-count:] if len(value) > count else ""


class _Details(BaseModel):
    # hide_input_in_errors keeps the submitted values out of str(ValidationError).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    def secret_values(self) -> dict[str, str]:
        """The plain values, for sealing in Vault."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _no_card_number(self) -> Any:
        # PCI DSS 3.4.1: checked on the values as they will be sealed, separators stripped,
        # so "4242 4242\t4242 4242" cannot become a bare card number in Vault.
        for field, value in self.secret_values().items():
            if contains_card_number(value):
                raise _invalid(
                    field, "{field} looks like a card number; card numbers are not accepted"
                )
        return self


class BankTransferDetails(_Details):
    """An IBAN (with optional BIC), or an account number with its bank code."""

    iban: SecretStr | None = None
    bic: str | None = None
    account_number: SecretStr | None = None
    bank_code: str | None = None
    account_holder: SecretStr | None = None

    @field_validator("iban", mode="before")
    @classmethod
    def _check_iban(cls, value: Any) -> str | None:
        if value is None:
            return None
        iban = _SPACES_DASHES.sub("", _plain(value, "iban")).upper()
        if not _IBAN_SHAPE.match(iban):
            raise _invalid(
                "iban", "iban must be a country code, 2 check digits and 11 to 30 letters or digits"
            )
        expected = IBAN_LENGTHS.get(iban[:2])
        if expected is not None and len(iban) != expected:
            raise _invalid("iban", "iban has the wrong length for its country")
        if iban[2:4] in ("00", "01", "99") or not iban_checksum_valid(iban):
            raise _invalid("iban", "iban check digits do not match (mistyped?)")
        return iban

    @field_validator("bic", mode="before")
    @classmethod
    def _check_bic(cls, value: Any) -> str | None:
        if value is None:
            return None
        bic = _SPACES_DASHES.sub("", _plain(value, "bic")).upper()
        if not _BIC.match(bic):
            raise _invalid("bic", "bic must be 8 or 11 letters and digits (a SWIFT code)")
        return bic

    @field_validator("account_number", mode="before")
    @classmethod
    def _check_account_number(cls, value: Any) -> str | None:
        if value is None:
            return None
        number = _SPACES_DASHES.sub("", _plain(value, "account_number")).upper()
        if not _ACCOUNT_NUMBER.match(number):
            raise _invalid("account_number", "account_number must be 6 to 34 letters or digits")
        return number

    @field_validator("bank_code", mode="before")
    @classmethod
    def _check_bank_code(cls, value: Any) -> str | None:
        if value is None:
            return None
        code = _SPACES_DASHES.sub("", _plain(value, "bank_code")).upper()
        if not _BANK_CODE.match(code):
            raise _invalid("bank_code", "bank_code must be 3 to 20 letters or digits")
        return code

    @field_validator("account_holder", mode="before")
    @classmethod
    def _check_account_holder(cls, value: Any) -> str | None:
        return None if value is None else _name(value, "account_holder")

    @model_validator(mode="after")
    def _one_form(self) -> BankTransferDetails:
        if (self.iban is None) == (self.account_number is None):
            raise PydanticCustomError(
                "payout_form",
                "send either iban (with optional bic) or account_number with bank_code, "
                "exactly one of the two",
            )
        if self.iban is not None and self.bank_code is not None:
            raise _invalid("bank_code", "bank_code goes with account_number, not with iban")
        if self.account_number is not None:
            if self.bank_code is None:
                raise _invalid("bank_code", "bank_code is required with account_number")
            if self.account_holder is None:
                raise _invalid("account_holder", "account_holder is required with account_number")
        return self

    def secret_values(self) -> dict[str, str]:
        """The plain values, for sealing in Vault."""
        values = {
            "iban": self.iban.get_secret_value() if self.iban else None,
            "bic": self.bic,
            "account_number": (
                self.account_number.get_secret_value() if self.account_number else None
            ),
            "bank_code": self.bank_code,
            "account_holder": (
                self.account_holder.get_secret_value() if self.account_holder else None
            ),
        }
        return {key: value for key, value in values.items() if value is not None}

    def masked_hint(self) -> str:
        """An IBAN's country code and last 4 ("DE****3000"), or "****6789"."""
        if self.iban is not None:
            iban = self.iban.get_secret_value()
            return f"{iban[:2]}****{_last(iban, 4)}"
        number = self.account_number.get_secret_value() if self.account_number else ""
        return f"****{_last(number, 4)}"


class MobileMoneyDetails(_Details):
    """An E.164 phone number and the mobile money provider behind it."""

    phone: SecretStr
    provider: MobileMoneyProvider
    account_name: SecretStr | None = None

    @field_validator("phone", mode="before")
    @classmethod
    def _check_phone(cls, value: Any) -> str:
        phone = _SPACES_DASHES.sub("", _plain(value, "phone"))
        if not _E164.match(phone):
            raise _invalid("phone", "phone must be in E.164 form: +, country code, 8 to 15 digits")
        return phone

    @field_validator("provider", mode="before")
    @classmethod
    def _check_provider(cls, value: Any) -> str:
        provider = _plain(value, "provider").strip().lower()
        if provider not in MOBILE_MONEY_PROVIDERS:
            raise PydanticCustomError(
                "payout_invalid",
                "provider must be one of {allowed}",
                {"field": "provider", "allowed": ", ".join(MOBILE_MONEY_PROVIDERS)},
            )
        return provider

    @field_validator("account_name", mode="before")
    @classmethod
    def _check_account_name(cls, value: Any) -> str | None:
        return None if value is None else _name(value, "account_name")

    def secret_values(self) -> dict[str, str]:
        """The plain values, for sealing in Vault."""
        values = {"phone": self.phone.get_secret_value(), "provider": self.provider}
        if self.account_name is not None:
            values["account_name"] = self.account_name.get_secret_value()
        return values

    def masked_hint(self) -> str:
        """The country code and the last three digits: "+254******678"."""
        digits = self.phone.get_secret_value()[1:]
        if digits[0] in "17":
            code_length = 1
        elif digits[:2] in _TWO_DIGIT_COUNTRY_CODES:
            code_length = 2
        else:
            code_length = 3
        rest = digits[code_length:]
        return f"+{digits[:code_length]}{'*' * (len(rest) - 3)}{rest[-3:]}"


class PayPalDetails(_Details):
    """The email address of the PayPal account."""

    email: SecretStr

    @field_validator("email", mode="before")
    @classmethod
    def _check_email(cls, value: Any) -> str:
        email = _plain(value, "email").strip()
        local, at, domain = email.rpartition("@")
        domain = domain.lower()
        labels = domain.split(".")
        if (
            not at
            or not 1 <= len(local) <= 64
            or len(email) > 254
            or not _EMAIL_LOCAL.match(local)
            or len(labels) < 2
            or not all(_DOMAIN_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()
        ):
            raise _invalid("email", "email must be an address: a local part, @ and a domain")
        return f"{local}@{domain}"

    def secret_values(self) -> dict[str, str]:
        """The plain values, for sealing in Vault."""
        return {"email": self.email.get_secret_value()}

    def masked_hint(self) -> str:
        """The first character of the local part, and the domain: "j***@example.com"."""
        local, _, domain = self.email.get_secret_value().rpartition("@")
        return f"{local[0]}***@{domain}"


PayoutDetails: TypeAlias = BankTransferDetails | MobileMoneyDetails | PayPalDetails

DETAILS_MODELS: Final[Mapping[str, type[PayoutDetails]]] = {
    "bank_transfer": BankTransferDetails,
    "mobile_money": MobileMoneyDetails,
    "paypal": PayPalDetails,
}


def parse_details(method: str, details: Mapping[str, Any]) -> PayoutDetails:
    """Validate `details` for `method`; a ValidationFailed names fields, never values."""
    model = DETAILS_MODELS.get(method)
    if model is None:
        message = "method must be one of " + ", ".join(PAYOUT_METHODS)
        raise ValidationFailed(message, errors=[{"field": "method", "message": message}])
    if not isinstance(details, Mapping):
        message = "details must be an object"
        raise ValidationFailed(message, errors=[{"field": "details", "message": message}])
    try:
        return model.model_validate(dict(details))
    except ValidationError as exc:
        errors = _field_errors(exc, details, model)
        fields = ", ".join(dict.fromkeys(error["field"] for error in errors))
        # `from None`: the pydantic error behind it holds the submitted values.
        raise ValidationFailed(f"invalid {method} details: {fields}", errors=errors) from None


def _field_errors(
    exc: ValidationError, details: Mapping[str, Any], model: type[PayoutDetails]
) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []
    for error in exc.errors(include_input=False, include_url=False):
        ctx = error.get("ctx") or {}
        loc: list[int | str] = list(error["loc"])
        if not loc and isinstance(ctx.get("field"), str):
            loc = [ctx["field"]]  # a cross-field rule names the field it is about
        # An unknown field's name may be a secret pasted in the wrong place: it is given
        # by its position, with the names that are allowed.
        place = error_location(loc, dict(details), known=model.model_fields)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = unknown_field_message(model, loc[:-1])
        errors.append({"field": ".".join(filter(None, ["details", place])), "message": message})
    return errors


class PayoutRequest(BaseModel):
    """Body of `PUT /v1/tenants/settings/payout`; `details` is checked per method."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    method: PayoutMethod
    details: dict[str, Any] = Field(repr=False)

    def parsed(self) -> PayoutDetails:
        """The details validated for this method (raises ValidationFailed)."""
        return parse_details(self.method, self.details)


class PayoutView(BaseModel):
    """What the API shows of a payout destination: the method and a masked hint only."""

    model_config = ConfigDict(from_attributes=True)

    method: PayoutMethod
    hint: str
    updated_at: datetime
    updated_by: str
