"""The broker's own error hierarchy. Services raise these; one handler renders them."""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Base error: a safe, user-facing message and an HTTP status."""

    status: int = 500
    title: str = "Internal error"

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.title
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
