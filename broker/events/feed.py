"""The change feed's long-poll: wait for new events without holding a database connection.

A reader waits on the event loop. Every `poll_s` the process looks at the
newest settled event once (shared by all its waiting readers, `FeedWatch`);
only when it moved past a reader's cursor does that reader query its own
events, on a connection it holds for that one query.
"""

from __future__ import annotations

import threading
import time

import anyio
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.db import unit_of_work
from broker.core.errors import Forbidden
from broker.events import outbox
from broker.models import Event


class FeedWatch:
    """The newest settled cursor, looked up at most once per `poll_s` for the whole process."""

    def __init__(self, engine: Engine, *, poll_s: float) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._head = outbox.START
        self._read_at = float("-inf")

    def head(self) -> outbox.Cursor:
        """The newest settled cursor, at most `poll_s` old (blocking: call it off the loop)."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.poll_s:
                with unit_of_work(self.engine) as session:
                    self._head = outbox.head(session)
                self._read_at = time.monotonic()
            return self._head


async def wait_for_events(
    watch: FeedWatch,
    *,
    after: outbox.Cursor,
    scope: outbox.Scope,
    wait_s: float,
    limit: int,
) -> tuple[list[Event], outbox.Cursor]:
    """Events after `after` in `scope`, waiting up to `wait_s` for the first one.

    The cursor returned also moves past events outside the scope, so an idle
    reader does not rescan them on its next call.
    """
    deadline = time.monotonic() + wait_s
    first = True
    while True:
        # The first look is the reader's own query; then the shared head says when to look.
        head = await run_in_threadpool(watch.head)
        if first or head > after:
            first = False
            events, cursor = await run_in_threadpool(_read, watch.engine, after, scope, limit)
            if events:
                return events, cursor
            # Nothing of this reader's up to `head` (settled before the query): skip past it.
            after = max(after, head)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return [], after
        await anyio.sleep(min(watch.poll_s, remaining))


def _read(
    engine: Engine, after: outbox.Cursor, scope: outbox.Scope, limit: int
) -> tuple[list[Event], outbox.Cursor]:
    with unit_of_work(engine) as session:
        return outbox.read_after(session, after=after, scope=scope, limit=limit)


async def follow(
    watch: FeedWatch,
    *,
    after: outbox.Cursor | None,
    scope: outbox.Scope,
    wait_s: float,
    limit: int,
) -> tuple[list[Event], outbox.Cursor]:
    """A reader's next page: none and the current head for a new reader (`after` None),
    else the events after `after` in `scope`, waiting up to `wait_s` for the first one."""
    if after is None:
        return [], await run_in_threadpool(start, watch.engine)
    return await wait_for_events(watch, after=after, scope=scope, wait_s=wait_s, limit=limit)


def reader_scope(principal: Principal, tenant: str | None) -> outbox.Scope:
    """The tenants a reader may follow: all (platform, security), those a service serves,
    or a tenant user's own; narrowed to `tenant` when given."""
    if principal.has(Scope.PLATFORM_ADMIN) or principal.has(Scope.AUDIT_READ):
        return outbox.Scope(None if tenant is None else frozenset({tenant}))
    if principal.kind == "service" and principal.has(Scope.CREDENTIALS_READ):
        served = principal.tenants
    elif principal.tenant_id is not None:
        served = frozenset({principal.tenant_id})
    else:
        raise Forbidden("this token names no tenant")
    if tenant is not None:
        if tenant not in served:
            raise Forbidden("this token does not serve that tenant")
        served = frozenset({tenant})
    return outbox.Scope(served)


def start(engine: Engine) -> outbox.Cursor:
    """Where a new reader starts: after every event settled so far."""
    with unit_of_work(engine) as session:
        return outbox.head(session)
