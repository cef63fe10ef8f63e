"""`broker migrate legacy`: move the legacy Twilio columns into Vault, then retire them.

    broker migrate legacy --source-dsn DSN [--dry-run] [--tenant ID ...] [--batch N]
    broker migrate legacy --source-dsn DSN --finalize [--dry-run] [--tenant ID ...]

Registered in `broker.cli` with `app.add_typer(migrate_app, name="migrate")`.
The broker's own database and Vault come from the usual `BROKER_*`
configuration; the legacy table from `--source-dsn` (or
`BROKER_LEGACY_SOURCE_DSN`, which keeps a password out of the process list).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli_support import database_url, load_settings, operator_principal
from broker.core.errors import BrokerError
from broker.legacy import DEFAULT_BATCH

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from broker.legacy.reports import FinalizeReport, MigrationReport
    from broker.legacy.source import LegacyTable
    from broker.vault.gateway import VaultGateway

# Tracebacks never show local variables: they would print secrets.
migrate_app = typer.Typer(
    help="Migrate tenants from the legacy application into the broker.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

EXIT_INCOMPLETE = 1
"""Something failed, conflicted or was not reached; details are in the summary."""
EXIT_USAGE = 2


@migrate_app.callback()
def _group() -> None:
    """Migrate tenants from the legacy application into the broker."""


SourceDsn = Annotated[
    str,
    typer.Option(
        "--source-dsn",
        envvar="BROKER_LEGACY_SOURCE_DSN",
        help="Database URL of the legacy application (may be the broker's own database).",
        show_default=False,
        show_envvar=True,
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Report what would happen; change nothing.")
]
Tenants = Annotated[
    list[str] | None,
    typer.Option("--tenant", help="Only this legacy tenant (legacy id or tenant id); repeat."),
]
Batch = Annotated[int, typer.Option("--batch", min=1, max=10_000, help="Tenants per batch.")]
Finalize = Annotated[
    bool,
    typer.Option("--finalize", help="Phase 4: null the legacy secret columns of verified tenants."),
]
Table = Annotated[str, typer.Option("--table", help="Legacy table, optionally schema-qualified.")]
IdColumn = Annotated[str, typer.Option("--id-column", help="Column of the legacy tenant id.")]
NameColumn = Annotated[str, typer.Option("--name-column", help="Column of the tenant's name.")]
SidColumn = Annotated[str, typer.Option("--sid-column", help="Column of the Twilio account SID.")]
TokenColumn = Annotated[
    str, typer.Option("--token-column", help="Column of the Twilio auth token.")
]
MetadataColumn = Annotated[
    str, typer.Option("--metadata-column", help="Column of the free-form JSON metadata.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of text.")]


@migrate_app.command("legacy")
def legacy(
    source_dsn: SourceDsn,
    dry_run: DryRun = False,
    tenant: Tenants = None,
    batch: Batch = DEFAULT_BATCH,
    finalize: Finalize = False,
    table: Table = "tenants",
    id_column: IdColumn = "id",
    name_column: NameColumn = "name",
    sid_column: SidColumn = "twilio_sid",
    token_column: TokenColumn = "twilio_token",  # noqa: S107 - a column name, not a secret
    metadata_column: MetadataColumn = "metadata",
    as_json: AsJson = False,
) -> None:
    """Migrate legacy Twilio credentials into Vault and metadata into settings (resumable).

    Exits 1 when any tenant failed, conflicted or was not reached.
    """
    from broker.legacy.source import LegacyColumns, LegacyTable

    columns = LegacyColumns(
        id=id_column,
        name=name_column,
        twilio_sid=sid_column,
        twilio_token=token_column,
        metadata=metadata_column,
    )
    run = _Run(
        source_dsn,
        LegacyTable(name=table, columns=columns),
        dry_run=dry_run,
        tenants=tenant,
        batch_size=batch,
        finalize=finalize,
    )
    report = run.execute()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    elif finalize:
        typer.echo(_finalize_text(report.as_dict()))
    else:
        typer.echo(_migrate_text(report.as_dict()))
    if not report.ok:
        raise typer.Exit(EXIT_INCOMPLETE)


@dataclass
class _Run:
    """One `broker migrate legacy` run: what to read, and how."""

    source_dsn: str = field(repr=False)
    table: LegacyTable
    dry_run: bool
    tenants: list[str] | None
    batch_size: int
    finalize: bool

    def execute(self) -> MigrationReport | FinalizeReport:
        """Connect to the broker's database and Vault and to the legacy table; run."""
        from broker.core.db import make_engine
        from broker.core.logging import configure_logging
        from broker.vault.gateway import VaultGateway

        settings = load_settings()
        configure_logging(settings.log_level)
        engine = make_engine(database_url(settings))
        vault = VaultGateway.from_settings(settings)
        try:
            return self._against(engine, vault)
        except BrokerError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(EXIT_INCOMPLETE if exc.status >= 500 else EXIT_USAGE) from None
        finally:
            vault.close()
            engine.dispose()

    def _against(self, engine: Engine, vault: VaultGateway) -> MigrationReport | FinalizeReport:
        from broker.legacy.finalize import finalize_legacy
        from broker.legacy.migrate import migrate_legacy
        from broker.legacy.source import LegacySource

        progress = _Progress("finalizing" if self.finalize else "migrating")
        source = LegacySource(self.source_dsn, broker_engine=engine, table=self.table)
        options: dict[str, Any] = {
            "dry_run": self.dry_run,
            "tenants": self.tenants,
            "batch_size": self.batch_size,
            "subject": operator_principal(subject_prefix="legacy-migration").subject,
            "on_progress": progress,
        }
        try:
            if self.finalize:
                return finalize_legacy(engine, vault, source, **options)
            return migrate_legacy(engine, vault, source, **options)
        finally:
            progress.close()
            source.close()


