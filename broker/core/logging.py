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
from datetime import UTC, datetime
from typing import Any

from broker.core import context

REDACTED = "[REDACTED]"

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
    re.compile(r"(?i)(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@"),  # DSN passwords
]
_SENSITIVE_KEY = re.compile(
    r"(?i)(secret|token|password|passwd|authorization|api_key|apikey|private|credential"
    r"|unseal|cookie|signature)"
)


# An OAuth callback's query (in an access log line, a library's debug output): the
# code, the state and the signature are single-use credentials while they live.
_OAUTH_QUERY = re.compile(r"(?i)([?&](?:code|state|hmac|signature)=)[^&\s\"'#]+")

# 13-19 digits, optionally in groups split by single spaces or dashes: a card
# number that reached a URL (which access logs record) must not reach the log.
_CARD_LIKE = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _redact_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return REDACTED if _luhn_valid(digits) else match.group(0)


def redact_text(text: str) -> str:
    """Replace every known credential shape, and anything like a card number, in `text`."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED + "@", text)
        else:
            text = pattern.sub(REDACTED, text)
    text = _OAUTH_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    return _CARD_LIKE.sub(_redact_card, text)


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


class RedactionFilter(logging.Filter):
    """Scrubs the message, its arguments and any `extra` fields of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact_value(str(k), v) for k, v in fields.items()}
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
