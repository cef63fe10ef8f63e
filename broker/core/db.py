"""The database engine, units of work, asyncio reads and writes, and Alembic migrations."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psycopg
from alembic import command
from alembic.config import Config
from anyio.lowlevel import RunVar
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, create_engine

from broker.core.config import Settings
from broker.core.errors import UpstreamUnavailable

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# The bounds each engine was made with (Engine has no slot of its own for them).
_BOUNDS: weakref.WeakKeyDictionary[Engine, DatabaseBounds] = weakref.WeakKeyDictionary()
# Told of each unit of work that found every pooled connection busy, per engine (for
# /metrics: each app that serves from the engine counts them).
_POOL_TIMEOUT_WATCHERS: weakref.WeakKeyDictionary[Engine, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)

# How much longer the client waits than the server's own statement timeout: the
# server normally cancels first, cleanly; the client deadline is for a server
# that cannot answer at all (paused, or its host frozen).
_CLIENT_SLACK_S = 2.0


@dataclass(frozen=True)
class DatabaseBounds:
    """How long any one database call may take, end to end."""

    statement_timeout_s: float = 5.0
    pool_timeout_s: float = 3.0
    connect_timeout_s: int = 3
    idle_in_transaction_timeout_s: float = 30.0
    pool_size: int = 10
    max_overflow: int = 10
    retry_after_s: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseBounds:
        """The bounds the settings ask for."""
        return cls(
            statement_timeout_s=settings.database_statement_timeout_s,
            pool_timeout_s=settings.database_pool_timeout_s,
            connect_timeout_s=settings.database_connect_timeout_s,
            idle_in_transaction_timeout_s=settings.database_idle_in_transaction_timeout_s,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            retry_after_s=settings.retry_after_s,
        )

    @property
    def client_deadline_s(self) -> float:
        """How long the client waits on the server for any one exchange."""
        return self.statement_timeout_s + _CLIENT_SLACK_S


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection that gives up on a server that stops answering.

    PostgreSQL's `statement_timeout` only helps while the server runs: a paused
    or frozen server never sends its cancellation, and psycopg would wait on the
    socket forever (queries, COMMIT, and the pool's pre-ping alike). Every wait
    here has a deadline; past it the connection is closed, so the pool discards
    it and the caller sees an OperationalError (a 503).
    """

    deadline_s: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """Consume a protocol generator, never for longer than the deadline."""
        try:
            return super().wait(gen, interval, timeout if timeout is not None else self.deadline_s)
        except psycopg.errors._WaitTimeout:
            raise _gave_up(self) from None


class BoundedAsyncConnection(psycopg.AsyncConnection[Any]):
    """The asyncio twin of `BoundedConnection`: every wait on the server has a deadline."""

    deadline_s: float | None = None

    async def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """Consume a protocol generator, never for longer than the deadline."""
        try:
            return await super().wait(
                gen, interval, timeout if timeout is not None else self.deadline_s
            )
        except psycopg.errors._WaitTimeout:
            raise _gave_up(self) from None


class DatabaseDeadline(psycopg.OperationalError):
    """The server did not answer within the client's deadline (paused, or its host frozen)."""


def _gave_up(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Exception:
    # Mid-exchange the protocol state is unknown: the connection cannot be reused.
    connection.pgconn.finish()
    return DatabaseDeadline("the database did not answer in time")


def make_engine(url: str, bounds: DatabaseBounds | None = None) -> Engine:
    """An engine whose every call is bounded, with pre-ping so a restarted PostgreSQL heals."""
    bounds = bounds or DatabaseBounds()
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=bounds.pool_size,
        max_overflow=bounds.max_overflow,
        pool_timeout=bounds.pool_timeout_s,
        connect_args=_connect_args(bounds),
    )
    _BOUNDS[engine] = bounds

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        connection = BoundedConnection.connect(*cargs, **cparams)
        connection.deadline_s = bounds.client_deadline_s
        return connection

    return engine