class _Progress:
    """A progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._enabled = sys.stderr.isatty()

    def __call__(self, advanced: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            self._bar = typer.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(advanced)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _summary(
    report: dict[str, Any], what: str, counts: tuple[tuple[str, str], ...], *, width: int
) -> list[str]:
    """The heading, the counts (label, summary key) in a column `width` wide, and why it stopped."""
    lines = [f"{what} from {report['source']} (run {report['run_id']})"]
    if report["dry_run"]:
        lines.append("DRY RUN: nothing was changed; the counts say what would happen.")
    lines += [f"  {label:<{width}}{report['summary'][key]}" for label, key in counts]
    if report["stopped"]:
        lines.append(f"STOPPED: {report['stopped']}")
    return lines


def _listed(tenants: list[dict[str, Any]], heading: str, status: str) -> list[str]:
    """The tenants that ended with `status`, under `heading`, with their reasons."""
    chosen = [t for t in tenants if t["status"] == status]
    if not chosen:
        return []
    return [f"{heading}:", *(f"  {_ids(t)}: {t['reason']}" for t in chosen)]


def _ids(entry: dict[str, Any]) -> str:
    tenant = entry["tenant_id"] or "(no tenant id)"
    legacy = ", ".join(repr(i) for i in entry["legacy_ids"])
    return f"{tenant} (legacy {legacy})" if legacy else tenant


_MIGRATE_COUNTS = (
    ("tenants", "tenants"),
    ("migrated", "migrated"),
    ("already migrated", "already_migrated"),
    ("skipped", "skipped"),
    ("conflicts", "conflicts"),
    ("failed", "failed"),
    ("unmapped keys", "unmapped_keys"),
    ("not reached", "not_reached"),
)
_FINALIZE_COUNTS = (
    ("tenants", "tenants"),
    ("finalized", "finalized"),
    ("already finalized", "already_finalized"),
    ("left alone", "left_alone"),
    ("failed", "failed"),
    ("legacy rows nulled", "rows_nulled"),
    ("not reached", "not_reached"),
)


def _migrate_text(report: dict[str, Any]) -> str:
    lines = _summary(report, "Legacy migration", _MIGRATE_COUNTS, width=18)
    tenants = report["tenants"]
    lines += _listed(tenants, "Conflicts", "conflict") + _listed(tenants, "Failed", "failed")
    noted = [
        t
        for t in tenants
        if t["status"] == "skipped"
        and t["reason"] not in ("already migrated", "already finalized", "already in the broker")
    ]
    if noted:
        lines.append("Skipped:")
        lines += [f"  {_ids(t)}: {t['reason']}" for t in noted]
    unmapped = [t for t in tenants if t["unmapped_keys"]]
    if unmapped:
        lines.append("Metadata keys not migrated (still in the legacy metadata column):")
        for t in unmapped:
            keys = "; ".join(f"{u['key']} ({u['reason']})" for u in t["unmapped_keys"])
            lines.append(f"  {_ids(t)}: {keys}")
    if report["id_changes"]:
        lines.append("Legacy ids that became different tenant ids:")
        lines += [f"  {legacy!r} -> {new}" for legacy, new in report["id_changes"].items()]
    return "\n".join(lines)


def _finalize_text(report: dict[str, Any]) -> str:
    lines = _summary(report, "Legacy finalize", _FINALIZE_COUNTS, width=19)
    untouched = "(their legacy columns were not touched)"
    lines += _listed(report["tenants"], f"Left alone {untouched}", "left_alone")
    lines += _listed(report["tenants"], f"Failed {untouched}", "failed")
    return "\n".join(lines)
