"""Raw card data never enters the broker (PCI DSS scope control).

Cards are tokenised in the browser with Stripe.js; the broker only ever sees a
payment method id. `CardDataGuard` sits in front of every route and answers 422
to a request that carries a primary account number (PAN) or a field named like
one (card_number, cvc, pin, ...) in its body, path, query string or headers,
before any route, log line or database sees it. A PAN is found in any notation
by `broker.core.carddata`, the detector the log redactor uses too. Keeping PANs
out entirely keeps the broker out of PCI DSS cardholder-data scope; a route that
merely "ignores" a PAN has still received and logged it.

Install it inside `RequestContextMiddleware` (add it to the app first) so the
422 carries the request id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.core.carddata import contains_card_number, normalise
from broker.core.carddata import luhn_valid as luhn_valid  # re-exported: one Luhn check
from broker.core.http import problem

log = logging.getLogger(__name__)

# Bodies up to this size are inspected. A larger body is refused with 413
# rather than passed through: an uninspected body is exactly the gap a PAN
# would slip through, and no broker route takes anywhere near 1 MiB.
MAX_INSPECTED_BYTES: Final = 1024 * 1024
# What _read_body answers instead of a body: the client left, or the body outgrew the limit.
_GONE: Final = "gone"
_TOO_LARGE: Final = "too large"

CARD_NUMBER: Final = "card_number"
_SENSITIVE_PREFIX: Final = "sensitive_field:"

TITLE: Final = "Raw card data is not accepted"
DETAIL: Final = (
    "raw card data is not accepted; tokenize the card with Stripe.js and send the payment method id"
)

# Field names compared after lowercasing and dropping every non-alphanumeric
# character, so card_number, cardNumber, card-number and "Card Number" are one
# name. Exact matches only: "pin" must not catch "pinned", nor "pan" "company".
# card[cvc] is how Stripe's own form encoding spells it, hence cardcvc/cardcvv.
SENSITIVE_FIELDS: Final = frozenset(
    {
        "cardnumber",
        "creditcardnumber",
        "ccnumber",
        "pan",
        "cvc",
        "cvv",
        "cvv2",
        "cvc2",
        "cardcvc",
        "cardcvv",
        "securitycode",
        "pin",
    }
)

# Headers that proxies and tracers fill with random machine ids, which the broker neither
# logs nor stores. Datadog's are 64-bit decimals: about one in twenty would pass for a card.
TRACING_HEADERS: Final = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"baggage",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
        b"uber-trace-id",
        b"x-datadog-trace-id",
        b"x-datadog-parent-id",
        b"x-datadog-sampling-priority",
        b"x-datadog-origin",
        b"x-datadog-tags",
        b"x-amzn-trace-id",
        b"x-cloud-trace-context",
        b"sentry-trace",
    }
)
_KEY_PARTS = re.compile(r"[\[\].]+")
_NOT_ALNUM = re.compile(r"[^0-9a-z]")
_MULTIPART_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*?\bname="([^"\r\n]*)"')


def _sensitive_name(key: str) -> str | None:
    """The normalised sensitive name `key` matches, if any: card[cvc] and cvc alike."""
    key = normalise(key)
    parts = [part for part in _KEY_PARTS.split(key) if part]
    candidates = [key]
    if len(parts) > 1:
        candidates += [parts[-1], parts[-2] + parts[-1]]
    for candidate in candidates:
        name = _NOT_ALNUM.sub("", candidate.lower())
        if name in SENSITIVE_FIELDS:
            return name
    return None


def _check_key(key: str) -> str | None:
    name = _sensitive_name(key)
    if name is not None:
        return _SENSITIVE_PREFIX + name
    return CARD_NUMBER if contains_card_number(key) else None


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs, so a duplicated key cannot hide a value."""


