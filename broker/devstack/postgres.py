"""An embedded PostgreSQL 16 server for development and tests, via ``pgserver``.

``pgserver`` ships the PostgreSQL binaries in a wheel and runs the server on a Unix socket only
(no TCP port at all), inside the data directory. ``EmbeddedPostgres`` adds what the broker
needs on top: a SQLAlchemy URL for the psycopg 3 driver, an explicit ``stop()``, and a helper to
create one database per test session.

Things pgserver does that are worth knowing:

* When running as root it creates a system user ``pgserver`` (``useradd``), chowns the data
  directory to it and adds ``o+rx`` to every parent directory, because PostgreSQL refuses to run
  as root. Anything that narrows a parent again breaks the next initdb/pg_ctl with "could not
  access directory ...: Permission denied" -- e.g. every pytest session resets
  ``/tmp/pytest-of-root`` to 0700, so as root keep data dirs out of ``tmp_path`` when pytest
  runs may overlap.
* Several processes may share one server; it is stopped when the last *registered* process lets
  go of it (``.handle_pids.json`` in the data directory).
* ``import pgserver`` asks platformdirs for the runtime dir, which warns when
  ``XDG_RUNTIME_DIR`` is unset (it then uses ``/tmp/runtime-<uid>``). We silence exactly that
  warning, because the test suite turns warnings into errors.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from broker.devstack.lifecycle import StartsAndStops

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = ["EmbeddedPostgres", "create_database"]

_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _pgserver() -> type[PostgresServer]:
    # Imported lazily: pgserver is a dev-only dependency of the broker.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR")
        from pgserver.postgres_server import PostgresServer

    return PostgresServer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class EmbeddedPostgres(StartsAndStops):
    """A PostgreSQL server whose data directory is ``data_dir``; the data survives restarts.

    Usage::

        with EmbeddedPostgres(tmp_path) as pg:
            engine = sqlalchemy.create_engine(pg.url)

    ``start()`` returns (and ``url`` holds) a URL such as
    ``postgresql+psycopg://postgres@/postgres?host=/path/to/socket-dir``: user ``postgres``,
    trust authentication, Unix socket only.
    """

    def __init__(self, data_dir: Path) -> None:
        """Prepare (but do not start) a server using ``data_dir`` as its data directory.

        ``data_dir`` is created if missing; it must be empty or hold a cluster made by an
        earlier start (give PostgreSQL a directory of its own, e.g. ``.broker/postgres``).
        """
        self.data_dir = Path(data_dir).absolute()
        self._server: PostgresServer | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg driver) of the ``postgres`` database; set by ``start()``."""
        if self._url is None:
            raise RuntimeError("embedded PostgreSQL has not been started")
        return self._url

    @property
    def pid(self) -> int | None:
        """PID of the postmaster while this object holds the server, else None."""
        return None if self._server is None else self._server.get_pid()

    def start(self) -> str:
        """Start the server (initdb on first use) and return its SQLAlchemy URL. Idempotent."""
        if self._server is not None:
            return self.url
        server_cls = _pgserver()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with server_cls._lock:
            _forget_dead_handles(self.data_dir)
        # Imported with the class above, so no new warning here.
        from pgserver.postgres_server import get_server

        self._server = get_server(self.data_dir, cleanup_mode="stop")
        # pgserver says postgresql://postgres:@/postgres?host=<dir>; keep everything but the
        # driver and the empty password (trust auth).
        raw = make_url(self._server.get_uri())
        url = sa.URL.create(
            "postgresql+psycopg", username=raw.username, database=raw.database, query=raw.query
        )
        self._url = url.render_as_string(hide_password=False)
        return self._url

    def stop(self) -> None:
        """Stop the server (unless another process still holds a handle on it). Idempotent."""
        server, self._server, self._url = self._server, None, None
        if server is None:
            return
        server.cleanup()
        # pgserver registered the same cleanup with atexit; it has run now, so drop it rather
        # than let handlers pile up across stop/start cycles.
        atexit.unregister(server._cleanup)
        # When another process still holds the server, cleanup() returns early and leaves this
        # handle cached; a later get_server() would hand it back without registering us again.
        type(server)._instances.pop(server.pgdata, None)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, running={self._server is not None})"


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop PIDs of dead processes from pgserver's handle list.

    pgserver only stops the server when the handle list contains nothing but the current
    process, and it never removes processes that died without cleaning up (a killed test run).
    Without this, one killed run would keep every later run from ever stopping the server.
    """
    path = pgdata / ".handle_pids.json"
    with contextlib.suppress(OSError, ValueError):
        pids = [int(p) for p in json.loads(path.read_text())]
        alive = [p for p in pids if _pid_alive(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server behind ``url`` and return a URL pointing at it.

    ``name`` must be a plain lower-case identifier (it is interpolated into ``CREATE DATABASE``).
    """
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*, max 63 chars")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")  # no CREATE DATABASE in a tx
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)
