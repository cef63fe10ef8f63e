"""Log redaction: planted canary secrets never reach the log, ordinary text does."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from broker.auth.tokens import mint_token
from broker.core.carddata import contains_card_number
from broker.core.logging import REDACTED, configure_logging, redact_text
from tests.support.cards import VARIANTS

_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@dataclass(frozen=True)
class Canary:
    """A credential as it would appear in text, and the parts of it that must not leak."""

    name: str
    text: str
    secret_parts: tuple[str, ...]


def _hex(n_bytes: int) -> str:
    return secrets.token_hex(n_bytes)


def make_canaries() -> list[Canary]:
    """Fresh canaries of every credential shape the broker handles."""
    bearer = "opaq" + _hex(16)
    jwt = mint_token(
        "canary-signing-key-" + _hex(16),
        subject="canary-" + _hex(6),
        scopes=["integrations:view"],
        issuer="tenant-secrets-broker",
        audience="tenant-secrets-broker",
    )
    jwt_header, jwt_payload, jwt_signature = jwt.split(".")
    vault_legacy = _hex(12)  # 24 characters
    # Vault's hvs tokens are base64url, so `-` and `_` occur in them.
    hvs_parts = (_hex(8), _hex(8), _hex(8))
    transit = base64.b64encode(secrets.token_bytes(48)).decode()
    stripe_live, stripe_test = _hex(12), _hex(12)
    seti_id, seti_secret = _hex(6), _hex(10)
    woo_key, woo_secret = _hex(20), _hex(20)
    shopify = _hex(16)
    openai = _hex(20)
    db_password = "pw" + _hex(10)
    return [
        Canary("bearer header", f"Authorization: Bearer {bearer}", (bearer,)),
        Canary("jwt", jwt, (jwt_payload, jwt_signature)),
        Canary("vault token", f"s.{vault_legacy}", (vault_legacy,)),
        Canary("vault hvs token", "hvs.CAESI{}-{}_{}".format(*hvs_parts), hvs_parts),
        Canary("transit ciphertext", f"vault:v1:{transit}", (transit,)),
        Canary("stripe live key", f"sk_live_{stripe_live}", (stripe_live,)),
        Canary("stripe test key", f"sk_test_{stripe_test}", (stripe_test,)),
        Canary("setup intent secret", f"seti_{seti_id}_secret_{seti_secret}", (seti_secret,)),
        Canary("woocommerce key", f"ck_{woo_key}", (woo_key,)),
        Canary("woocommerce secret", f"cs_{woo_secret}", (woo_secret,)),
        Canary("shopify token", f"shpat_{shopify}", (shopify,)),
        Canary("openai key", f"sk-proj-{openai}", (openai,)),
        Canary(
            "database url",
            f"postgresql://broker:{db_password}@db.internal:5432/broker",
            (db_password,),
        ),
    ]


def leaked(output: str, canaries: list[Canary]) -> list[str]:
    """The names of the canaries any part of which appears in `output`."""
    return [c.name for c in canaries if any(part in output for part in c.secret_parts)]


def json_lines(output: str) -> list[dict[str, object]]:
    """Every line parsed as JSON, with the fields every line must carry."""
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines, "nothing was logged"
    for entry in lines:
        assert {"time", "level", "message"} <= entry.keys()
    return lines


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Logging configured as the broker does it, onto a buffer; undone afterwards."""
    root = logging.getLogger()
    level = root.level
    before = list(root.handlers)
    libraries = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in _LIBRARY_LOGGERS
    }
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    ours = root.handlers[0]
    # Put pytest's own capture handlers back, after ours, so its per-phase
    # bookkeeping stays consistent; removing only ours afterwards then restores
    # the root logger exactly.
    for handler in before:
        root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(ours)
        root.setLevel(level)
        for name, (handlers, propagate) in libraries.items():
            logger = logging.getLogger(name)
            logger.handlers = handlers
            logger.propagate = propagate


