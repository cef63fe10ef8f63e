"""Structured JSON logs that pass through a redaction filter.

The filter is the last line of defence: code should never log a secret in the
first place, but a token pasted into a URL or an exception text from a library
must not reach the log either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from broker.core import context
from broker.core.carddata import redact_card_numbers

REDACTED = "[REDACTED]"
RAW_ACCESS_LOGGER = "uvicorn.access"
ACCESS_LOGGER = "broker.access"
# The access line's own fields (see RequestContextMiddleware), each from a set the broker
# controls or checked where it is made: the method from an allow-list, the route template
# from the route table, the status, the duration, and the request id, generated or accepted
# only once it had the right shape and nothing to redact. They are not scanned again; any
# other field of the line (the actor comes from a token) is, and its message is rebuilt
# from these three, never taken as written.
ACCESS_MESSAGE = ("method", "route", "status")
_ACCESS_OWN = {"method": str, "route": str, "status": int, "duration_ms": float, "request_id": str}

# A path parameter's convertor, as in `{tenant_id:tenant}` (see broker.tenants.routes).
_CONVERTOR = re.compile(r":\w+\}")


def route_template(scope: Mapping[str, Any]) -> str | None:
    """The matched route's path as documented (`/v1/tenants/{tenant_id}`), or None.

    Logs, metrics and audit rows name routes by this template, never by the raw path,
    which is caller input.
    """
    path = getattr(scope.get("route"), "path", None)
    if not isinstance(path, str):
        return None
    return _CONVERTOR.sub("}", path) if ":" in path else path  # most have none


# Shapes of credentials we know. Order matters little; each match is replaced whole.
_SECRET_PATTERNS = [
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{12,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),  # JWTs
    # Vault / OpenBao tokens; hvs./hvb. bodies are base64url, so `-` and `_` occur.
    re.compile(r"\b(?:hvs|hvb|hvr|s|b|r)\.[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bvault:v\d+:[A-Za-z0-9+/=]+"),  # Transit ciphertext
    re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{8,}"),  # Stripe keys
    re.compile(r"\b(?:seti|pi)_[A-Za-z0-9]+_secret_[A-Za-z0-9]+"),  # Stripe client secrets
    re.compile(r"\b(?:ck|cs)_[A-Za-z0-9]{16,}"),  # WooCommerce keys
    re.compile(r"\bshp(?:at|ca|pa|ss|rt)_[A-Za-z0-9]{16,}"),  # Shopify tokens
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # OpenAI keys
    re.compile(r"\bEAA[A-Za-z0-9]{30,}"),  # Meta (Graph) access tokens
    re.compile(r"(?i)(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@"),  # DSN passwords
]
_SENSITIVE_KEY = re.compile(
    r"(?i)(secret|token|password|passwd|authorization|api_key|apikey|private|credential"
    r"|unseal|cookie|signature)"
)


# An OAuth callback's query (in a library's debug line, an error's URL): the code, the
# state and the signature are single-use credentials while they live. Graph's code
# exchange is a GET whose query holds the app secret (httpx logs its URL), and its
# debug_token a GET whose query holds the token asked about.
_OAUTH_QUERY = re.compile(
    r"(?i)([?&](?:code|state|hmac|signature|client_secret|access_token|input_token"
    r"|refresh_token|fb_exchange_token)=)[^&\s\"'#]+"
)


def redact_text(text: str) -> str:
    """Replace every known credential shape, and anything like a card number, in `text`."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED + "@", text)
        else:
            text = pattern.sub(REDACTED, text)
    text = _OAUTH_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    # The guard's own detector, with percent escapes decoded: a refused URL is logged in the
    # forms a client sent it ("4242%204242...", "4242+4242..."), not the ones it meant.
    return redact_card_numbers(text, REDACTED, url=True)


# A name is short words: a hash, a key or a token is one long unbroken run, and eight digits
# in a row are an account, card, IBAN or phone number.
_NAME = re.compile(r"[A-Za-z0-9]{1,23}(?:[-_. ][A-Za-z0-9]{1,23})*")
_LONG_NUMBER = re.compile(r"[0-9]{8}")


def is_plain_name(text: str, *, max_length: int = 100) -> bool:
    """True when `text` reads as a name (short words), with no credential or number in it.

    Only such names are repeated back from caller input (unknown keys, path identifiers).
    """
    return (
        len(text) <= max_length
        and _NAME.fullmatch(text) is not None
        and _LONG_NUMBER.search(text) is None
        and redact_text(text) == text
    )


def redact_value(key: str, value: Any) -> Any:
    """Redact a structured field: by its name first, then by its content."""
    if _SENSITIVE_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else (an exception, a URL object) is rendered as text by the
    # formatter, so scrub that text here.
    return redact_text(str(value))


def _access_fields(fields: dict[Any, Any]) -> dict[str, Any]:
    """An access line's fields: its own ones as they are, any other one redacted."""
    return {
        str(k): v if isinstance(v, _ACCESS_OWN.get(str(k), ())) else redact_value(str(k), v)
        for k, v in fields.items()
    }


class RedactionFilter(logging.Filter):
    """Scrubs the message, its arguments and any `extra` fields of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == RAW_ACCESS_LOGGER:
            # uvicorn logs the raw path and query string; the broker writes its own access
            # log with route templates instead (see RequestContextMiddleware).
            return False
        fields = getattr(record, "fields", None)
        if record.name == ACCESS_LOGGER and isinstance(fields, dict):
            record.fields = own = _access_fields(fields)
            record.msg = " ".join(str(own.get(name)) for name in ACCESS_MESSAGE)
        else:
            record.msg = redact_text(record.getMessage())
            if isinstance(fields, dict):
                record.fields = {k: redact_value(str(k), v) for k, v in fields.items()}
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, scrubbed, and drop the live exception so
            # no formatter downstream prints its raw text.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request context attached."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = context.current()
        if ctx is not None:
            entry["request_id"] = ctx.request_id
            if ctx.actor:
                entry["actor"] = ctx.actor
            if ctx.tenant_id:
                entry["tenant_id"] = ctx.tenant_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send every log record, ours and the libraries', through redaction to JSON on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lib = logging.getLogger(name)
        lib.handlers = []
        lib.propagate = True