class _KeyMarker:
    """A key met while walking, checked by its name as well as its text."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _walk(obj: Any) -> Iterator[str]:
    # Iterative, so a deeply nested body cannot exhaust the stack.
    stack = [obj]
    while stack:
        item = stack.pop()
        hit: str | None = None
        if isinstance(item, _KeyMarker):
            hit = _check_key(item.key)
        elif isinstance(item, str):
            hit = CARD_NUMBER if contains_card_number(item) else None
        elif isinstance(item, bytes):
            hit = CARD_NUMBER if contains_card_number(_text(item)) else None
        elif isinstance(item, int | float) and not isinstance(item, bool):
            # 4242424242424242 sent as a JSON number is still a PAN.
            hit = CARD_NUMBER if contains_card_number(str(item)) else None
        elif isinstance(item, dict | _Pairs):
            pairs = list(item.items()) if isinstance(item, dict) else list(item)
            for key, value in reversed(pairs):
                stack += [value, _KeyMarker(str(key))]
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(reversed(list(item)))
        if hit is not None:
            yield hit


def find_card_data(obj: Any) -> str | None:
    """The first raw-card-data hit in `obj` ("card_number" or "sensitive_field:<name>"), or None.

    `obj` may be decoded JSON (dicts, lists, strings, numbers), or plain text.
    """
    return next(_walk(obj), None)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _find_in_pairs(pairs: list[tuple[str, str]]) -> str | None:
    for key, value in pairs:
        hit = _check_key(key) or (CARD_NUMBER if contains_card_number(value) else None)
        if hit is not None:
            return hit
    return None


def _find_in_json(raw: bytes) -> tuple[bool, str | None]:
    """(parsed, hit): numbers are kept as their literal text, objects as pairs."""
    try:
        doc = json.loads(
            raw,
            object_pairs_hook=_Pairs,
            parse_int=str,
            parse_float=str,
            parse_constant=str,
        )
    except (ValueError, RecursionError):
        return False, None
    return True, find_card_data(doc)


def find_in_body(content_type: str, raw: bytes) -> str | None:
    """Inspect a request body by its content type, falling back to its raw text."""
    if not raw:
        return None
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        pairs = parse_qsl(_text(raw), keep_blank_values=True)
        return _find_in_pairs(pairs) or find_card_data(_text(raw))
    if media_type.startswith("multipart/"):
        for name in _MULTIPART_NAME.findall(raw):
            hit = _check_key(_text(name))
            if hit is not None:
                return hit
        return find_card_data(_text(raw))
    # FastAPI reads a body without a content type as JSON, so try JSON for any
    # type; the raw text is the fallback for everything that is not JSON.
    parsed, hit = _find_in_json(raw)
    if parsed:
        return hit
    return find_card_data(_text(raw))


def find_in_url(scope: Scope) -> str | None:
    """Inspect the request path and query string (names and values), decoded and raw."""
    query = scope.get("query_string", b"")
    if query:
        pairs = parse_qsl(_text(query), keep_blank_values=True)
        raw = _text(query)
        hit = _find_in_pairs(pairs) or (
            CARD_NUMBER if contains_card_number(raw, url=True) else None
        )
        if hit is not None:
            return hit
    path = scope.get("raw_path") or b""
    if contains_card_number(_text(path), url=True):
        return CARD_NUMBER
    return find_card_data(str(scope.get("path", "")))


def find_in_headers(scope: Scope) -> str | None:
    """Inspect every request header, names and values, but the tracing ones.

    Headers are input like any other: an `X-Request-Id` or a custom header holding a PAN
    would otherwise reach the logs, the audit trail and Vault's audit log.
    """
    for name, value in scope.get("headers") or []:
        if name in TRACING_HEADERS:
            continue
        key = hashlib.sha256(b"%b\0%b" % (name, value)).digest()
        if key in _CLEAN_HEADERS:
            continue
        hit = _find_in_header(name, value)
        if hit is not None:
            return hit
        if len(_CLEAN_HEADERS) >= _CLEAN_HEADERS_KEPT:
            _CLEAN_HEADERS.clear()
        _CLEAN_HEADERS.add(key)
    return None


# Headers repeat request after request (a service's bearer token, a user agent), and
# inspecting a long one costs more than routing a credential fetch: a header found
# clean is remembered, by the SHA-256 of its name and value, and not inspected again.
# Enough for every service token of 10,000 tenants with their own (a JWT's inspection is
# about 25 us, a remembered one 1.5 us); the set starts over when full.
_CLEAN_HEADERS: set[bytes] = set()
_CLEAN_HEADERS_KEPT = 16_384


def _find_in_header(name: bytes, value: bytes) -> str | None:
    # Clients send UTF-8 in header values, whatever RFC 9110 says: read them as such, so
    # that digits of other scripts are seen as digits.
    text = value.decode("utf-8", errors="replace")
    return _check_key(name.decode("latin-1")) or (
        CARD_NUMBER if contains_card_number(text, url=True) else None
    )


class CardDataGuard:
    """Pure ASGI middleware: refuses requests that carry raw card data, with a 422.

    Every HTTP request's body is buffered (an empty one costs one `receive`;
    HTTP allows a body on GET too), inspected, then replayed to the app byte
    for byte. Bodies over `max_body_bytes` are refused with 413.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_INSPECTED_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hit = find_in_url(scope) or find_in_headers(scope)
        if hit is not None:
            await self._refuse(scope, receive, send, hit)
            return
        if self._declared_length(scope) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        body = await self._read_body(receive)
        if isinstance(body, str):  # nothing to pass on
            if body == _TOO_LARGE:
                await self._too_large(scope, receive, send)
            return
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        hit = find_in_body(content_type.decode("latin-1"), body)
        if hit is not None:
            await self._refuse(scope, receive, send, hit)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | str:
        """The whole body, or _GONE when the client left, or _TOO_LARGE past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE  # the client has gone; there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return _TOO_LARGE
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0  # the server rejects a malformed length itself
        return 0

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, hit: str) -> None:
        # The hit kind names a field or "card_number"; never the value. Nor the path: it may
        # be where the card number was, and no route has matched it yet to give a template.
        method = str(scope.get("method", ""))
        log.warning(
            "raw card data refused on a %s request (%s)",
            method,
            hit,
            extra={"fields": {"method": method, "hit": hit}},
        )
        await problem(422, TITLE, DETAIL)(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body exceeds {self.max_body_bytes} bytes; it was not read"
        response = problem(413, "Request body too large", detail)
        await response(scope, receive, send)
