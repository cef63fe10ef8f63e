"""Per-request context: who is calling and which request this is.

It lives in a ContextVar so the Vault adapter can stamp audited headers on every
call without threading the values through each function. Starlette copies the
context into the worker thread that runs a sync route, so the value follows the
request there.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RequestContext:
    """Identifies one request in logs, the audit trail and the Vault audit log."""

    request_id: str
    client_addr: str | None = None
    actor: str | None = None
    tenant_id: str | None = None
    action: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("broker_request", default=None)


def current() -> RequestContext | None:
    """The context of the request being served, if any."""
    return _current.get()


def bind(ctx: RequestContext) -> None:
    """Make `ctx` the current request context."""
    _current.set(ctx)


_UNSET = object()


def update(
    *,
    actor: str | None | object = _UNSET,
    tenant_id: str | None | object = _UNSET,
    action: str | None | object = _UNSET,
) -> None:
    """Add actor, tenant or action to the current context once they are known."""
    ctx = _current.get()
    if ctx is None:
        return
    changes = {
        name: value
        for name, value in (("actor", actor), ("tenant_id", tenant_id), ("action", action))
        if value is not _UNSET
    }
    _current.set(replace(ctx, **changes))  # type: ignore[arg-type]
