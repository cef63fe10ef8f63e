"""procrastinate's tables, applied by Alembic from the SQL the installed package ships."""

from __future__ import annotations

from importlib import resources

from sqlalchemy import Connection

# Everything procrastinate creates is named with this prefix.
PREFIX = "procrastinate_"

# Its schema.sql has no drop script; these remove every object it creates
# (functions and triggers go with the CASCADE on tables and types).
_DROP = """
DROP TABLE IF EXISTS procrastinate_events, procrastinate_periodic_defers,
    procrastinate_jobs, procrastinate_workers CASCADE;
DO $$
DECLARE f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\\_%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f.signature || ' CASCADE';
    END LOOP;
END;
$$;
DROP TYPE IF EXISTS procrastinate_job_status, procrastinate_job_event_type,
    procrastinate_job_to_defer_v1 CASCADE;
"""


def schema_sql() -> str:
    """The complete schema of the installed procrastinate version."""
    return (resources.files("procrastinate.sql") / "schema.sql").read_text(encoding="utf-8")


def _execute_script(connection: Connection, script: str) -> None:
    # The raw driver runs a parameterless multi-statement script as it is, in
    # Alembic's transaction; SQLAlchemy's text() would read `:name` and `%`.
    with connection.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(script)


def create(connection: Connection) -> None:
    """Create procrastinate's tables, types, functions and triggers."""
    _execute_script(connection, schema_sql())


def drop(connection: Connection) -> None:
    """Remove everything `create` made."""
    _execute_script(connection, _DROP)


def owned_by_broker(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic `include_name`: autogenerate leaves procrastinate's tables alone."""
    return not (type_ == "table" and name is not None and name.startswith(PREFIX))
