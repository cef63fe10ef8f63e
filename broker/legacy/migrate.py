"""Move the legacy application's Twilio credentials and metadata into the broker.

Phase 2 of the seed's migration strategy, then phase 4 (`finalize`). For each
legacy tenant, in batches:

1. Its id becomes a broker tenant id (`normalise_tenant_id`). Legacy rows that
   land on the same tenant id are one tenant when they agree and a conflict
   when they do not; a conflict writes nothing.
2. Existing Twilio credentials are checked first, by fingerprint: the same ones
   mean nothing to store, different ones are a conflict and both sides stay
   untouched (nothing else is written for that tenant either).
3. The tenant, its settings row and its Transit key are ensured
   (`create_tenant`), and the metadata keys that map onto settings groups are
   applied once through `patch_settings`, the API's own validation. Keys that
   cannot be mapped are reported by name, never dropped silently and never
   echoed with their values.
4. The credentials are stored through `save_credentials`, the API's write
   protocol, with the live connection test skipped; that choice is recorded
   in the KV data, the metadata row, the audit trail and the progress row.
5. They are read back from Vault and compared by fingerprint.
6. Progress is committed per tenant in `legacy_migrations`, so a rerun skips
   what was verified and retries the rest. Nothing secret-derived is stored
   there; verification always goes back to Vault.

The run stops at the first sign that Vault or PostgreSQL is unavailable (the
remaining tenants would only fail the same way) and reports how many it did
not reach; rerunning resumes.

Every Vault call carries the audited headers of the migration's principal
(`user:legacy-migration`, the tenant, a per-run request id).
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core import context
from broker.core.db import unit_of_work
from broker.core.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PreconditionFailed,
    UpstreamUnavailable,
    ValidationFailed,
    error_location,
    unknown_field_message,
)
from broker.core.identifiers import TENANT_ID
from broker.core.logging import is_plain_name
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import PROVIDERS, Credentials, ProviderEndpoints
from broker.integrations.service import (
    Outbound,
    etag,
    read_credentials,
    reconcile_tenant,
    save_credentials,
)
from broker.legacy.source import LegacyKey, LegacyRow, LegacySource
from broker.models import IntegrationCredential, LegacyMigration, Tenant, TenantSettings, utcnow
from broker.settings.schemas import (
    READ_ONLY_GROUPS,
    SETTINGS_GROUPS,
    apply_merge_patch,
    default_group,
    group_field_names,
    group_model,
    validate_group,
)
from broker.settings.service import default_settings_row, patch_settings
from broker.tenants.schemas import RESERVED_IDS
from broker.tenants.service import create_tenant
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore

__all__ = [
    "FIELD_ALIASES",
    "GROUP_ALIASES",
    "MIGRATION_SUBJECT",
    "FinalizeOutcome",
    "FinalizeReport",
    "MigrationReport",
    "TenantOutcome",
    "UnmappedKey",
    "finalize_legacy",
    "map_metadata",
    "migrate_legacy",
    "normalise_tenant_id",
]

log = logging.getLogger(__name__)

PROVIDER = "twilio"
MIGRATION_SUBJECT = "legacy-migration"
OPERATOR_SCOPES = frozenset({"platform:admin", "tenant:admin"})
DEFAULT_WORKERS = 4
"""Tenants in flight at once: each waits mostly on Vault and PostgreSQL round trips."""


GROUP_ALIASES: dict[str, str] = {
    **{name: name for name in SETTINGS_GROUPS if name not in READ_ONLY_GROUPS},
    "notifications": "notification_settings",
    "features": "feature_flags",
    "compliance": "compliance_settings",
    "hours": "business_hours",
    "locale": "localization",
    "bot": "ai_bot",
}
"""Legacy metadata keys naming a whole settings group (or a dotted key's first part)."""

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "logo_url": ("branding", "logo_url"),
    "primary_color": ("branding", "primary_color"),
    "brand_color": ("branding", "primary_color"),
    "business_name": ("branding", "business_name"),
    "welcome_message": ("branding", "welcome_message"),
    "language": ("localization", "default_language"),
    "currency": ("localization", "currency"),
    "timezone": ("localization", "timezone"),
}
"""Flat legacy metadata keys that name one field of a settings group."""

OutcomeStatus = Literal["migrated", "skipped", "conflict", "failed"]


# -- reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnmappedKey:
    """A metadata key that was not migrated, and why. Never its value."""

    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"key": self.key, "reason": self.reason}


@dataclass
class TenantOutcome:
    """What happened (or, in a dry run, would happen) to one legacy tenant."""

    tenant_id: str | None
    legacy_ids: list[str]
    status: OutcomeStatus
    credential: str | None = None
    """stored | unchanged | absent | incomplete | invalid | conflict"""
    reason: str | None = None
    created: bool = False
    settings_groups: list[str] = field(default_factory=list)
    unmapped: list[UnmappedKey] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tenant_id": self.tenant_id,
            "legacy_ids": self.legacy_ids,
            "status": self.status,
            "credential": self.credential,
            "reason": self.reason,
            "created": self.created,
            "settings_groups": self.settings_groups,
            "unmapped_keys": [u.as_dict() for u in self.unmapped],
        }


class _HasStatus(Protocol):
    @property
    def status(self) -> str: ...


_O = TypeVar("_O", bound=_HasStatus)
_S = TypeVar("_S", bound=str)  # the status literals of _O


