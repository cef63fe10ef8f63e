"""The broker's own error hierarchy. Services raise these; one handler renders them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin


class BrokerError(Exception):
    """Base error: a safe, user-facing message and an HTTP status."""

    status: int = 500
    title: str = "Internal error"
    default_message: str | None = None
    """The message when the raiser gives none (the title when this is None too)."""

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message or self.title
        self.extra = extra
        super().__init__(self.message)


class BadRequest(BrokerError):
    """The request itself is malformed (before any of its content is looked at)."""

    status = 400
    title = "Bad request"


class Unauthenticated(BrokerError):
    """No token, or a token that fails verification."""

    status = 401
    title = "Unauthenticated"

    # The subject of a correctly signed but unusable token (expired, wrong
    # audience), so failures count against that principal too. Never shown.
    subject: str | None = None


class Forbidden(BrokerError):
    """A valid token without the scope the route needs."""

    status = 403
    title = "Forbidden"


class NotFound(BrokerError):
    """Missing, or belonging to another tenant: the caller cannot tell which."""

    status = 404
    title = "Not found"


class Conflict(BrokerError):
    """The resource changed or already exists."""

    status = 409
    title = "Conflict"


class PreconditionFailed(BrokerError):
    """`If-Match` did not match the current version."""

    status = 412
    title = "Precondition failed"


class ValidationFailed(BrokerError):
    """The input is well-formed JSON but not acceptable."""

    status = 422
    title = "Validation failed"


class RateLimited(BrokerError):
    """Too many requests; retry after the given number of seconds."""

    status = 429
    title = "Too many requests"

    def __init__(self, message: str | None = None, *, retry_after: int, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = retry_after


class TooManyFailures(RateLimited):
    """Authentication failed again from an address past its failure limit."""

    def __init__(self, failure: BrokerError, *, retry_after: int) -> None:
        super().__init__("too many failed authentications; retry later", retry_after=retry_after)
        self.failure = failure


class UpstreamUnavailable(BrokerError):
    """Vault, the database or a provider cannot answer now. Always carries Retry-After."""

    status = 503
    title = "Service unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int = 5, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = retry_after


def schema_names(schema: Any) -> frozenset[str]:
    """Every property and parameter name a JSON schema (or an OpenAPI document) declares."""
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                names.update(str(name) for name in properties)
            for parameter in node.get("parameters") or []:
                if isinstance(parameter, dict) and isinstance(parameter.get("name"), str):
                    names.add(parameter["name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return frozenset(names)


def error_location(loc: Sequence[int | str], data: Any, *, known: Collection[str]) -> str:
    """The dotted place of a rejected input, naming only names the API itself declares.

    A name the caller made up (an unknown field, a key of a free-form object) may be a
    secret pasted in the wrong place, so it is given by its position among its siblings
    instead: `details.(field 2)`. `data` is the submitted document the location points into.
    """
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(part, int) or part in known:
            parts.append(str(part))
        elif isinstance(node, dict) and part in node:
            parts.append(f"(field {list(node).index(part) + 1})")
        else:
            parts.append("(field)")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts)


def unknown_field_message(model: Any, parent: Sequence[int | str]) -> str:
    """The message for an unknown field under `parent` of `model`: the allowed names, not it."""
    for part in parent:
        model = _inner_model(model, part)
    fields = getattr(model, "model_fields", None)
    if isinstance(fields, dict) and fields:
        return "unknown field; the allowed fields are " + ", ".join(fields)
    return "unknown field (its name is not repeated)"


def _inner_model(annotation: Any, part: int | str) -> Any:
    """The type found at `part` of a value of type `annotation`, or None."""
    for candidate in _alternatives(annotation):
        fields = getattr(candidate, "model_fields", None)
        args = get_args(candidate)
        if isinstance(part, str) and isinstance(fields, dict) and part in fields:
            return fields[part].annotation
        if isinstance(part, int) and get_origin(candidate) in (list, tuple, set) and args:
            return args[0]
        if isinstance(part, str) and get_origin(candidate) is dict and len(args) == 2:
            return args[1]
    return None


def _alternatives(annotation: Any) -> list[Any]:
    """`annotation` without Annotated, and each member of a union."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        return [alt for arg in get_args(annotation) for alt in _alternatives(arg)]
    return [annotation]
