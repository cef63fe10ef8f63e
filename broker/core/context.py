"""Per-request context: who is calling and which request this is.

It lives in a ContextVar so the Vault adapter can stamp audited headers on every
call without threading the values through each function. Starlette copies the
context into the worker thread that runs a sync route, so the value follows the
request there.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RequestContext:
    """Identifies one request in logs, the audit trail and the Vault audit log."""

    request_id: str
    client_addr: str | None = None
    actor: str | None = None
    tenant_id: str | None = None
    action: str | None = None
    # Set for API requests: shared by every copy of this context (replace() keeps
    # the same object), so all the Vault calls of one request draw on one time
    # budget. None (CLI runs, migrations) gives each call a budget of its own.
    vault_budget: VaultBudget | None = field(default=None, compare=False)


class VaultBudget:
    """The time one request may spend on Vault, across all of its calls.

    Started by the first Vault call of the request; every later call (the KV
    write after the Transit encryption, a reconcile after a failed write) gets
    only what is left, so a hung Vault costs a request one budget, not one per
    call.
    """

    __slots__ = ("_deadline",)

    def __init__(self) -> None:
        self._deadline: float | None = None

    def deadline(self, budget_s: float) -> float:
        """The request's Vault deadline (time.monotonic()), starting it if needed."""
        if self._deadline is None:
            self._deadline = time.monotonic() + budget_s
        return self._deadline

    def restart(self) -> None:
        """Let the next Vault call start a fresh budget."""
        self._deadline = None

    def __repr__(self) -> str:
        return "VaultBudget()"


_current: ContextVar[RequestContext | None] = ContextVar("broker_request", default=None)


def current() -> RequestContext | None:
    """The context of the request being served, if any."""
    return _current.get()


def vault_deadline(budget_s: float) -> float:
    """When the current request's Vault budget runs out; a fresh budget outside requests."""
    ctx = _current.get()
    if ctx is None or ctx.vault_budget is None:
        return time.monotonic() + budget_s
    return ctx.vault_budget.deadline(budget_s)


def restart_vault_budget() -> None:
    """Give the rest of the request a fresh Vault budget.

    For time the request spent on something other than Vault, bounded on its own:
    waiting for another replica's OAuth refresh, or the provider's token endpoint.
    """
    ctx = _current.get()
    if ctx is not None and ctx.vault_budget is not None:
        ctx.vault_budget.restart()


def bind(ctx: RequestContext) -> None:
    """Make `ctx` the current request context."""
    _current.set(ctx)


def bind_job(job_id: int | None, actor: str) -> None:
    """Make a background job's context current: its request id names the job (`job-<id>`)."""
    bind(RequestContext(request_id=f"job-{job_id}", actor=actor))


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
