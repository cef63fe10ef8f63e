"""`broker audit`: the security team's view of Vault's audit log and the broker's trail.

    broker audit [LOG ...] [--tenant T] [--actor A] [--provider P]
                 [--since 24h] [--until ISO] [--denied] [--format table|jsonl|csv]
    broker audit find-value [LOG ...] [--device broker] < value

Registered in `broker.cli` with `app.add_typer(audit_app, name="audit")`.
`broker audit ARGS` runs the `report` command unless ARGS start with another
command's name.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from broker.cli_support import configured_database_url, fail, load_settings, operator
from broker.core.config import ConfigurationError

if TYPE_CHECKING:
    from broker.audit.report import TimelineRow
    from broker.audit.vault_log import Filters, ReadStats, VaultAuditEntry

# The log reader and the report (SQLAlchemy, the models) are imported by the commands
# that use them, so that `broker --help` and every other command start without them.

_HELP = """\
Audit reports for the security team: who touched which tenant's secrets, when,
from where, and whether it was allowed.

Reads Vault/OpenBao file audit logs (plain or rotated and gzipped) and merges
in the broker's own audit trail from PostgreSQL. Needs read access to the
audit log files (and, for the trail, the database); this is the security
team's tool, not an API caller's (those use the audit:read scope).

Without a command, `broker audit [LOG ...] [OPTIONS]` runs `report`:

    broker audit --tenant acme --since 24h

answers "who accessed acme's credentials in the last 24 hours, from where,
and was it allowed?".
"""


class _ReportByDefault(TyperGroup):
    """A group that runs `report` when the first argument names no other command."""

    default_command = "report"

    # `ctx` is Typer's vendored click Context, which it does not export.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    cls=_ReportByDefault,
    help=_HELP,
    no_args_is_help=False,
)


class OutputFormat(StrEnum):
    """How a report is printed."""

    table = "table"
    jsonl = "jsonl"
    csv = "csv"


LogsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Audit log files, plain or .gz, oldest first. Default: <data dir>/vault/audit.log "
        "and its rotated siblings (audit.log.1, audit.log.2.gz, ...).",
        show_default=False,
        metavar="LOG",
    ),
]
SinceOpt = Annotated[
    str | None,
    typer.Option(help="Only from this time: ISO 8601 (UTC unless zoned) or 90s, 30m, 24h, 7d, 2w."),
]
UntilOpt = Annotated[str | None, typer.Option(help="Only up to this time (same forms as --since).")]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table for people; jsonl or csv for tools.")
]


def _when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    from broker.audit import vault_log

    try:
        return vault_log.parse_when(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _log_paths(logs: Sequence[Path] | None, *, name_missing: bool = True) -> list[Path]:
    if logs:
        missing = [str(path) for path in logs if not path.is_file()]
        if missing and name_missing:
            raise fail(f"no such audit log: {', '.join(missing)}", 2)
        if missing:
            # find-value: a stray argument may be the secret itself; never echo it.
            raise fail(
                f"{len(missing)} LOG argument(s) are not files; the value is read from stdin, "
                "never from the command line",
                2,
            )
        return list(logs)
    from broker.audit import vault_log

    data_dir = load_settings().data_dir
    found = vault_log.default_log_paths(data_dir)
    if not found:
        raise fail(
            f"no audit log under {data_dir / 'vault'}; name the files, "
            "e.g. broker audit /var/log/openbao/audit.log*",
            2,
        )
    return found


def _report_stats(stats: ReadStats) -> None:
    if stats.malformed:
        typer.echo(f"note: skipped {stats.malformed} lines that are not audit entries", err=True)
    for path in stats.truncated_files:
        typer.echo(f"warning: {path} ends early (truncated gzip); read what was there", err=True)


def _filters(
    *,
    tenant: str | None = None,
    actor: str | None = None,
    provider: str | None = None,
    since: str | None = None,
    until: str | None = None,
    denied: bool = False,
) -> Filters:
    from broker.audit.vault_log import Filters

    filters = Filters(
        tenant=tenant,
        actor=actor,
        provider=provider,
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        denied=denied,
    )
    if filters.since and filters.until and filters.since > filters.until:
        raise typer.BadParameter("--since is after --until", param_hint="--since")
    return filters


@audit_app.command("report")
def report_command(
    logs: LogsArg = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Only this tenant: its data (from the path) or its callers."),
    ] = None,
    actor: Annotated[
        str | None,
        typer.Option(help="Only this caller: user:alice, service:catalog-sync, or just alice."),
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help="Only this provider's credentials (shopify, twilio, ...).")
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    denied: Annotated[bool, typer.Option("--denied", help="Only denied requests.")] = False,
    fmt: FormatOpt = OutputFormat.table,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL with the broker's audit trail. Default: BROKER_DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
    no_trail: Annotated[
        bool, typer.Option("--no-trail", help="Vault's audit log only; skip the broker's trail.")
    ] = False,
) -> None:
    """One timeline of Vault calls and broker audit events (the default command).

    Each Vault request is joined to its response; outcomes are allowed,
    denied, failed or unknown (no response logged). Broker events (settings
    changes, payment methods, denials that never reached Vault) are merged in
    by request id, and lend their client address to the Vault calls of the
    same request.
    """
    filters = _filters(
        tenant=tenant, actor=actor, provider=provider, since=since, until=until, denied=denied
    )
    from broker.audit import vault_log

    paths = _log_paths(logs)
    stats = vault_log.ReadStats()
    try:
        entries = vault_log.load(paths, filters, stats=stats)
    except OSError as exc:
        raise fail(f"cannot read the audit log: {exc}") from None
    _report_stats(stats)

    rows = _timeline(entries, _trail_url(database_url, no_trail=no_trail), filters)
    _print_report(rows, fmt)


def _trail_url(database_url: str | None, *, no_trail: bool) -> str | None:
    """The database with the broker's trail: the option, else the configuration, else none."""
    if no_trail:
        return None
    url = database_url or configured_database_url(load_settings())
    if url is None:
        typer.echo(
            "note: no database (--database-url or BROKER_DATABASE_URL): "
            "Vault's audit log only, without the broker's trail",
            err=True,
        )
    return url