log = logging.getLogger("broker.tests.redaction")


def test_canaries_in_the_message_are_redacted(log_output: io.StringIO) -> None:
    canaries = make_canaries()

    log.warning("upstream replied: " + " ; ".join(c.text for c in canaries))

    output = log_output.getvalue()
    assert leaked(output, canaries) == []
    (entry,) = json_lines(output)
    assert entry["level"] == "warning"
    assert str(entry["message"]).startswith("upstream replied: ")
    assert REDACTED in str(entry["message"])


def test_canaries_in_format_arguments_are_redacted(log_output: io.StringIO) -> None:
    canaries = make_canaries()

    for canary in canaries:
        log.info("calling %s with %r", "provider", {"credential": canary.text})
        log.info("value was %s", canary.text)

    output = log_output.getvalue()
    assert leaked(output, canaries) == []
    lines = json_lines(output)
    assert len(lines) == 2 * len(canaries)
    assert all(REDACTED in str(entry["message"]) for entry in lines)


def test_canaries_in_structured_fields_are_redacted(log_output: io.StringIO) -> None:
    canaries = make_canaries()
    # Values of no known shape, caught only because of the field's name.
    named_only = [
        Canary(name, value, (value,))
        for name, value in (
            ("auth_token field", "plain" + _hex(12)),
            ("password field", "hunter2" + _hex(12)),
            ("nested client_secret field", "abc" + _hex(12)),
            ("Authorization field", "Basic " + _hex(12)),
        )
    ]

    log.info(
        "saved credentials",
        extra={
            "fields": {
                "tenant_id": "t-acme",
                "auth_token": named_only[0].text,
                "password": named_only[1].text,
                "note": " ".join(c.text for c in canaries),
                "nested": {
                    "inner": {"dsn": canaries[-1].text, "client_secret": named_only[2].text},
                    "headers": {"Authorization": named_only[3].text},
                    "list": [c.text for c in canaries],
                    "rows": [{"value": c.text} for c in canaries],
                },
            }
        },
    )

    output = log_output.getvalue()
    assert leaked(output, canaries + named_only) == []
    (entry,) = json_lines(output)
    assert entry["tenant_id"] == "t-acme"
    assert entry["auth_token"] == REDACTED
    assert entry["password"] == REDACTED


def test_canaries_in_non_string_field_values_are_redacted(log_output: io.StringIO) -> None:
    canaries = make_canaries()
    error = RuntimeError("provider said " + " ".join(c.text for c in canaries))

    log.error("provider call failed", extra={"fields": {"error": error, "attempt": 2}})

    output = log_output.getvalue()
    assert leaked(output, canaries) == []
    (entry,) = json_lines(output)
    assert entry["attempt"] == 2
    assert str(entry["error"]).startswith("provider said ")


def test_field_with_a_non_string_key_is_still_logged(log_output: io.StringIO) -> None:
    log.info("status counts", extra={"fields": {200: 14, "token": "x" + _hex(8)}})

    (entry,) = json_lines(log_output.getvalue())
    assert entry["200"] == 14
    assert entry["token"] == REDACTED


def _fail_with(text: str) -> None:
    try:
        raise ConnectionError("vault refused " + text)
    except ConnectionError as exc:
        raise RuntimeError("could not save credentials: " + text) from exc


def test_canaries_in_an_exception_traceback_are_redacted(log_output: io.StringIO) -> None:
    canaries = make_canaries()

    try:
        _fail_with(" ".join(c.text for c in canaries))
    except RuntimeError:
        log.exception("request failed")
    try:
        _fail_with(canaries[0].text)
    except RuntimeError as exc:
        log.error("unexpected error", exc_info=exc)

    output = log_output.getvalue()
    assert leaked(output, canaries) == []
    lines = json_lines(output)
    assert len(lines) == 2
    for entry in lines:
        exception = str(entry["exception"])
        assert "Traceback" in exception
        assert "RuntimeError: could not save credentials: " in exception
        assert "ConnectionError: vault refused" in exception
        assert REDACTED in exception


