"""EmbeddedPostgres against a real PostgreSQL server started by pgserver (no mocks)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from broker.devstack.postgres import EmbeddedPostgres, create_database
from tests.support import processes
from tests.support.processes import alive


def scalar(url: str, query: str) -> object:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query)).scalar()
    finally:
        engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    return processes.wait_dead(pid, timeout)


def fresh_dir() -> Iterator[Path]:
    """A data dir outside pytest's basetemp, removed afterwards.

    As root, pgserver runs PostgreSQL as the user "pgserver" and opens up the data dir's parent
    directories for it (o+rx). Every pytest session starting on this machine resets
    /tmp/pytest-of-root back to 0700, so a concurrent pytest run would make initdb or pg_ctl
    fail with "could not access directory ...: Permission denied".
    """
    path = Path(tempfile.mkdtemp(prefix="devstack-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    yield from fresh_dir()


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    for path in fresh_dir():
        with EmbeddedPostgres(path) as server:
            yield server


def test_start_returns_a_psycopg_url_that_answers(pg: EmbeddedPostgres) -> None:
    assert pg.url.startswith("postgresql+psycopg://postgres@/postgres?host=")
    assert pg.start() == pg.url  # idempotent
    assert scalar(pg.url, "select 1") == 1
    assert str(scalar(pg.url, "show server_version")).startswith("16.")


def test_listens_on_unix_socket_only(pg: EmbeddedPostgres) -> None:
    assert scalar(pg.url, "show listen_addresses") == ""


def test_create_database_is_isolated(pg: EmbeddedPostgres) -> None:
    first = create_database(pg.url, "session_a")
    second = create_database(pg.url, "session_b")
    assert first.endswith("/session_a?host=" + pg.url.split("?host=")[1])
    execute(first, "create table t (x int)", "insert into t values (1)")
    assert scalar(first, "select count(*) from t") == 1
    assert scalar(second, "select to_regclass('public.t') is null") is True
    assert scalar(pg.url, "select to_regclass('public.t') is null") is True


def test_create_database_rejects_unsafe_names(pg: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        create_database(pg.url, 'x"; drop database postgres; --')


def test_data_survives_restart_and_stop_ends_the_server(pg_dir: Path) -> None:
    server = EmbeddedPostgres(pg_dir)
    url = create_database(server.start(), "persisted")
    execute(url, "create table kept (v text)", "insert into kept values ('still here')")
    first_pid = server.pid
    assert first_pid is not None
    server.stop()
    assert server.pid is None
    assert wait_dead(first_pid), "postmaster still running after stop()"
    server.stop()  # idempotent

    # A new object, as a new process would have.
    with EmbeddedPostgres(pg_dir) as again:
        assert again.pid is not None
        assert again.pid != first_pid
        url = create_database_url(again.url, "persisted")
        assert scalar(url, "select v from kept") == "still here"
        second_pid = again.pid
    assert wait_dead(second_pid)


def create_database_url(url: str, name: str) -> str:
    """URL of an existing database ``name`` on the same server."""
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


def test_url_before_start_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not been started"):
        _ = EmbeddedPostgres(tmp_path).url


def test_stop_works_after_a_previous_holder_was_killed(pg_dir: Path) -> None:
    # A test run killed with SIGKILL never lets go of its pgserver handle and leaves the
    # server running; the next EmbeddedPostgres on that dir must still be able to stop it.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from broker.devstack.postgres import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres(Path(sys.argv[1]))\n"
        "pg.start()\n"
        "print(pg.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(pg_dir)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        orphan_pid = int(holder.stdout.readline())
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert alive(orphan_pid)  # pgserver's postmaster does not die with its starter

        server = EmbeddedPostgres(pg_dir)
        server.start()
        assert server.pid == orphan_pid  # attached to the running server
        server.stop()
        assert wait_dead(orphan_pid), "the orphaned server was not stopped"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