@dataclass
class _RunReport(Generic[_O, _S]):
    """What both kinds of run report: which run, over how many tenants, what each got."""

    run_id: str
    source: str
    dry_run: bool
    total: int = 0
    outcomes: list[_O] = field(default_factory=list)
    stopped: str | None = None
    """Why the run stopped early (Vault or PostgreSQL unavailable), if it did."""

    @property
    def remaining(self) -> int:
        """Tenants the run did not reach."""
        return max(self.total - len(self.outcomes), 0)

    def count(self, status: _S) -> int:
        """How many tenants ended with `status`."""
        return sum(1 for o in self.outcomes if o.status == status)


@dataclass
class MigrationReport(_RunReport[TenantOutcome, OutcomeStatus]):
    """The summary of one `broker migrate legacy` run."""

    @property
    def already_migrated(self) -> int:
        """Skipped tenants that an earlier run migrated (a rerun), apart from those lacking data."""
        return sum(1 for o in self.outcomes if o.status == "skipped" and o.reason in ALREADY_DONE)

    @property
    def unmapped_keys(self) -> int:
        """How many metadata keys were not migrated, over all tenants."""
        return sum(len(o.unmapped) for o in self.outcomes)

    @property
    def ok(self) -> bool:
        """True when nothing failed or conflicted and every tenant was reached."""
        return (
            self.stopped is None
            and self.remaining == 0
            and not self.count("failed")
            and not self.count("conflict")
        )

    def id_changes(self) -> dict[str, str]:
        """Legacy ids that became a different tenant id."""
        return {
            legacy: o.tenant_id
            for o in self.outcomes
            if o.tenant_id is not None
            for legacy in o.legacy_ids
            if legacy != o.tenant_id
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (no secret anywhere in it)."""
        return {
            "run_id": self.run_id,
            "source": self.source,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "summary": {
                "tenants": self.total,
                "migrated": self.count("migrated"),
                "already_migrated": self.already_migrated,
                "skipped": self.count("skipped") - self.already_migrated,
                "conflicts": self.count("conflict"),
                "failed": self.count("failed"),
                "unmapped_keys": self.unmapped_keys,
                "not_reached": self.remaining,
            },
            "stopped": self.stopped,
            "id_changes": self.id_changes(),
            "tenants": [o.as_dict() for o in self.outcomes],
        }


# Reasons of a "skipped" outcome that mean an earlier run did the work.
ALREADY_DONE = frozenset({"already migrated", "already finalized"})

FinalizeStatus = Literal["finalized", "already_finalized", "left_alone", "failed"]


@dataclass
class FinalizeOutcome:
    """What `--finalize` did (or would do) with one legacy tenant's secret columns."""

    tenant_id: str | None
    legacy_ids: list[str]
    status: FinalizeStatus
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tenant_id": self.tenant_id,
            "legacy_ids": self.legacy_ids,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass
class FinalizeReport(_RunReport[FinalizeOutcome, FinalizeStatus]):
    """The summary of one `broker migrate legacy --finalize` run."""

    rows_nulled: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing failed and every tenant was reached (left-alone ones are fine)."""
        return self.stopped is None and self.remaining == 0 and not self.count("failed")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run_id": self.run_id,
            "source": self.source,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "summary": {
                "tenants": self.total,
                "finalized": self.count("finalized"),
                "already_finalized": self.count("already_finalized"),
                "left_alone": self.count("left_alone"),
                "failed": self.count("failed"),
                "rows_nulled": self.rows_nulled,
                "not_reached": self.remaining,
            },
            "stopped": self.stopped,
            "tenants": [o.as_dict() for o in self.outcomes],
        }


# -- pure helpers -------------------------------------------------------------------------


def normalise_tenant_id(legacy_id: str) -> str | None:
    """The broker tenant id for a legacy id, deterministically; None when there is none.

    A legacy id that already is a valid tenant id (after trimming and
    lowercasing) is kept. Otherwise accents are folded, every run of other
    characters becomes one '-', and the result is trimmed to 63 characters.
    Reserved ids get a `-legacy` suffix.
    """
    text = legacy_id.strip().lower()
    if not TENANT_ID.fullmatch(text):
        folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
        text = re.sub(r"[^a-z0-9]+", "-", folded).strip("-")[:63].strip("-")
    if not text:
        return None
    if text in RESERVED_IDS:
        text = f"{text}-legacy"
    return text


def map_metadata(
    metadata: Any, current: Callable[[str], Mapping[str, Any]]
) -> tuple[dict[str, Any], list[UnmappedKey]]:
    """Split legacy metadata into settings merge patches (per group) and unmapped keys.

    Keys may name a group (`business_hours`, or an alias such as
    `notifications`), a field through a dotted path (`branding.logo_url`), or a
    known flat field (`logo_url`). Each key is validated, as the API would,
    against the group's current value (`current(group)`) merged with the keys
    accepted before it; a key that fails is reported and left out, so one bad
    key does not cost its neighbours.
    """
    if metadata is None:
        return {}, []
    if not isinstance(metadata, dict):
        return {}, [UnmappedKey("(metadata)", "the metadata is not a JSON object")]
    patches: dict[str, Any] = {}
    unmapped: list[UnmappedKey] = []
    for key in sorted(metadata, key=str):
        value = metadata[key]
        name = _safe_key(key)
        target = _target(key)
        if isinstance(target, str):
            unmapped.append(UnmappedKey(name, target))
            continue
        group, path = target
        if value is None:
            unmapped.append(UnmappedKey(name, "the value is null; nothing to migrate"))
            continue
        if not path and not isinstance(value, dict):
            unmapped.append(UnmappedKey(name, f"{group} must be an object"))
            continue
        key_patch: Any = value
        for segment in reversed(path):
            key_patch = {segment: key_patch}
        candidate = apply_merge_patch(patches.get(group, {}), key_patch)
        try:
            validate_group(group, apply_merge_patch(dict(current(group)), candidate))
        except ValidationError as exc:
            reason = _describe(group, candidate, exc)
            unmapped.append(UnmappedKey(name, f"not valid for {group}: {reason}"))
            continue
        patches[group] = candidate
    return patches, unmapped


def _target(key: object) -> tuple[str, tuple[str, ...]] | str:
    """(group, field path) for a metadata key, or the reason it maps to nothing."""
    if not isinstance(key, str) or not key.strip():
        return "empty key"
    parts = tuple(part.strip() for part in key.strip().split("."))
    head = parts[0]
    if head in READ_ONLY_GROUPS:
        return f"{head} is maintained by the broker and is not migrated"
    if len(parts) == 1:
        if head in GROUP_ALIASES:
            return GROUP_ALIASES[head], ()
        if head in FIELD_ALIASES:
            path = FIELD_ALIASES[head]
            return path[0], path[1:]
        return "no settings group for this key"
    if head not in GROUP_ALIASES:
        return "no settings group for this key"
    if not all(parts[1:]):
        return "malformed dotted key"
    return GROUP_ALIASES[head], parts[1:]


def _safe_key(key: object) -> str:
    # Key names are not values, but a pasted secret can end up as a key: only
    # echo names that read as plain names (short words, no credential or number).
    if isinstance(key, str) and is_plain_name(key):
        return key
    return "(a key that is not shown)"


def _describe(group: str, submitted: Any, exc: ValidationError) -> str:
    # The report, `legacy_migrations` and the trail keep this: a name the group does
    # not declare is given by its position, and the value is never repeated.
    first = exc.errors(include_input=False, include_url=False)[0]
    where = error_location(first["loc"], submitted, known=group_field_names(group))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = unknown_field_message(group_model(group), first["loc"][:-1])
    return f"{where}: {message}" if where else message


def _clean(value: Any) -> str | None:
    """A stripped secret value; blank counts as missing."""
    if value is None:
        return None
    text = str(value.get_secret_value()).strip()
    return text or None


def _same(a: Credentials, b: Credentials) -> bool:
    """Compare two sets of credentials by fingerprint, never by value."""
    return hmac.compare_digest(a.fingerprint(), b.fingerprint())


@dataclass(frozen=True)
class _Twilio:
    kind: Literal["absent", "incomplete", "invalid", "valid"]
    creds: Credentials | None = None
    reason: str | None = None


def _classify(row: LegacyRow) -> _Twilio:
    sid, token = _clean(row.twilio_sid), _clean(row.twilio_token)
    if sid is None and token is None:
        return _Twilio("absent")
    if sid is None or token is None:
        missing = "auth token" if token is None else "account SID"
        return _Twilio(
            "incomplete",
            reason=f"the legacy Twilio credentials have no {missing}; the credential was "
            "not migrated",
        )
    try:
        creds = PROVIDERS[PROVIDER].validate({"account_sid": sid, "auth_token": token})
    except ValidationFailed as exc:
        messages = [str(e.get("message")) for e in exc.extra.get("errors") or []]
        return _Twilio("invalid", reason="invalid Twilio credentials: " + "; ".join(messages))
    return _Twilio("valid", creds=creds)


def _row_identity(row: LegacyRow) -> tuple[Any, ...]:
    """What must agree for two legacy rows of one tenant to count as the same row."""
    metadata = json.dumps(row.metadata, sort_keys=True, default=str)
    name = (row.name or "").strip()
    return (name, _clean(row.twilio_sid), _clean(row.twilio_token), metadata)


@dataclass
class _Group:
    """The legacy ids that land on one tenant id (None: no usable tenant id)."""

    tenant_id: str | None
    keys: list[LegacyKey]

    @property
    def legacy_ids(self) -> list[str]:
        return [k.text for k in self.keys]


class _Stop(Exception):
    """Vault or PostgreSQL is unavailable: stop the run after recording this tenant."""

    def __init__(self, message: str, outcome: Any) -> None:
        super().__init__(message)
        self.message = message
        self.outcome = outcome


def _plan(source: LegacySource, tenants: Sequence[str] | None) -> tuple[list[_Group], list[str]]:
    """Group the legacy ids by tenant id; also the --tenant values that matched nothing."""
    by_tenant: dict[str, list[LegacyKey]] = {}
    unusable: list[_Group] = []
    for key in source.keys():
        tenant_id = normalise_tenant_id(key.text)
        if tenant_id is None:
            unusable.append(_Group(None, [key]))
        else:
            by_tenant.setdefault(tenant_id, []).append(key)
    groups = [_Group(t, keys) for t, keys in sorted(by_tenant.items())] + unusable
    if not tenants:
        return groups, []
    wanted = list(dict.fromkeys(tenants))

    def matches(group: _Group, value: str) -> bool:
        return value in group.legacy_ids or (
            group.tenant_id is not None and group.tenant_id in (value, normalise_tenant_id(value))
        )

    selected = [g for g in groups if any(matches(g, w) for w in wanted)]
    missing = [w for w in wanted if not any(matches(g, w) for g in selected)]
    return selected, missing


_R = TypeVar("_R")


def _fan_out(
    fn: Callable[[_Group], _R], groups: list[_Group], workers: int
) -> Iterator[tuple[_Group, _R | None, _Stop | None]]:
    """Run `fn` over `groups` on `workers` threads; yield (group, result, stop) in order.

    Once one tenant raises _Stop (Vault or PostgreSQL is gone), tenants not yet
    started are not started at all and come back with neither result nor stop.
    Each task runs in a copy of the caller's context, so the request context
    one tenant binds never leaks into another's.
    """
    halt = threading.Event()

    def task(group: _Group) -> _R | None:
        if halt.is_set():
            return None
        try:
            return fn(group)
        except _Stop:
            halt.set()
            raise

    if not groups:
        return
    if workers == 1:
        for group in groups:
            try:
                yield group, contextvars.copy_context().run(task, group), None
            except _Stop as stop:
                yield group, None, stop
        return
    with ThreadPoolExecutor(
        max_workers=min(workers, len(groups)), thread_name_prefix="legacy-migration"
    ) as pool:
        futures = [(g, pool.submit(contextvars.copy_context().run, task, g)) for g in groups]
        try:
            for group, future in futures:
                try:
                    yield group, future.result(), None
                except _Stop as stop:
                    yield group, None, stop
        finally:
            # On Ctrl-C (or any error) let the tenants in flight finish, start no more.
            halt.set()
            for _, future in futures:
                future.cancel()


def _batches(groups: list[_Group], size: int) -> Iterator[list[_Group]]:
    for start in range(0, len(groups), size):
        yield groups[start : start + size]


def _load_progress(
    engine: Engine, source: str, groups: Sequence[_Group]
) -> dict[str, LegacyMigration]:
    ids = [legacy for g in groups for legacy in g.legacy_ids]
    if not ids:
        return {}
    with unit_of_work(engine) as session:
        rows = session.exec(
            select(LegacyMigration)
            .where(LegacyMigration.source == source)
            .where(col(LegacyMigration.legacy_id).in_(ids))
        ).all()
    return {row.legacy_id: row for row in rows}


def _principal(subject: str, tenant_id: str | None) -> Principal:
    return Principal(subject=subject, kind="user", scopes=OPERATOR_SCOPES, tenant_id=tenant_id)


def _bind(run_id: str, principal: Principal, tenant_id: str | None, action: str) -> None:
    # The Vault gateway stamps these on every call as audited headers.
    context.bind(
        context.RequestContext(
            request_id=f"legacy-{run_id}-{tenant_id or 'none'}",
            actor=principal.actor,
            tenant_id=tenant_id,
            action=action,
        )
    )


# -- migrate ------------------------------------------------------------------------------


def migrate_legacy(
    engine: Engine,
    vault: VaultGateway,
    source: LegacySource,
    *,
    dry_run: bool = False,
    tenants: Sequence[str] | None = None,
    batch_size: int = 100,
    subject: str = MIGRATION_SUBJECT,
    workers: int = DEFAULT_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
    on_batch_done: Callable[[int, list[TenantOutcome]], None] | None = None,
) -> MigrationReport:
    """Migrate every legacy tenant (or those named in `tenants`) in batches; resumable.

    Within a batch, `workers` tenants are in flight at once (each tenant's
    steps stay in order); every tenant is committed on its own.
    `on_progress(advanced, total)` is called as tenants finish;
    `on_batch_done(batch_number, outcomes)` after each batch is committed.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    run = _Migration(engine, vault, source, dry_run=dry_run, subject=subject, workers=workers)
    # A copied context: the per-tenant request contexts bound below must not
    # outlive the run in the caller's thread.
    return contextvars.copy_context().run(run.run, tenants, batch_size, on_progress, on_batch_done)


class _Migration:
    def __init__(
        self,
        engine: Engine,
        vault: VaultGateway,
        source: LegacySource,
        *,
        dry_run: bool,
        subject: str,
        workers: int,
    ) -> None:
        self.engine = engine
        self.vault = vault
        self.store = SealedStore(vault)
        self.source = source
        self.dry_run = dry_run
        self.subject = subject
        self.run_id = uuid.uuid4().hex[:12]
        self.workers = workers
        # save_credentials wants one even though the connection test is skipped.
        self.outbound = Outbound(EgressClient(EgressPolicy()), ProviderEndpoints())

    def run(
        self,
        tenants: Sequence[str] | None,
        batch_size: int,
        on_progress: Callable[[int, int], None] | None,
        on_batch_done: Callable[[int, list[TenantOutcome]], None] | None,
    ) -> MigrationReport:
        self.source.check()
        report = MigrationReport(run_id=self.run_id, source=self.source.label, dry_run=self.dry_run)
        groups, missing = _plan(self.source, tenants)
        preamble = [
            TenantOutcome(None, [value], "failed", reason="no legacy tenant has this id")
            for value in missing
        ]
        if not tenants:
            without_id = self.source.count_without_id()
            if without_id:
                preamble.append(
                    TenantOutcome(
                        None,
                        [],
                        "failed",
                        reason=f"{without_id} legacy row(s) have no id and cannot be migrated",
                    )
                )
        report.total = len(groups) + len(preamble)
        report.outcomes.extend(preamble)
        log.info(
            "legacy migration started",
            extra={"fields": {"run_id": self.run_id, "tenants": len(groups), "dry": self.dry_run}},
        )
        if on_progress is not None:
            on_progress(0, report.total)  # the bar shows from the start, not after a tenant
        for number, batch in enumerate(_batches(groups, batch_size), start=1):
            try:
                outcomes = self._batch(batch, report, on_progress)
            except UpstreamUnavailable as exc:  # between tenants: nothing half-done
                report.stopped = f"{exc.message}; rerun to resume"
            if report.stopped is not None:
                log.warning(
                    "legacy migration stopped",
                    extra={"fields": {"run_id": self.run_id, "reason": report.stopped}},
                )
                break
            if on_batch_done is not None:
                on_batch_done(number, outcomes)
        return report

    def _batch(
        self,
        batch: list[_Group],
        report: MigrationReport,
        on_progress: Callable[[int, int], None] | None,
    ) -> list[TenantOutcome]:
        progress = _load_progress(self.engine, self.source.label, batch)
        tenant_ids = [g.tenant_id for g in batch if g.tenant_id is not None]
        with unit_of_work(self.engine) as session:
            existing = {
                t.id: t for t in session.exec(select(Tenant).where(col(Tenant.id).in_(tenant_ids)))
            }
        outcomes: list[TenantOutcome] = []
        todo: list[_Group] = []
        for group in batch:
            done = self._already_done(group, progress)
            if done is not None:
                outcomes.append(done)
            elif group.tenant_id is None:
                outcomes.append(self._unusable(group))
            else:
                todo.append(group)
        report.outcomes.extend(outcomes)
        if on_progress is not None and outcomes:
            on_progress(len(outcomes), report.total)
        rows: dict[str, list[LegacyRow]] = {}
        for row in self.source.rows([k for g in todo for k in g.keys], secrets=True):
            rows.setdefault(row.key.text, []).append(row)

        def one(group: _Group) -> TenantOutcome:
            return self._one(
                group,
                [r for legacy in group.legacy_ids for r in rows.get(legacy, [])],
                [progress[legacy] for legacy in group.legacy_ids if legacy in progress],
                existing.get(group.tenant_id or ""),
            )

        for _, outcome, stop in _fan_out(one, todo, self.workers):
            if stop is not None:
                report.outcomes.append(stop.outcome)
                report.stopped = report.stopped or f"{stop.message}; rerun to resume"
            elif outcome is not None:
                report.outcomes.append(outcome)
                outcomes.append(outcome)
            else:
                continue  # not started: the run stopped first
            if on_progress is not None:
                on_progress(1, report.total)
        return outcomes

    def _already_done(
        self, group: _Group, progress: Mapping[str, LegacyMigration]
    ) -> TenantOutcome | None:
        records = [progress.get(legacy) for legacy in group.legacy_ids]
        present = [r for r in records if r is not None]
        statuses = {r.status for r in present}
        if "finalized" in statuses and (len(present) < len(records) or statuses != {"finalized"}):
            return TenantOutcome(
                group.tenant_id,
                group.legacy_ids,
                "conflict",
                reason="some legacy rows of this tenant were already finalized and these were "
                "not; resolve the new legacy rows by hand",
            )
        if len(present) < len(records) or not statuses <= {"verified", "finalized"}:
            return None
        if any(r.tenant_id != group.tenant_id for r in present):
            return None
        first = present[0]
        return TenantOutcome(
            group.tenant_id,
            group.legacy_ids,
            "skipped",
            credential=first.credential,
            reason="already finalized" if statuses == {"finalized"} else "already migrated",
            settings_groups=list(first.settings_groups),
            unmapped=[UnmappedKey(**u) for u in first.unmapped_keys],
        )

    def _unusable(self, group: _Group) -> TenantOutcome:
        outcome = TenantOutcome(
            None,
            group.legacy_ids,
            "failed",
            reason="the legacy id has no letters or digits to make a tenant id from",
        )
        principal = _principal(self.subject, None)
        _bind(self.run_id, principal, None, "legacy.migrate")
        return self._finish(group, principal, outcome)

    def _one(
        self,
        group: _Group,
        rows: list[LegacyRow],
        records: list[LegacyMigration],
        tenant: Tenant | None,
    ) -> TenantOutcome:
        principal = _principal(self.subject, group.tenant_id)
        _bind(self.run_id, principal, group.tenant_id, "legacy.migrate")
        try:
            return self._migrate(group, rows, records, tenant, principal)
        except (UpstreamUnavailable, VaultMisconfigured) as exc:
            # Systemic: every remaining tenant would fail the same way.
            outcome = TenantOutcome(group.tenant_id, group.legacy_ids, "failed", reason=exc.message)
            try:
                self._finish(group, principal, outcome)
            except BrokerError:
                pass  # PostgreSQL is the one down: the tenant stays as the last run left it
            raise _Stop(exc.message, outcome) from None
        except BrokerError as exc:
            outcome = TenantOutcome(group.tenant_id, group.legacy_ids, "failed", reason=exc.message)
            return self._finish(group, principal, outcome)

    def _migrate(
        self,
        group: _Group,
        rows: list[LegacyRow],
        records: list[LegacyMigration],
        tenant: Tenant | None,
        principal: Principal,
    ) -> TenantOutcome:
        tenant_id = group.tenant_id
        assert tenant_id is not None

        def outcome(status: OutcomeStatus, **kwargs: Any) -> TenantOutcome:
            return TenantOutcome(tenant_id, group.legacy_ids, status, **kwargs)

        if not rows:
            return self._finish(
                group, principal, outcome("failed", reason="the legacy row disappeared")
            )
        if len({_row_identity(r) for r in rows}) > 1:
            ids = ", ".join(repr(i) for i in group.legacy_ids)
            disagree = (
                f"{len(rows)} legacy rows ({ids}) map to this tenant and disagree; "
                "nothing was migrated"
            )
            return self._finish(group, principal, outcome("conflict", reason=disagree))
        row = rows[0]
        twilio = _classify(row)
        if twilio.kind == "invalid":
            return self._finish(
                group, principal, outcome("failed", credential="invalid", reason=twilio.reason)
            )
        if tenant is not None and tenant.deleting_at is not None:
            return self._finish(
                group, principal, outcome("failed", reason="the tenant is being deleted")
            )

        # Existing credentials first: a conflict must leave the tenant untouched.
        stored_version: int | None = None
        if_match = etag(None)
        if twilio.creds is not None and tenant is not None:
            found = self._stored(tenant_id)
            if found is not None:
                stored, stored_version = found
                if not _same(stored, twilio.creds):
                    return self._finish(
                        group,
                        principal,
                        outcome(
                            "conflict",
                            credential="conflict",
                            reason="different Twilio credentials are already stored for this "
                            "tenant; both were left untouched",
                        ),
                    )
            else:
                if_match = self._etag(tenant_id)

        applied = next((r for r in records if r.settings_applied), None)
        if self.dry_run:
            created = tenant is None
            if applied is not None:
                groups, unmapped = list(applied.settings_groups), _unmapped(applied)
            else:
                current = _current_settings(self.engine, tenant_id if tenant else None)
                patch, unmapped = map_metadata(row.metadata, current)
                groups = _changed_groups(patch, current)
        else:
            created, groups, unmapped = self._ensure_tenant(group, row, principal, tenant, applied)

        credential: str = twilio.kind
        if twilio.creds is not None:
            if stored_version is not None:
                credential = "unchanged"
            elif self.dry_run:
                credential = "stored"
            else:
                credential, stored_version = self._store(
                    tenant_id, twilio.creds, principal, if_match
                )
                if credential == "conflict":
                    return self._finish(
                        group,
                        principal,
                        outcome(
                            "conflict",
                            credential="conflict",
                            created=created,
                            settings_groups=groups,
                            unmapped=unmapped,
                            reason="different Twilio credentials were stored for this tenant "
                            "while the migration ran; both were left untouched",
                        ),
                    )
                if not self._verified(tenant_id, twilio.creds):
                    return self._finish(
                        group,
                        principal,
                        outcome(
                            "failed",
                            credential=credential,
                            created=created,
                            settings_groups=groups,
                            unmapped=unmapped,
                            reason="verification failed: the credentials read back from Vault "
                            "do not match the legacy ones",
                        ),
                    )
        status: OutcomeStatus
        reason: str | None
        if twilio.kind == "incomplete":
            status, reason = "skipped", twilio.reason
        elif created or groups or credential == "stored":
            status, reason = "migrated", None
        else:
            status, reason = "skipped", "already in the broker"
        result = outcome(
            status,
            credential=credential,
            reason=reason,
            created=created,
            settings_groups=groups,
            unmapped=unmapped,
        )
        return self._finish(group, principal, result, kv_version=stored_version)

    # -- steps --------------------------------------------------------------------------

    def _stored(self, tenant_id: str) -> tuple[Credentials, int] | None:
        """The Twilio credentials Vault holds for the tenant now, if any."""
        if not self.dry_run:
            with unit_of_work(self.engine) as session:
                row = session.get(IntegrationCredential, (tenant_id, PROVIDER))
                pending = row is not None and row.vault_sync_pending
            if pending:
                # An earlier run (or API call) was cut off mid-write: settle it first.
                reconcile_tenant(self.engine, self.store, tenant_id)
        try:
            return read_credentials(self.vault, tenant_id=tenant_id, provider=PROVIDER)
        except NotFound:
            return None

    def _etag(self, tenant_id: str) -> str:
        """The ETag the metadata row has now; the save fails if anyone moves it meanwhile."""
        with unit_of_work(self.engine) as session:
            return etag(session.get(IntegrationCredential, (tenant_id, PROVIDER)))

    def _ensure_tenant(
        self,
        group: _Group,
        row: LegacyRow,
        principal: Principal,
        tenant: Tenant | None,
        applied: LegacyMigration | None,
    ) -> tuple[bool, list[str], list[UnmappedKey]]:
        """Tenant, settings row and Transit key; metadata applied once. One transaction."""
        tenant_id = group.tenant_id
        assert tenant_id is not None
        with unit_of_work(self.engine) as session:
            created = False
            if session.get(Tenant, tenant_id) is None:
                name = (row.name or "").strip()[:200] or tenant_id
                create_tenant(
                    session, self.vault, principal=principal, tenant_id=tenant_id, name=name
                )
                session.flush()
                created = True
            settings = session.get(TenantSettings, tenant_id)
            if settings is None:  # a tenant from before settings rows existed
                settings = default_settings_row(tenant_id, updated_by=principal.actor)
                session.add(settings)
                session.flush()
            if not created:
                self.store.ensure_tenant_key(tenant_id)
            if applied is not None:
                groups, unmapped = list(applied.settings_groups), _unmapped(applied)
            else:

                def current(name: str) -> Mapping[str, Any]:
                    return getattr(settings, name) or default_group(name)

                patch, unmapped = map_metadata(row.metadata, current)
                groups = _changed_groups(patch, current)
                if groups:
                    patch_settings(
                        session,
                        principal=principal,
                        tenant_id=tenant_id,
                        patch={name: patch[name] for name in groups},
                        if_match=None,
                    )
            for record in self._records(session, group):
                record.tenant_id = tenant_id
                record.status = "pending"
                record.settings_applied = True
                record.settings_groups = groups
                record.unmapped_keys = [u.as_dict() for u in unmapped]
                record.run_id = self.run_id
                record.updated_at = utcnow()
                session.add(record)
        return created, groups, unmapped

    def _store(
        self, tenant_id: str, creds: Credentials, principal: Principal, if_match: str
    ) -> tuple[str, int | None]:
        """Save through the API's service; ("stored" | "unchanged" | "conflict", version)."""
        fields = {name: creds.reveal(name) for name in creds.names()}
        try:
            row = save_credentials(
                self.engine,
                self.vault,
                self.outbound,
                principal=principal,
                tenant_id=tenant_id,
                provider=PROVIDER,
                fields=fields,
                if_match=if_match,
                skip_connection_test=True,
            )
        except (Conflict, PreconditionFailed):
            # Someone wrote between our check and our write: look again.
            found = self._stored(tenant_id)
            if found is not None and _same(found[0], creds):
                return "unchanged", found[1]
            return "conflict", None
        return "stored", row.kv_version

    def _verified(self, tenant_id: str, creds: Credentials) -> bool:
        """Read back from Vault and compare fingerprints."""
        try:
            stored, _ = read_credentials(self.vault, tenant_id=tenant_id, provider=PROVIDER)
        except NotFound:
            return False
        return _same(stored, creds)

    def _records(self, session: Session, group: _Group) -> list[LegacyMigration]:
        records = []
        for legacy in group.legacy_ids:
            record = session.get(LegacyMigration, (self.source.label, legacy), with_for_update=True)
            if record is None:
                record = LegacyMigration(
                    source=self.source.label, legacy_id=legacy, status="pending"
                )
            records.append(record)
        return records

    def _finish(
        self,
        group: _Group,
        principal: Principal,
        outcome: TenantOutcome,
        *,
        kv_version: int | None = None,
    ) -> TenantOutcome:
        """Record the tenant's outcome in the progress table and the audit trail."""
        if self.dry_run:
            return outcome
        status: str
        if outcome.status in ("conflict", "failed"):
            status = outcome.status
        elif outcome.credential == "incomplete":
            status = "skipped"
        else:
            status = "verified"
        now = utcnow()
        with unit_of_work(self.engine) as session:
            for record in self._records(session, group):
                record.tenant_id = group.tenant_id
                record.status = status
                record.credential = outcome.credential
                record.attempts += 1
                record.run_id = self.run_id
                # "already in the broker" is a note, not an error.
                note = outcome.reason if status != "verified" else None
                record.last_error = (note or "")[:500] or None
                record.updated_at = now
                if outcome.credential == "stored":
                    record.connection_test = "skipped"
                if status == "verified":
                    record.kv_version = kv_version
                    record.verified_at = now
                session.add(record)
            trail.record(
                session,
                action="legacy.migrate",
                resource=f"tenants/{group.tenant_id}" if group.tenant_id else "legacy",
                outcome="success" if status in ("verified", "skipped") else "failed",
                principal=principal,
                tenant_id=group.tenant_id,
                detail={
                    "source": self.source.label,
                    "legacy_ids": group.legacy_ids[:20],
                    "status": status,
                    "credential": outcome.credential,
                    "connection_test": "skipped" if outcome.credential == "stored" else None,
                    "settings_groups": outcome.settings_groups,
                    "unmapped_keys": [u.key for u in outcome.unmapped],
                    "reason": outcome.reason,
                },
            )
        return outcome


def _unmapped(record: LegacyMigration) -> list[UnmappedKey]:
    return [UnmappedKey(**u) for u in record.unmapped_keys]


def _current_settings(engine: Engine, tenant_id: str | None) -> Callable[[str], Mapping[str, Any]]:
    """The tenant's settings groups as they are now (defaults for a tenant to be created)."""
    row: TenantSettings | None = None
    if tenant_id is not None:
        with unit_of_work(engine) as session:
            row = session.get(TenantSettings, tenant_id)

    def current(name: str) -> Mapping[str, Any]:
        value = getattr(row, name) if row is not None else None
        return value or default_group(name)

    return current


def _changed_groups(
    patch: Mapping[str, Any], current: Callable[[str], Mapping[str, Any]]
) -> list[str]:
    """The groups whose validated value the patch would change."""
    changed = []
    for name, group_patch in patch.items():
        before = validate_group(name, dict(current(name)))
        if validate_group(name, apply_merge_patch(dict(current(name)), group_patch)) != before:
            changed.append(name)
    return sorted(changed)


# -- finalize -----------------------------------------------------------------------------


def finalize_legacy(
    engine: Engine,
    vault: VaultGateway,
    source: LegacySource,
    *,
    dry_run: bool = False,
    tenants: Sequence[str] | None = None,
    batch_size: int = 100,
    subject: str = MIGRATION_SUBJECT,
    workers: int = DEFAULT_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> FinalizeReport:
    """Null the legacy Twilio columns of verified tenants (phase 4); report the rest.

    Each tenant is re-verified against Vault first (fingerprints). The progress
    row is marked finalized before the legacy columns are nulled, so a crash in
    between leaves the columns unreadable through the broker, and the next
    finalize nulls them.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    run = _Finalize(engine, vault, source, dry_run=dry_run, subject=subject, workers=workers)
    return contextvars.copy_context().run(run.run, tenants, batch_size, on_progress)


class _Finalize:
    def __init__(
        self,
        engine: Engine,
        vault: VaultGateway,
        source: LegacySource,
        *,
        dry_run: bool,
        subject: str,
        workers: int,
    ) -> None:
        self.engine = engine
        self.vault = vault
        self.source = source
        self.dry_run = dry_run
        self.subject = subject
        self.workers = workers
        self.run_id = uuid.uuid4().hex[:12]

    def run(
        self,
        tenants: Sequence[str] | None,
        batch_size: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> FinalizeReport:
        self.source.check()
        report = FinalizeReport(run_id=self.run_id, source=self.source.label, dry_run=self.dry_run)
        groups, missing = _plan(self.source, tenants)
        report.total = len(groups) + len(missing)
        report.outcomes.extend(
            FinalizeOutcome(None, [value], "failed", "no legacy tenant has this id")
            for value in missing
        )
        for batch in _batches(groups, batch_size):
            before = len(report.outcomes)
            try:
                self._batch(batch, report)
            except UpstreamUnavailable as exc:
                report.stopped = f"{exc.message}; rerun to resume"
            if on_progress is not None and len(report.outcomes) > before:
                on_progress(len(report.outcomes) - before, report.total)
            if report.stopped is not None:
                break
        return report

    def _batch(self, batch: list[_Group], report: FinalizeReport) -> None:
        progress = _load_progress(self.engine, self.source.label, batch)
        retire: list[_Group] = []
        candidates: list[_Group] = []
        for group in batch:
            records = [progress.get(legacy) for legacy in group.legacy_ids]
            statuses = {r.status if r is not None else None for r in records}
            if group.tenant_id is None:
                reason: str | None = "the legacy id cannot be mapped to a tenant id"
            elif None in statuses:
                reason = "not migrated yet"
            elif statuses == {"finalized"}:
                report.outcomes.append(
                    FinalizeOutcome(group.tenant_id, group.legacy_ids, "already_finalized")
                )
                retire.append(group)  # idempotent: re-nulls columns a crash left behind
                continue
            elif statuses == {"verified"}:
                candidates.append(group)
                continue
            else:
                reason = _why_not_verified(records)
            report.outcomes.append(
                FinalizeOutcome(group.tenant_id, group.legacy_ids, "left_alone", reason)
            )
        rows: dict[str, list[LegacyRow]] = {}
        for row in self.source.rows([k for g in candidates for k in g.keys], secrets=True):
            rows.setdefault(row.key.text, []).append(row)
        verified: list[_Group] = []

        def check(group: _Group) -> str:
            group_rows = [r for legacy in group.legacy_ids for r in rows.get(legacy, [])]
            return self._mismatch(group, group_rows) or ""

        for group, mismatch, stop in _fan_out(check, candidates, self.workers):
            if stop is not None:
                # Still finalize the ones verified before Vault went away.
                report.outcomes.append(stop.outcome)
                report.stopped = report.stopped or f"{stop.message}; rerun to resume"
                continue
            if mismatch is None:
                continue  # not started: the run stopped first
            if not mismatch:
                verified.append(group)
                report.outcomes.append(
                    FinalizeOutcome(group.tenant_id, group.legacy_ids, "finalized")
                )
                continue
            report.outcomes.append(
                FinalizeOutcome(group.tenant_id, group.legacy_ids, "failed", mismatch)
            )
            if not self.dry_run:
                self._mark_failed(group, mismatch)
        if not self.dry_run:
            if verified:
                self._mark_finalized(verified)
            keys = [k for g in [*retire, *verified] for k in g.keys]
            report.rows_nulled += self.source.retire(keys)

    def _mismatch(self, group: _Group, rows: list[LegacyRow]) -> str | None:
        """Why this verified tenant may not be finalized now, or None when it may."""
        tenant_id = group.tenant_id
        assert tenant_id is not None
        principal = _principal(self.subject, tenant_id)
        _bind(self.run_id, principal, tenant_id, "legacy.finalize")
        changed = "the legacy columns changed after the migration; rerun the migration"
        if not rows:
            return None  # the rows are gone: nothing left to retire
        if len({_row_identity(r) for r in rows}) > 1:
            return changed
        twilio = _classify(rows[0])
        if twilio.kind == "absent":
            return None
        if twilio.creds is None:
            return changed
        try:
            stored, _ = read_credentials(self.vault, tenant_id=tenant_id, provider=PROVIDER)
        except NotFound:
            return "Vault no longer holds the migrated credentials; rerun the migration"
        except (UpstreamUnavailable, VaultMisconfigured) as exc:
            raise _Stop(
                exc.message, FinalizeOutcome(tenant_id, group.legacy_ids, "failed", exc.message)
            ) from None
        except BrokerError as exc:
            return exc.message
        if not _same(stored, twilio.creds):
            return (
                "the legacy columns or Vault changed after the migration (their fingerprints "
                "no longer match); rerun the migration to see the conflict"
            )
        return None

    def _mark_failed(self, group: _Group, reason: str) -> None:
        with unit_of_work(self.engine) as session:
            for legacy in group.legacy_ids:
                record = session.get(LegacyMigration, (self.source.label, legacy))
                if record is not None:
                    record.status = "failed"
                    record.last_error = reason[:500]
                    record.updated_at = utcnow()
                    session.add(record)

    def _mark_finalized(self, groups: list[_Group]) -> None:
        now = utcnow()
        with unit_of_work(self.engine) as session:
            for group in groups:
                principal = _principal(self.subject, group.tenant_id)
                _bind(self.run_id, principal, group.tenant_id, "legacy.finalize")
                for legacy in group.legacy_ids:
                    record = session.get(
                        LegacyMigration, (self.source.label, legacy), with_for_update=True
                    )
                    if record is not None:
                        record.status = "finalized"
                        record.finalized_at = now
                        record.updated_at = now
                        record.run_id = self.run_id
                        session.add(record)
                trail.record(
                    session,
                    action="legacy.finalize",
                    resource=f"tenants/{group.tenant_id}",
                    outcome="success",
                    principal=principal,
                    tenant_id=group.tenant_id,
                    detail={"source": self.source.label, "legacy_ids": group.legacy_ids[:20]},
                )


def _why_not_verified(records: Sequence[LegacyMigration | None]) -> str:
    for record in records:
        if record is None or record.status in ("verified", "finalized"):
            continue
        if record.status == "pending":
            return "the migration of this tenant did not finish; rerun the migration"
        detail = f": {record.last_error}" if record.last_error else ""
        return f"migration status is {record.status}{detail}"
    return "some legacy rows of this tenant were finalized and others not"
