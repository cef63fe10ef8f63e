"""`broker shopify migrate-expiring`: pasted Shopify tokens become expiring, refreshed ones.

Registered in `broker.cli` with `app.add_typer(shopify_app, name="shopify")`. It calls
the same service as `POST .../shopify/migrate-expiring`, tenant after tenant.
"""

from __future__ import annotations

import io
import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli_support import database_url, load_settings, operator
from broker.core.errors import BrokerError

if TYPE_CHECKING:
    from broker.integrations.oauth import MigrationReport

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3

shopify_app = typer.Typer(help="Shopify connections.", no_args_is_help=True)


@shopify_app.callback()
def _group() -> None:
    """Shopify connections."""


@shopify_app.command("migrate-expiring")
def migrate_expiring(
    tenant: Annotated[
        list[str] | None, typer.Option("--tenant", help="Only this tenant; repeat for more.")
    ] = None,
    all_tenants: Annotated[
        bool, typer.Option("--all", help="Every tenant whose Shopify token was pasted.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would happen; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Exchange pasted non-expiring Shopify tokens for expiring ones (resumable, irreversible)."""
    from broker.app import oauth_access_for, outbound_for
    from broker.core.db import make_engine
    from broker.core.logging import configure_logging
    from broker.integrations import oauth
    from broker.vault.gateway import VaultGateway

    if bool(tenant) == all_tenants:
        typer.echo("error: give --tenant T (repeatable) or --all", err=True)
        raise typer.Exit(EXIT_USAGE)
    settings = load_settings()
    configure_logging(settings.log_level)
    principal = operator()
    engine = make_engine(database_url(settings))
    vault = VaultGateway.from_settings(settings)
    outbound = outbound_for(settings)
    access = oauth_access_for(settings, engine=engine, vault=vault, outbound=outbound)
    try:
        tenant_ids = tenant or oauth.pasted_tenants(engine, provider="shopify")
        with typer.progressbar(
            length=len(tenant_ids),
            label="checking" if dry_run else "migrating",
            # A bar only on a terminal; a pipe or a log file gets the report alone.
            file=sys.stderr if sys.stderr.isatty() else io.StringIO(),
        ) as bar:
            report = oauth.migrate_tenants(
                access,
                principal=principal,
                provider="shopify",
                tenant_ids=tenant_ids,
                dry_run=dry_run,
                on_done=lambda _tenant, _outcome: bar.update(1),
            )
    except BrokerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_INCOMPLETE if exc.status >= 500 else EXIT_USAGE) from None
    finally:
        outbound.client.close()
        vault.close()
        engine.dispose()
    _print_report(report, len(tenant_ids), dry_run=dry_run, as_json=as_json)
    if not report.ok:
        raise typer.Exit(EXIT_INCOMPLETE)


def _print_report(report: MigrationReport, tenants: int, *, dry_run: bool, as_json: bool) -> None:
    """The migration's outcome: counts by outcome, then each failure."""
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    lines = [f"{'dry run: ' if dry_run else ''}{tenants} tenant(s)"]
    lines += [f"  {outcome}: {count}" for outcome, count in sorted(report.outcomes.items())]
    lines += [f"  failed {item['tenant_id']}: {item['error']}" for item in report.failures]
    typer.echo("\n".join(lines))