def _connect_args(bounds: DatabaseBounds) -> dict[str, Any]:
    """What every connection is opened with: the server-side timeouts of `bounds`."""
    statement_ms = int(bounds.statement_timeout_s * 1000)
    idle_ms = int(bounds.idle_in_transaction_timeout_s * 1000)
    options = (
        f"-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={idle_ms}"
    )
    return {"connect_timeout": bounds.connect_timeout_s, "options": options}


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """A session that commits if the block succeeds and rolls back if it raises.

    Services only `flush()`; this is the one place that commits. Losing the
    database mid-request becomes a 503, never a 500 with SQL in it.
    """
    with unavailable_as_503(engine), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def unavailable_as_503(engine: Engine) -> Iterator[None]:
    """A busy or lost database becomes UpstreamUnavailable (503 with Retry-After)."""
    try:
        yield
    except PoolTimeout as exc:
        # Every connection is busy (a burst, or a stalled server): retry, not a bug.
        raise _busy(engine) from exc
    except (OperationalError, psycopg.OperationalError) as exc:
        # Includes statement and lock timeouts (QueryCanceled) and client deadlines.
        raise UpstreamUnavailable(
            "the database is unavailable", retry_after=_retry_after(engine)
        ) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise UpstreamUnavailable(
                "the database is unavailable", retry_after=_retry_after(engine)
            ) from exc
        raise


@asynccontextmanager
async def connection_slot(engine: Engine) -> AsyncIterator[None]:
    """Wait, on the event loop, for one of the engine's connections to be free to take.

    Requests wait here and not for a pool connection on a worker thread:
    requests blocked on the pool once held every worker thread while the one
    holding a row lock needed a thread to finish, so a burst of PATCHes on one
    tenant deadlocked until the pool timed out. At most as many requests as the
    pool has connections go on to a thread; past the pool timeout, a 503.
    """
    bounds = bounds_of(engine)
    slots = _connection_slots(engine, bounds.pool_size + bounds.max_overflow)
    try:
        slots.acquire_nowait()  # the common case, without a timer
    except anyio.WouldBlock:
        with anyio.move_on_after(bounds.pool_timeout_s) as waiting:
            await slots.acquire()
        if waiting.cancelled_caught:
            raise _busy(engine) from None
    try:
        yield
    finally:
        slots.release()


async def read(engine: Engine, query: Callable[[AsyncReadConnection], Awaitable[T]]) -> T:
    """`await query(connection)` on a read-only asyncio connection: no worker thread.

    For the broker's most frequent reads (one row by primary key). Autocommit: one
    round trip, no BEGIN and COMMIT; for writes, `write`. Bounded like a unit of work:
    the wait for a connection (`_read_slot`), every exchange (statement timeout and
    client deadline), a lost server: each a 503 with Retry-After. A reused
    connection found dead (the server restarted while it sat idle) takes its idle
    siblings with it, and the read runs once more on a new connection.
    """
    return await _on_async_connection(engine, query)


AsyncReadConnection = psycopg.AsyncConnection[Any]


async def write(engine: Engine, statement: Callable[[AsyncReadConnection], Awaitable[T]]) -> T:
    """`await statement(connection)`: one SQL statement that writes, on `read`'s connections.

    For short writes in plain SQL (a settings PATCH), with no worker thread and no
    ORM. Autocommit: the one statement is its own transaction, so everything it
    writes (a data-modifying CTE may write several tables) commits together or not
    at all, and no lock outlives it. Bounded and healed exactly like `read`, so the
    statement is sent again when its reused connection was found dead, and the first
    attempt may have committed before the connection died: `statement` is called again
    with the same object, and must be safe to send twice (one guarded by the version it
    read is) and tell a first attempt that landed from a lost race (the settings
    PATCH's `_DocumentWrite` looks for its own audit event).
    """
    return await _on_async_connection(engine, statement)


async def _on_async_connection(
    engine: Engine, work: Callable[[AsyncReadConnection], Awaitable[T]]
) -> T:
    readers = _readers(engine)
    async with _read_slot(engine, readers):
        with unavailable_as_503(engine):
            try:
                return await _read_once(readers, work, may_retry=True)
            except _IdleConnectionLost:
                readers.close_idle()
            return await _read_once(readers, work, may_retry=False)


class _IdleConnectionLost(Exception):
    """A reused connection turned out dead: worth one more try on a new one."""


async def _read_once(
    readers: _Readers, query: Callable[[AsyncReadConnection], Awaitable[T]], *, may_retry: bool
) -> T:
    connection, reused = await readers.take()
    try:
        return await query(connection)
    except DatabaseDeadline:
        raise  # a server that does not answer: trying again would only double the wait
    except psycopg.OperationalError:
        if may_retry and reused and connection.broken:
            raise _IdleConnectionLost from None
        raise
    finally:
        readers.give_back(connection)


