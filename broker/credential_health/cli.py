"""`broker credentials report`: the platform's cross-tenant view of credentials with problems."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli_support import database_url, load_settings

if TYPE_CHECKING:
    from broker.credential_health.age import ReportRow

credentials_app = typer.Typer(help="Stored credentials across tenants.", no_args_is_help=True)

EXIT_USAGE = 2
EXIT_PROBLEMS = 1


@credentials_app.callback()
def _group() -> None:
    """Stored credentials across tenants."""


@credentials_app.command("report")
def report_command(
    problem: Annotated[
        list[str] | None,
        typer.Option(
            "--problem",
            help="overdue, due, expiring, expired, failing or needs_reconnect; repeatable.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines, one per credential.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=1_000_000)] = 10_000,
) -> None:
    """List credentials that are overdue for rotation, expiring, or failing their checks.

    Exits 1 when any is listed, so a cron job can alert on it.
    """
    from broker.core.db import make_engine
    from broker.credential_health import age

    wanted = frozenset(problem or age.PROBLEMS)
    unknown = wanted - set(age.PROBLEMS)
    if unknown:
        typer.echo(f"error: unknown problem(s): {', '.join(sorted(unknown))}", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = load_settings()
    engine = make_engine(database_url(settings))
    try:
        rows = age.report(engine, settings, problems=wanted, limit=limit)
    finally:
        engine.dispose()
    for row in rows:
        if as_json:
            typer.echo(json.dumps(_plain(row), sort_keys=True))
        else:
            due = row.rotation_due_at or row.expires_at
            typer.echo(
                f"{row.tenant_id:<30} {row.provider:<12} {','.join(row.problems):<24} "
                f"{due.date().isoformat() if due else '-':<10} {row.health_reason or ''}"
            )
    if not as_json:
        typer.echo(f"{len(rows)} credential(s) with problems", err=True)
    if rows:
        raise typer.Exit(EXIT_PROBLEMS)


def _plain(row: ReportRow) -> dict[str, object]:
    values = asdict(row)
    values["problems"] = row.problems
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}