def test_library_loggers_pass_through_redaction(log_output: io.StringIO) -> None:
    canaries = make_canaries()

    logging.getLogger("uvicorn.error").error("bad request line %s", canaries[0].text)
    logging.getLogger("hvac.adapters").warning("response: %s", canaries[2].text)

    output = log_output.getvalue()
    assert leaked(output, canaries) == []
    assert [entry["logger"] for entry in json_lines(output)] == ["uvicorn.error", "hvac.adapters"]


@contextmanager
def root_logger_restored() -> Iterator[None]:
    """Put the root logger back exactly as it was, within one test phase."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers = before
        root.setLevel(level)


def test_configure_logging_removes_handlers_that_do_not_redact() -> None:
    raw, redacted = io.StringIO(), io.StringIO()
    canaries = make_canaries()
    with root_logger_restored():
        logging.getLogger().addHandler(logging.StreamHandler(raw))
        configure_logging("INFO", stream=redacted)
        log.warning("token %s", canaries[1].text)

    assert raw.getvalue() == ""
    assert leaked(redacted.getvalue(), canaries) == []
    assert REDACTED in redacted.getvalue()


def test_level_threshold_applies() -> None:
    stream = io.StringIO()
    with root_logger_restored():
        configure_logging("warning", stream=stream)
        log.info("not shown")
        log.warning("shown")

    assert [entry["message"] for entry in json_lines(stream.getvalue())] == ["shown"]


# --- no over-redaction ------------------------------------------------------------

ORDINARY = [
    "tenant t-3f2a9c1e-acme",
    "tenant 0b6f4f4e-8a52-4c9b-9f2e-3c1d2b7a9e10",
    "provider woocommerce",
    "provider shopify",
    "provider stripe",
    "https://shop.example.com/wp-json/wc/v3/orders?per_page=10",
    "postgresql://db.internal:5432/broker",
    "secret/data/tenants/t-acme/integrations/stripe",
    "password rotated for tenant t-acme",
    "token expired for user alice",
    "request 7c9e6679-7425-40de-944b-e07fc1f90ae7 took 12 ms",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_not_redacted(text: str) -> None:
    assert redact_text(text) == text


def test_ordinary_fields_survive_in_the_log(log_output: io.StringIO) -> None:
    log.info(
        "credentials saved for %s",
        "t-acme",
        extra={
            "fields": {
                "tenant_id": "t-acme",
                "provider": "woocommerce",
                "store_url": "https://shop.example.com/wp-json/wc/v3",
                "vault_addr": "https://vault.internal:8200",
                "status": 201,
            }
        },
    )

    (entry,) = json_lines(log_output.getvalue())
    assert entry["message"] == "credentials saved for t-acme"
    assert entry["tenant_id"] == "t-acme"
    assert entry["provider"] == "woocommerce"
    assert entry["store_url"] == "https://shop.example.com/wp-json/wc/v3"
    assert entry["vault_addr"] == "https://vault.internal:8200"
    assert entry["status"] == 201


def test_only_the_password_of_a_database_url_is_redacted() -> None:
    password = "pw" + _hex(10)

    redacted = redact_text(f"connecting to postgresql+psycopg://broker:{password}@db:5432/app")

    assert redacted == f"connecting to postgresql+psycopg://broker:{REDACTED}@db:5432/app"


@pytest.mark.parametrize(
    "logged",
    [
        'GET /v1/x?pan=4242424242424242 HTTP/1.1" 422',
        "card 5555 5555 5555 4444 refused",
        "card 3782-822463-10005 refused",
    ],
)
def test_card_numbers_in_log_text_are_redacted(logged: str) -> None:
    redacted = redact_text(logged)
    assert REDACTED in redacted
    for digits in ("4242424242424242", "5555 5555 5555 4444", "3782-822463-10005"):
        assert digits not in redacted


def test_long_numbers_that_are_not_cards_are_kept() -> None:
    text = "tenant t-1 kv_version 12 took 1234567890123 ns"  # 13 digits, fails Luhn
    assert redact_text(text) == text


def test_uvicorns_raw_access_log_is_dropped_and_the_brokers_is_kept(
    log_output: io.StringIO,
) -> None:
    # uvicorn's line carries the raw path and query; the broker logs the route template.
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/x?q=secret-ish", "1.1", 422
    )
    logging.getLogger("broker.access").info("%s %s %s", "GET", "unmatched", 422)

    output = log_output.getvalue()
    assert "secret-ish" not in output
    assert [(e["logger"], e["message"]) for e in json_lines(output)] == [
        ("broker.access", "GET unmatched 422")
    ]


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_notation_of_a_card_is_redacted_from_the_log(
    log_output: io.StringIO, text: str
) -> None:
    log.warning("refused %s", text, extra={"fields": {"note": f"was {text}"}})

    (entry,) = json_lines(log_output.getvalue())
    for logged in (str(entry["message"]), str(entry["note"])):
        assert REDACTED in logged
        assert not contains_card_number(logged)
    assert str(entry["message"]).startswith("refused ")


def test_an_oauth_callback_in_a_logged_url_is_redacted(log_output: io.StringIO) -> None:
    code, state, signature = secrets.token_hex(16), secrets.token_urlsafe(32), secrets.token_hex(32)
    refresh = "shprt_" + secrets.token_hex(16)
    line = (
        f"HTTP Request: GET http://testserver/v1/oauth/callback/shopify?code={code}&host=aG9zdA"
        f'&shop=a.myshopify.com&state={state}&timestamp=1&hmac={signature} "HTTP/1.1 303"'
    )
    logging.getLogger("httpx").info(line)
    logging.getLogger("httpx").debug("answer %s", {"refresh_token": refresh})

    output = log_output.getvalue()
    for value in (code, state, signature, refresh):
        assert value not in output
    assert "shop=a.myshopify.com" in output


def test_the_access_lines_own_fields_pass_and_everything_else_in_it_is_redacted(
    log_output: io.StringIO,
) -> None:
    # The broker's own fields (method, template, status, duration, checked request id) are not
    # scanned again; the actor and any other field are, and the message is rebuilt from the
    # own fields, so text written into it by mistake never reaches the log.
    key = "sk_live_" + _hex(12)
    fields = {
        "method": "GET",
        "route": "/v1/credentials/{tenant_id}/{provider}",
        "status": 200,
        "duration_ms": 2.5,
        "request_id": "req-access-0002",
        "actor": f"service:{key}",
        "note": key,
        "route_hint": {"token": "x"},
    }
    logging.getLogger("broker.access").info("%s %s", "GET", key, extra={"fields": fields})

    output = log_output.getvalue()
    assert key not in output
    [entry] = json_lines(output)
    assert entry["message"] == "GET /v1/credentials/{tenant_id}/{provider} 200"
    assert {name: entry[name] for name in ("method", "route", "status", "duration_ms")} == {
        "method": "GET",
        "route": "/v1/credentials/{tenant_id}/{provider}",
        "status": 200,
        "duration_ms": 2.5,
    }
    assert entry["request_id"] == "req-access-0002"
    assert entry["actor"] == f"service:{REDACTED}"
    assert entry["note"] == REDACTED
    assert entry["route_hint"] == {"token": REDACTED}


def test_an_access_line_field_of_another_type_than_its_own_is_redacted(
    log_output: io.StringIO,
) -> None:
    key = "sk_live_" + _hex(12)
    fields = {"method": "GET", "route": "/v1/tenants", "status": [key], "request_id": None}
    logging.getLogger("broker.access").info("access", extra={"fields": fields})

    output = log_output.getvalue()
    assert key not in output
    [entry] = json_lines(output)
    assert entry["status"] == [REDACTED]