class _Readers:
    """The asyncio connections `read` uses for one engine: opened on demand, kept while idle."""

    def __init__(self, engine: Engine) -> None:
        bounds = bounds_of(engine)
        url = engine.url.set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        # Named, so an operator (or a test) can tell them from the pool's in pg_stat_activity.
        self.connect_args = _connect_args(bounds) | {"application_name": READER_NAME}
        self.deadline_s = bounds.client_deadline_s
        # As many kept open while idle as the engine's pool keeps; past a burst, the rest close.
        self.keep = bounds.pool_size
        self.idle: deque[BoundedAsyncConnection] = deque()
        self.in_use = 0

    async def take(self) -> tuple[BoundedAsyncConnection, bool]:
        """An idle connection (and True: reused), else a new one."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection, True
        connection = await BoundedAsyncConnection.connect(
            self.conninfo, autocommit=True, **self.connect_args
        )
        connection.deadline_s = self.deadline_s
        return connection, False

    def give_back(self, connection: BoundedAsyncConnection) -> None:
        """Keep a connection that is ready for the next read, if there is room; close any other."""
        ready = connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if ready and len(self.idle) < self.keep:
            self.idle.append(connection)
        else:
            connection.pgconn.finish()

    def close_idle(self) -> None:
        """Close every idle connection (the engine was disposed, or the server restarted)."""
        while self.idle:
            connection = self.idle.pop()  # held while closing: its last reference
            connection.pgconn.finish()


READER_NAME = "broker reads"

_READERS: weakref.WeakKeyDictionary[Engine, _Readers] = weakref.WeakKeyDictionary()

# How often a read waiting for room in the engine's budget looks again.
_ROOM_POLL_S = 0.01


def _readers(engine: Engine) -> _Readers:
    readers = _READERS.get(engine)
    if readers is None:
        readers = _READERS[engine] = _Readers(engine)
        # Disposing of the engine (the app's shutdown) closes these connections too.
        event.listen(engine, "engine_disposed", lambda _: readers.close_idle())
    return readers


@asynccontextmanager
async def _read_slot(engine: Engine, readers: _Readers) -> AsyncIterator[None]:
    """A connection slot, as units of work take, and room in the engine's connection budget.

    One budget per engine, `pool_size + max_overflow`, for its pooled connections
    and these alike: connections the engine lent outside the request paths (a
    job, a script) leave that much less room for reads. Past the pool timeout, a 503.
    """
    bounds = bounds_of(engine)
    budget = bounds.pool_size + bounds.max_overflow
    async with connection_slot(engine):
        if _checked_out(engine) + readers.in_use >= budget:
            with anyio.move_on_after(bounds.pool_timeout_s) as waiting:
                while _checked_out(engine) + readers.in_use >= budget:
                    await anyio.sleep(_ROOM_POLL_S)
            if waiting.cancelled_caught:
                raise _busy(engine)
        readers.in_use += 1
        try:
            yield
        finally:
            readers.in_use -= 1


def _checked_out(engine: Engine) -> int:
    """How many of the engine's pooled connections are lent out now."""
    checked_out = getattr(engine.pool, "checkedout", None)
    return int(checked_out()) if checked_out is not None else 0


# Per event loop (anyio primitives belong to one), per engine.
_SLOTS: RunVar[weakref.WeakKeyDictionary[Engine, anyio.Semaphore]] = RunVar(
    "broker_connection_slots"
)


def _connection_slots(engine: Engine, count: int) -> anyio.Semaphore:
    try:
        slots = _SLOTS.get()
    except LookupError:
        slots = weakref.WeakKeyDictionary()
        _SLOTS.set(slots)
    if engine not in slots:
        slots[engine] = anyio.Semaphore(count)
    return slots[engine]


def bounds_of(engine: Engine) -> DatabaseBounds:
    """The bounds an engine was made with (the defaults for one made elsewhere)."""
    return _BOUNDS.get(engine) or DatabaseBounds()


def _busy(engine: Engine) -> UpstreamUnavailable:
    """Every connection is busy (a burst, or a stalled server): counted, and a 503 to retry."""
    for watcher in _POOL_TIMEOUT_WATCHERS.get(engine, ()):
        watcher()
    return UpstreamUnavailable("the database is busy", retry_after=_retry_after(engine))


def _retry_after(engine: Engine) -> int:
    return bounds_of(engine).retry_after_s


def ping(engine: Engine) -> bool:
    """True when the database answers a trivial query."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except (DBAPIError, PoolTimeout):
        return False


def watch_pool_timeouts(engine: Engine, watcher: Callable[[], None]) -> None:
    """Call `watcher` whenever a unit of work on `engine` finds every pooled connection busy."""
    _POOL_TIMEOUT_WATCHERS.setdefault(engine, []).append(watcher)


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Percent signs in URLs would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    command.upgrade(alembic_config(url), revision)
