"""The `broker` command. It calls the same services as the API, never a second copy."""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn

from broker.audit.cli import audit_app
from broker.auth.principal import Principal
from broker.core.config import ConfigurationError, Settings, get_settings
from broker.core.logging import configure_logging
from broker.integrations.cli import shopify_app
from broker.legacy.cli import migrate_app

if TYPE_CHECKING:
    from fastapi import FastAPI

# Tracebacks never show local variables: they would print tokens and secrets.
app = typer.Typer(
    help="Multi-tenant secrets broker.", no_args_is_help=True, pretty_exceptions_show_locals=False
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant Transit keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(migrate_app, name="migrate")
app.add_typer(shopify_app, name="shopify")
log = logging.getLogger("broker.cli")


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def dev(
    data_dir: Annotated[Path, typer.Option(help="Where Vault, PostgreSQL and keys live.")] = Path(
        ".broker"
    ),
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1.")] = 8000,
) -> None:
    """Run the embedded default: OpenBao, PostgreSQL, bootstrap, demo tenant, API."""
    from broker.app import create_app
    from broker.devstack.stack import dev_signing_key, mint_dev_tokens, start_dev_stack
    from broker.jobs.worker import alongside

    base = _settings()
    if base.env == "production":
        typer.echo("error: `broker dev` is for development; use `broker serve`", err=True)
        raise typer.Exit(2)
    configure_logging(base.log_level)
    _exit_on_sigterm()
    with ExitStack() as stack:
        settings = start_dev_stack(stack, data_dir, base)
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        tokens = mint_dev_tokens(settings, dev_signing_key(settings.data_dir))
        url = f"http://127.0.0.1:{port}"
        _print_welcome(url, tokens)
        _run(alongside(create_app(settings), settings), host="127.0.0.1", port=port)


def _exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C does, so `broker dev` stops what it started.

    By default SIGTERM ends the process on the spot: OpenBao dies with it, but
    PostgreSQL runs detached (pg_ctl) and was left running. Uvicorn handles
    SIGTERM itself while it serves, then raises it again once it has shut down;
    this handler then turns it into SystemExit, and the ExitStack stops the rest.
    """

    def leave(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)


def _print_welcome(url: str, tokens: object) -> None:
    lines = [
        "",
        f"Broker API:    {url}",
        f"OpenAPI docs:  {url}/docs",
        "",
        "Bearer tokens for the demo tenant (valid 12 h; paste these into your shell):",
        f"export TENANT_ADMIN_TOKEN={tokens.tenant_admin}",  # type: ignore[attr-defined]
        f"export FINANCE_TOKEN={tokens.finance}",  # type: ignore[attr-defined]
        f"export SERVICE_TOKEN={tokens.service}",  # type: ignore[attr-defined]
        f"export SECURITY_AUDITOR_TOKEN={tokens.security_auditor}",  # type: ignore[attr-defined]
        f"export PLATFORM_ADMIN_TOKEN={tokens.platform_admin}",  # type: ignore[attr-defined]
        "",
        "Try it:",
        f'curl -s -H "Authorization: Bearer $TENANT_ADMIN_TOKEN" {url}/v1/tenants/settings',
        "",
        "Ctrl-C stops the API, the job worker, OpenBao and PostgreSQL; the data dir keeps state.",
        "",
    ]
    # Printed, not logged: these are meant for the developer's terminal only.
    print("\n".join(lines), flush=True)  # noqa: T201


@app.command()
def serve() -> None:
    """Serve the API against the Vault and PostgreSQL given by configuration."""
    from broker.app import create_app

    settings = _settings()
    configure_logging(settings.log_level)
    _run(create_app(settings), host=settings.host, port=settings.port)


def _run(api: FastAPI, *, host: str, port: int) -> None:
    """Serve `api` with uvicorn, which must neither rewrite the caller's address nor log URLs.

    Uvicorn believes X-Forwarded-For from 127.0.0.1 by default, before the
    broker sees the request: a local caller could then name any address, dodge
    the per-address limits and write it into the audit trails. The broker reads
    the header itself, from BROKER_TRUSTED_PROXIES only.
    """
    # access_log=False: uvicorn's access log holds raw paths and query strings, which may
    # carry a card number or a token; the broker logs route templates itself (broker.access).
    uvicorn.run(api, host=host, port=port, log_config=None, proxy_headers=False, access_log=False)


@app.command()
def worker(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="A queue to take jobs from; repeat for several."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Jobs run at once (default: BROKER_JOBS_CONCURRENCY)."),
    ] = None,
) -> None:
    """Run background jobs (all queues by default) until SIGTERM or Ctrl-C, then stop cleanly."""
    import asyncio

    from broker.jobs.worker import run_worker

    settings = _settings()
    configure_logging(settings.log_level)
    _database_url(settings)
    asyncio.run(run_worker(settings, queues=queue, concurrency=concurrency))


@app.command()
def token(
    subject: Annotated[str, typer.Option("--sub", help="The token's subject.")],
    scope: Annotated[list[str], typer.Option(help="A scope; repeat for several.")],
    tenant: Annotated[str | None, typer.Option(help="The user's own tenant.")] = None,
    kind: Annotated[str, typer.Option(help="user or service.")] = "user",
    serves: Annotated[
        list[str] | None, typer.Option("--serves", help="A tenant a service may serve.")
    ] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a bearer token with the dev signing key (never in production)."""
    from broker.auth.tokens import mint_token
    from broker.devstack.stack import dev_signing_key

    settings = _settings()
    if settings.env == "production":
        typer.echo("error: tokens come from your identity provider in production", err=True)
        raise typer.Exit(2)
    key = (
        settings.jwt_hs256_secret.get_secret_value()
        if settings.jwt_hs256_secret
        else dev_signing_key(settings.data_dir)
    )
    scopes = [part for item in scope for part in item.split()]
    typer.echo(
        mint_token(
            key,
            subject=subject,
            scopes=scopes,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            tenant_id=tenant,
            kind=kind,
            tenants=serves or [],
            ttl_s=ttl,
        )
    )


@app.command("bootstrap")
def bootstrap_command(
    policies_dir: Annotated[Path | None, typer.Option(help="Folder of *.hcl policies.")] = None,
    audit_file_path: Annotated[
        str | None,
        typer.Option(help="Enable a file audit device here if fewer than two (HashiCorp Vault)."),
    ] = None,
) -> None:
    """Idempotently set up Vault mounts, policies, audited headers and the broker's AppRole.

    Needs a privileged token in BROKER_VAULT_TOKEN.
    """
    from broker.vault.bootstrap import DEFAULT_POLICIES_DIR, bootstrap
    from broker.vault.gateway import VaultGateway

    settings = _settings()
    configure_logging(settings.log_level)
    gateway = VaultGateway.from_settings(settings)
    try:
        report = bootstrap(
            gateway,
            policies_dir=policies_dir or DEFAULT_POLICIES_DIR,
            audit_file_path=audit_file_path,
        )
    finally:
        gateway.close()
    typer.echo(json.dumps(report.__dict__, indent=2))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply database migrations."""
    from broker.core.db import upgrade

    settings = _settings()
    if settings.database_url is None:
        typer.echo("error: BROKER_DATABASE_URL is not set", err=True)
        raise typer.Exit(2)
    upgrade(settings.database_url.get_secret_value(), revision)
    typer.echo(f"database at {revision}")


OPERATOR_SCOPES = frozenset({"platform:admin"})


def _operator() -> Principal:
    """The CLI acts as the operator running it; Vault's audit log names them."""
    import getpass

    from broker.core import context

    principal = Principal(subject=f"cli:{getpass.getuser()}", kind="user", scopes=OPERATOR_SCOPES)
    context.bind(context.RequestContext(request_id=f"cli-{uuid.uuid4()}", actor=principal.actor))
    return principal


@keys_app.command("rotate")
def keys_rotate(
    tenant: Annotated[str | None, typer.Option(help="Rotate this tenant's key.")] = None,
    all_tenants: Annotated[bool, typer.Option("--all", help="Rotate every tenant's key.")] = False,
) -> None:
    """Rotate tenant keys, rewrap their secrets and retire old key versions (resumable)."""
    from broker.core.db import make_engine
    from broker.tenants.keys import RotationReport, live_tenant_ids, rotate_all
    from broker.vault.gateway import VaultGateway

    if bool(tenant) == all_tenants:
        typer.echo("error: give exactly one of --tenant T or --all", err=True)
        raise typer.Exit(2)
    settings = _settings()
    configure_logging(settings.log_level)
    principal = _operator()
    engine = make_engine(_database_url(settings))
    vault = VaultGateway.from_settings(settings)
    totals = {"tenants": 0, "rewrapped": 0, "already_current": 0, "failed": 0}
    try:
        tenant_ids = [tenant] if tenant else live_tenant_ids(engine)
        with typer.progressbar(length=len(tenant_ids), label="rotating", file=sys.stderr) as bar:

            def done(report: RotationReport) -> None:
                totals["tenants"] += 1
                totals["rewrapped"] += report.rewrapped
                totals["already_current"] += report.already_current
                totals["failed"] += len(report.failed)
                for item in report.failed:
                    typer.echo(f"{report.tenant_id}: {item} could not be rewrapped", err=True)
                bar.update(1)

            rotate_all(engine, vault, principal=principal, tenant_ids=tenant_ids, on_done=done)
    finally:
        vault.close()
        engine.dispose()
    typer.echo(json.dumps(totals))


@keys_app.command("backfill")
def keys_backfill() -> None:
    """Create the Transit key of every tenant that lacks one."""
    from broker.core.db import make_engine
    from broker.tenants.keys import backfill_keys
    from broker.vault.gateway import VaultGateway

    settings = _settings()
    configure_logging(settings.log_level)
    _operator()
    engine = make_engine(_database_url(settings))
    vault = VaultGateway.from_settings(settings)
    try:
        created = backfill_keys(engine, vault)
    finally:
        vault.close()
        engine.dispose()
    typer.echo(json.dumps({"created": created}))


def _database_url(settings: Settings) -> str:
    if settings.database_url is None:
        typer.echo("error: BROKER_DATABASE_URL is not set", err=True)
        raise typer.Exit(2)
    return settings.database_url.get_secret_value()


def main() -> None:
    """Entry point of the `broker` console script."""
    try:
        app()
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
