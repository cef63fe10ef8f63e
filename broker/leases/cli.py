"""`broker leases`: list the lease registry, revoke leases, and sweep what is overdue.

Registered in `broker.cli` with `app.add_typer(leases_app, name="leases")`. It calls the
same service as the routes (`broker.leases.service`), as the operator running it: every
Vault call and trail event names them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli_support import database_url, load_settings, operator
from broker.core.errors import BrokerError

if TYPE_CHECKING:
    from broker.leases.service import Leasing

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3

leases_app = typer.Typer(help="Dynamic credential leases.", no_args_is_help=True)

TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Only this tenant's leases.")]
ProviderOpt = Annotated[str | None, typer.Option("--provider", help="Only this provider's.")]
ServiceOpt = Annotated[
    str | None, typer.Option("--service", help="Only this service's (its token subject).")
]


@leases_app.callback()
def _group() -> None:
    """Dynamic credential leases."""


@contextmanager
def _leasing() -> Iterator[Leasing]:
    """The lease machinery on the configured database and Vault (closed afterwards)."""
    from broker.app import outbound_for
    from broker.core.db import make_engine
    from broker.core.logging import configure_logging
    from broker.leases.service import Leasing
    from broker.vault.gateway import VaultGateway

    settings = load_settings()
    configure_logging(settings.log_level)
    engine = make_engine(database_url(settings))
    vault = VaultGateway.from_settings(settings)
    outbound = outbound_for(settings)
    leasing = Leasing.from_settings(settings, engine=engine, vault=vault, outbound=outbound)
    try:
        yield leasing
    except BrokerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_INCOMPLETE if exc.status >= 500 else EXIT_USAGE) from None
    finally:
        leasing.calls.close()
        outbound.client.close()
        vault.close()
        engine.dispose()


@leases_app.command("list")
def list_leases(
    tenant: TenantOpt = None,
    provider: ProviderOpt = None,
    service: ServiceOpt = None,
    state: Annotated[
        str | None,
        typer.Option(help="minting, active, revoked, or failing (revocations being retried)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per lease.")] = False,
) -> None:
    """The registry: ids, services, key ids, times and revocation state (never a secret)."""
    from broker.core.db import unit_of_work
    from broker.leases import service as leases
    from broker.leases.schemas import LeaseView

    if state not in (None, "minting", "active", "revoked", "failing"):
        typer.echo("error: --state is minting, active, revoked or failing", err=True)
        raise typer.Exit(EXIT_USAGE)
    with _leasing() as leasing, unit_of_work(leasing.engine) as session:
        rows = leases.list_leases(
            session,
            tenant_id=tenant,
            provider=provider,
            subject=service,
            state=state,
            limit=limit,
        )
        views = [LeaseView.of(row) for row in rows]
    for view in views:
        if as_json:
            typer.echo(view.model_dump_json())
        else:
            failing = (
                f" attempts={view.revoke_attempts} error={view.last_error}"
                if (view.revoke_attempts and view.state != "revoked")
                else ""
            )
            typer.echo(
                f"{view.id} {view.tenant_id} {view.provider} {view.subject} {view.state}"
                f" expires={view.expires_at.isoformat()}"
                + (f" revoked={view.revoked_at.isoformat()}" if view.revoked_at else "")
                + failing
            )
    if not as_json:
        typer.echo(f"{len(views)} lease(s)", err=True)


@leases_app.command("revoke")
def revoke(
    lease: Annotated[str | None, typer.Option("--lease", help="One lease, by id.")] = None,
    tenant: TenantOpt = None,
    provider: ProviderOpt = None,
    service: ServiceOpt = None,
) -> None:
    """Revoke now: one lease, a tenant's (or one provider's of it), or a service's everywhere."""
    from broker.leases import service as leases

    if not (lease or tenant or service):
        typer.echo("error: give --lease ID, --tenant T [--provider P], or --service S", err=True)
        raise typer.Exit(EXIT_USAGE)
    principal = operator()
    with _leasing() as leasing:
        result = leases.revoke_matching(
            leasing,
            leases.Selector(lease_id=lease, tenant_id=tenant, provider=provider, subject=service),
            principal=principal,
            reason="requested",
            inline=100_000,
        )
    typer.echo(json.dumps(vars(result)))
    if result.failed or result.queued:
        typer.echo(
            f"error: {result.failed + result.queued} lease(s) not revoked yet; the sweep retries",
            err=True,
        )
        raise typer.Exit(EXIT_INCOMPLETE)


@leases_app.command("sweep")
def sweep() -> None:
    """Revoke every lease that is due now (what the worker's periodic sweep does)."""
    from broker.leases import service as leases

    principal = operator()
    total = leases.Revocations()
    with _leasing() as leasing:
        while True:
            batch = leases.revoke_due(leasing, actor=principal)
            total.revoked += batch.revoked
            total.failed += batch.failed
            total.queued += batch.queued
            if batch.revoked == 0 or batch.revoked + batch.failed < leases.SWEEP_BATCH:
                break
    typer.echo(json.dumps(vars(total)))
    if total.failed:
        typer.echo(f"error: {total.failed} revocation(s) failed; retried later", err=True)
        raise typer.Exit(EXIT_INCOMPLETE)