def _print_report(rows: list[TimelineRow], fmt: OutputFormat) -> None:
    """The rows on stdout; for people, a one-line summary on stderr."""
    from broker.audit.report import render

    if not rows:
        typer.echo("no matching entries", err=True)
        if fmt is not OutputFormat.table:
            return
    typer.echo(render(rows, fmt.value), nl=False)
    if rows and fmt is OutputFormat.table:
        denied_count = sum(1 for row in rows if row.outcome == "denied")
        vault_count = sum(1 for row in rows if row.source == "vault")
        typer.echo(
            f"{len(rows)} entries: {vault_count} Vault calls, "
            f"{len(rows) - vault_count} broker events, {denied_count} denied",
            err=True,
        )


def _timeline(
    entries: list[VaultAuditEntry], url: str | None, filters: Filters
) -> list[TimelineRow]:
    from broker.audit.report import timeline

    if url is None:
        return timeline(entries, None, filters)
    from sqlalchemy.exc import SQLAlchemyError

    from broker.core.db import make_engine

    engine = make_engine(url)
    try:
        return timeline(entries, engine, filters)
    except SQLAlchemyError as exc:
        # Never print the URL: it may carry a password.
        raise fail(
            f"cannot read the broker's audit trail ({type(exc).__name__}); "
            "check BROKER_DATABASE_URL or use --no-trail"
        ) from None
    finally:
        engine.dispose()


def _read_secret() -> str:
    stdin = typer.get_text_stream("stdin")
    if stdin.isatty():
        value = str(typer.prompt("Value to look for (not echoed)", hide_input=True, err=True))
    else:
        value = stdin.read()
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise fail("no value on stdin; pipe it in, e.g. broker audit find-value < value.txt", 2)
    return value


def _audit_hash(device: str, value: str) -> str:
    from broker.core.errors import BrokerError
    from broker.vault.errors import VaultMisconfigured, VaultUnavailable
    from broker.vault.gateway import VaultGateway

    settings = load_settings()
    gateway = VaultGateway.from_settings(settings)

    def call() -> str:
        # The lookup is itself audited: name who ran it.
        operator(action="audit.find-value")
        return gateway.audit.hash(device, value)

    try:
        # In a copy of the context, so the binding never outlives the call.
        return contextvars.copy_context().run(call)
    except VaultMisconfigured:
        raise fail(
            "Vault refused to hash the value: the token in BROKER_VAULT_TOKEN needs "
            f"the security-auditor policy (and {device!r} must be an enabled audit device)"
        ) from None
    except BrokerError as exc:
        unreachable = isinstance(exc, VaultUnavailable)
        hint = "" if unreachable else f"; is {device!r} an enabled audit device?"
        raise fail(f"{exc.message}{hint}") from None
    finally:
        gateway.close()


@audit_app.command("find-value")
def find_value_command(
    logs: LogsArg = None,
    device: Annotated[
        str, typer.Option(help="The audit device whose HMAC key wrote the logs.")
    ] = "broker",
    since: SinceOpt = None,
    until: UntilOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    include_lookups: Annotated[
        bool,
        typer.Option(
            "--include-lookups",
            help="Also list sys/audit-hash calls that hashed this value (earlier searches).",
        ),
    ] = False,
) -> None:
    """List every audit entry that touched a secret value. The value is read from stdin.

    Vault logs secrets as HMACs, never in clear. This asks Vault for the
    value's HMAC (sys/audit-hash/<device>, which needs the security-auditor
    policy on BROKER_VAULT_TOKEN) and lists the calls whose request or
    response contains it. The value is never printed and never taken as an
    argument, so it stays out of shell history and process listings.

    The broker stores credentials as Transit ciphertext, so this finds values
    written to Vault as they are (a leaked token stored in KV, say), and the
    ciphertext itself when you search for a `vault:v1:...` string.
    """
    from broker.audit import vault_log
    from broker.audit.report import render, timeline

    filters = _filters(since=since, until=until)
    paths = _log_paths(logs, name_missing=False)
    value = _read_secret()
    hmac = _audit_hash(device, value)
    if not hmac.startswith(vault_log.HMAC_PREFIX):
        raise fail("Vault returned an unexpected hash")
    stats = vault_log.ReadStats()
    try:
        entries = vault_log.load(paths, filters, stats=stats, where=vault_log.contains_text(hmac))
    except OSError as exc:
        raise fail(f"cannot read the audit log: {exc}") from None
    _report_stats(stats)
    if not include_lookups:
        entries = [e for e in entries if not e.path.startswith("sys/audit-hash/")]
    rows = timeline(entries, None, filters)
    typer.echo(f"{len(rows)} audit entries touched the value ({hmac})", err=True)
    if rows or fmt is OutputFormat.table:
        typer.echo(render(rows, fmt.value), nl=False)


def main() -> None:  # pragma: no cover - for `python -m broker.audit.cli`
    """Run the audit commands on their own."""
    try:
        audit_app()
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
