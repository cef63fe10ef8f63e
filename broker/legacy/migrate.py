"""Move the legacy application's Twilio credentials and metadata into the broker.

Phase 2 of the seed's migration strategy (phase 4 is `broker.legacy.finalize`).
Batch by batch, the migration first plans (`broker.legacy.plan`, reads only),
then applies the plan; a dry run reports the plan and stops there. For each
legacy tenant:

1. Its id becomes a broker tenant id (`normalise_tenant_id`). Legacy rows that
   land on the same tenant id are one tenant when they agree and a conflict
   when they do not; a conflict writes nothing.
2. Existing Twilio credentials are checked first, by fingerprint: the same ones
   mean nothing to store, different ones are a conflict and both sides stay
   untouched (nothing else is written for that tenant either).
3. Applying, in one transaction per chunk of the batch (a savepoint per tenant
   should one of them fail): the tenant's Transit key first (made, or a
   stopped run's reused), then its row and settings row (`add_tenants`), and
   the metadata keys that map onto settings groups are applied once through
   `patch_locked` (`patch_settings`' validation and audit event; the chunk's
   rows locked by one read and written together at the commit). Keys that
   cannot be mapped are reported by name, never dropped silently and never
   echoed with their values. The progress row notes that the metadata was
   applied.
4. The credentials are stored through `save_credentials`, the API's write
   protocol, with the live connection test skipped (recorded in the KV data,
   the metadata row, the audit trail and the progress row); up to `workers`
   tenants at once.
5. They are read back from Vault and compared by fingerprint; only then does
   the tenant count as migrated.

The keys and the read-back are made on an event loop (`call_on_loop`, which
costs the process far less per request than a worker thread; anything it
cannot settle in one attempt goes through the threaded gateway, which retries).
6. The batch's outcomes are committed in `legacy_migrations` and the trail in
   one transaction, so a rerun skips what was verified and retries the rest
   (without writing twice: the plan finds what Vault already holds). Nothing
   secret-derived is stored there; verification always goes back to Vault.

The run stops at the first sign that Vault or PostgreSQL is unavailable (the
remaining tenants would only fail the same way) and reports how many it did
not reach; rerunning resumes.

Every Vault call carries the audited headers of the migration's principal
(`user:legacy-migration`, the tenant, a per-run request id).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import anyio
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.context import RequestContext
from broker.core.db import unit_of_work
from broker.core.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PreconditionFailed,
    UpstreamUnavailable,
)
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import Credentials, ProviderEndpoints
from broker.integrations.service import (
    BatchSave,
    Outbound,
    SaveBatch,
    etag,
    read_credentials,
    read_credentials_on_loop,
    reconcile_tenant,
)
from broker.legacy import DEFAULT_BATCH, DEFAULT_WORKERS
from broker.legacy.finalize import finalize_legacy
from broker.legacy.mapping import (
    FIELD_ALIASES,
    GROUP_ALIASES,
    PROVIDER,
    map_metadata,
    normalise_tenant_id,
    same_credentials,
)
from broker.legacy.plan import TenantPlan, plan_batch
from broker.legacy.reports import (
    FinalizeOutcome,
    FinalizeReport,
    MigrationReport,
    TenantOutcome,
    UnmappedKey,
)
from broker.legacy.runner import (
    MIGRATION_SUBJECT,
    Group,
    Run,
    Stop,
    bind,
    fan_out,
    operator,
    request_context,
    run_batches,
    select_groups,
)
from broker.legacy.source import LegacySource
from broker.models import IntegrationCredential, LegacyMigration, TenantSettings, utcnow
from broker.settings.service import default_settings_row, lock_settings, patch_locked
from broker.tenants.service import add_tenants
from broker.vault.errors import VaultMisconfigured
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore, key_name

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

_SYSTEMIC = (UpstreamUnavailable, VaultMisconfigured)
"""Errors every remaining tenant would meet too: the run stops."""


class _OneFailed(Exception):
    """One tenant of a chunk failed: prepare the chunk again, tenant by tenant."""


def migrate_legacy(
    engine: Engine,
    vault: VaultGateway,
    source: LegacySource,
    *,
    dry_run: bool = False,
    tenants: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    subject: str = MIGRATION_SUBJECT,
    workers: int = DEFAULT_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
    on_batch_done: Callable[[int, list[TenantOutcome]], None] | None = None,
) -> MigrationReport:
    """Migrate every legacy tenant (or those named in `tenants`) in batches; resumable.

    Within a batch, `workers` tenants' credentials are in flight at once.
    `on_progress(advanced, total)` is called at the start and as batches finish;
    `on_batch_done(batch_number, outcomes)` after each batch is committed.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    run = _Migration(engine, vault, source, dry_run=dry_run, subject=subject, workers=workers)
    source.check()
    groups, missing = select_groups(source, tenants)
    report = run.report
    report.outcomes.extend(
        TenantOutcome(None, [value], "failed", reason="no legacy tenant has this id")
        for value in missing
    )
    without_id = 0 if tenants else source.count_without_id()
    if without_id:
        reason = f"{without_id} legacy row(s) have no id and cannot be migrated"
        report.outcomes.append(TenantOutcome(None, [], "failed", reason=reason))
    report.total = len(groups) + len(report.outcomes)
    log.info(
        "legacy migration started",
        extra={"fields": {"run_id": run.run_id, "tenants": len(groups), "dry": dry_run}},
    )
    run_batches(
        groups,
        report,
        run.batch,
        batch_size=batch_size,
        on_progress=on_progress,
        on_batch_done=on_batch_done,
    )
    return report


@dataclass
class _Migration(Run):
    report: MigrationReport = field(init=False)
    store: SealedStore = field(init=False)
    outbound: Outbound = field(init=False)

    def __post_init__(self) -> None:
        self.report = MigrationReport(self.run_id, self.source.label, self.dry_run)
        self.store = SealedStore(self.vault)
        # save_credentials wants one even though the connection test is skipped.
        self.outbound = Outbound(EgressClient(EgressPolicy()), ProviderEndpoints())

    def batch(self, batch: list[Group]) -> None:
        """Plan one batch; unless this is a dry run, apply the plan; report the outcomes."""
        planned = plan_batch(self.engine, self.vault, self.source, batch, workers=self.workers)
        plans, stopped = planned.plans, planned.stopped
        if not self.dry_run:
            plans, stopped = self._apply(plans, stopped)
        self.report.outcomes.extend(p.outcome for p in plans)
        if stopped is not None:
            self.report.stopped = f"{stopped}; rerun to resume"

    # -- apply --------------------------------------------------------------------------

    def _apply(
        self, plans: list[TenantPlan], stopped: str | None
    ) -> tuple[list[TenantPlan], str | None]:
        """Apply the plans; returns those reached, and why the run stopped, if it did."""
        to_apply = [p for p in plans if p.action == "apply"]
        stop = self._prepare(to_apply)
        if stop is None:
            stop = self._store_all([p for p in to_apply if p.action == "apply"])
        reached = [p for p in plans if p.reached]
        self._record([p for p in reached if p.action != "report"])
        return reached, stopped or (stop.message if stop is not None else None)

    def _prepare(self, plans: list[TenantPlan]) -> Stop | None:
        """Transit keys, then tenants, settings rows and metadata in `workers` concurrent chunks.

        The keys come first (`workers` at once), as `create_tenant` makes them:
        before the rows are committed; a key left by a run that stopped is simply
        reused. When Vault or PostgreSQL goes away, the chunk that met it is rolled
        back; chunks done before stay (their progress rows say pending, metadata
        applied), but nothing more is stored: those tenants are not reached.
        """
        if not plans:
            return None
        stopped = self._each_on_loop(self._ensure_key, plans)
        if stopped is None:
            size = -(-len(plans) // self.workers)
            chunks = [plans[start : start + size] for start in range(0, len(plans), size)]
            for _, _, stop in fan_out(self._prepare_chunk, chunks, self.workers):
                stopped = stopped or stop
        if stopped is not None:
            for plan in plans:
                plan.reached = plan.action != "apply"
        return stopped

    async def _ensure_key(self, plan: TenantPlan, threads: anyio.CapacityLimiter) -> None:
        """The tenant's Transit key: made unless it exists (a rerun's is left as it is)."""
        self._bind(plan.group)
        try:
            await self.vault.transit.create_key_on_loop(key_name(plan.tenant_id), threads=threads)
        except _SYSTEMIC as exc:
            plan.action = "record"
            raise Stop(exc.message, plan.fail(exc.message)) from None

    def _prepare_chunk(self, plans: list[TenantPlan]) -> bool:
        """Prepare these tenants in one transaction.

        Should one of them fail (a tenant created or deleted meanwhile), the chunk
        is rolled back and prepared again with a savepoint per tenant, so only
        that tenant fails. Raises Stop when PostgreSQL is unavailable.
        """
        try:
            self._prepare_together(plans, isolated=False)
        except _OneFailed:
            self._prepare_together(plans, isolated=True)
        return True

    def _prepare_together(self, plans: list[TenantPlan], *, isolated: bool) -> None:
        with unit_of_work(self.engine) as session:
            records = _lock_records(session, self.source.label, [p.group for p in plans])
            settings: dict[str, TenantSettings] = {}
            if not isolated:
                self._add_tenants(session, [p for p in plans if not p.tenant_existed])
                settings = lock_settings(session, [p.tenant_id for p in plans if p.patch])
            for plan in plans:
                principal = self._bind(plan.group)
                try:
                    # The patches and their audit events are all written at the commit.
                    with (
                        session.no_autoflush,
                        session.begin_nested() if isolated else nullcontext(),
                    ):
                        if isolated and not plan.tenant_existed:
                            self._add_tenants(session, [plan])
                        self._ensure_tenant(session, plan, principal, settings)
                except _SYSTEMIC as exc:
                    plan.action = "record"
                    raise Stop(exc.message, plan.fail(exc.message)) from None
                except BrokerError as exc:
                    if not isolated:
                        raise _OneFailed() from None
                    plan.action = "record"
                    plan.fail(exc.message)
            # Last, so the progress rows are written together at the commit.
            for plan in plans:
                if plan.action == "apply":
                    _note_prepared(session, records, plan, self.run_id)

    def _add_tenants(self, session: Session, plans: list[TenantPlan]) -> None:
        """The planned new tenants' rows (their keys exist already).

        Refused (Conflict) when one was created since the plan: then the chunk is
        prepared again, that tenant failing alone.
        """
        if not plans:
            return
        principal = operator(self.subject, None)
        bind(self.run_id, principal, None, "legacy.migrate")
        names = {p.tenant_id: _tenant_name(p) for p in plans}
        try:
            add_tenants(session, principal=principal, names=names)
        except BrokerError:
            if len(plans) > 1:
                raise _OneFailed() from None
            raise
        session.flush()  # the settings rows, which the patches lock

    def _ensure_tenant(
        self,
        session: Session,
        plan: TenantPlan,
        principal: Principal,
        locked: dict[str, TenantSettings],
    ) -> None:
        """A settings row if the tenant lacks one; the planned settings patch, applied once.

        `locked` holds the settings rows the chunk locked up front; a row made since
        (a tenant added in its own savepoint, or from before settings rows) is locked here.
        """
        tenant_id = plan.tenant_id
        created = not plan.tenant_existed
        if not created and session.get(TenantSettings, tenant_id) is None:
            # A tenant from before settings rows.
            session.add(default_settings_row(tenant_id, updated_by=principal.actor))
            session.flush()
        if plan.patch:
            row = locked.get(tenant_id) or lock_settings(session, [tenant_id]).get(tenant_id)
            if row is None:
                raise NotFound("no settings for this tenant")
            patch_locked(session, row, principal=principal, patch=plan.patch)
        plan.outcome.created = created

    def _store_all(self, plans: list[TenantPlan]) -> Stop | None:
        """Settle interrupted writes, then store and verify the credentials.

        The credentials go through the API's write protocol a batch at a time
        (`SaveBatch`): one transaction marks every row pending, one settles them,
        and the Vault calls run `workers` at once. A run that stops part way still
        settles what it wrote and clears the marks of what it did not.
        """
        stop = self._each(self._reconcile, [p for p in plans if p.reconcile])
        pairs = self._pairs([p for p in plans if p.reached])
        if stop is not None or not pairs:
            return stop
        batch = SaveBatch(self.engine, self.vault, self.outbound, PROVIDER, [s for _, s in pairs])
        batch.check()
        stop = self._each(lambda pair: self._step(pair, batch.seal), pairs)
        if stop is None:
            batch.mark()
            stop = _first_stop(pairs)
        if stop is None:
            stop = self._each(lambda pair: self._step(pair, batch.write), pairs)
        batch.settle()
        for plan, save in pairs:
            if plan.reached:
                self._settled(plan, save)
        written = [p for p, s in pairs if p.reached and s.result is not None]
        if stop is not None:
            # Stored, but the run stopped before reading them back: the rerun verifies them.
            for plan in written:
                plan.reached = False
            return stop
        return self._each_on_loop(self._verify, written)

    def _pairs(self, plans: list[TenantPlan]) -> list[tuple[TenantPlan, BatchSave]]:
        """A save for each plan with credentials, based on the version its row holds now."""
        etags = self._etags([p.tenant_id for p in plans if p.tenant_existed])
        return [
            (plan, self._save(plan, creds, etags.get(plan.tenant_id, etag(None))))
            for plan in plans
            if (creds := plan.creds) is not None
        ]

    def _save(self, plan: TenantPlan, creds: Credentials, if_match: str) -> BatchSave:
        principal = operator(self.subject, plan.tenant_id)
        return BatchSave(
            principal=principal,
            tenant_id=plan.tenant_id,
            fields={name: creds.reveal(name) for name in creds.names()},
            if_match=if_match,
            context=self._context(plan.group, principal),
        )

    def _each(self, step: Callable[[_Item], object], items: list[_Item]) -> Stop | None:
        """Run `step` over the items, `workers` at once; those not started are not reached."""
        stopped: Stop | None = None
        for item, started, stop in fan_out(step, items, self.workers):
            stopped = stopped or stop
            if started is None and stop is None:
                _plan_of(item).reached = False
        return stopped

    def _step(self, pair: tuple[TenantPlan, BatchSave], step: Callable[[BatchSave], None]) -> bool:
        """One save's step of the batch; Stop when it met Vault or PostgreSQL unavailable."""
        plan, save = pair
        step(save)
        if isinstance(save.error, _SYSTEMIC):
            raise Stop(save.error.message, plan.fail(save.error.message))
        return True

    def _reconcile(self, plan: TenantPlan) -> bool:
        """An earlier run (or API call) was cut off mid-write: settle it first."""
        self._bind(plan.group)
        try:
            reconcile_tenant(self.engine, self.store, plan.tenant_id)
        except _SYSTEMIC as exc:
            raise Stop(exc.message, plan.fail(exc.message)) from None
        return True

    def _settled(self, plan: TenantPlan, save: BatchSave) -> None:
        """The plan's outcome from its settled save."""
        if save.result is not None:
            plan.kv_version = save.result.kv_version
        elif isinstance(save.error, Conflict | PreconditionFailed):
            self._lost_race(plan)
        elif save.error is not None and not isinstance(save.error, _SYSTEMIC):
            plan.fail(save.error.message)

    def _lost_race(self, plan: TenantPlan) -> None:
        """Someone wrote between our check and our write: look again."""
        creds = plan.creds
        try:
            found = read_credentials(self.vault, tenant_id=plan.tenant_id, provider=PROVIDER)
        except NotFound:
            found = None
        if found is not None and creds is not None and same_credentials(found[0], creds):
            plan.outcome.credential, plan.kv_version = "unchanged", found[1]
            return
        plan.fail(
            "different Twilio credentials were stored for this tenant while the migration "
            "ran; both were left untouched",
            "conflict",
            credential="conflict",
            created=plan.outcome.created,
            settings_groups=plan.outcome.settings_groups,
            unmapped=plan.outcome.unmapped,
        )

    def _each_on_loop(
        self,
        step: Callable[[TenantPlan, anyio.CapacityLimiter], Awaitable[None]],
        plans: list[TenantPlan],
    ) -> Stop | None:
        """`_each` for a step whose Vault calls are made on an event loop
        (`VaultGateway.each_on_loop`), `workers` tenants at once; once one meets Vault
        unavailable (Stop), those not started are not reached."""
        stops: list[Stop] = []

        async def one(plan: TenantPlan, threads: anyio.CapacityLimiter) -> None:
            if stops:
                plan.reached = False
                return
            try:
                await step(plan, threads)
            except Stop as stop:
                stops.append(stop)

        for result in self.vault.each_on_loop(one, plans, at_once=self.workers):
            if isinstance(result, Exception):
                raise result
        return stops[0] if stops else None

    async def _verify(self, plan: TenantPlan, threads: anyio.CapacityLimiter) -> None:
        """Read the credentials back from Vault and compare fingerprints."""
        self._bind(plan.group)
        try:
            stored, _ = await read_credentials_on_loop(
                self.vault, tenant_id=plan.tenant_id, provider=PROVIDER, threads=threads
            )
            verified = plan.creds is not None and same_credentials(stored, plan.creds)
        except NotFound:
            verified = False
        except _SYSTEMIC as exc:
            raise Stop(exc.message, plan.fail(exc.message)) from None
        except BrokerError as exc:
            plan.fail(exc.message)
            return
        if not verified:
            plan.fail(
                "verification failed: the credentials read back from Vault do not match "
                "the legacy ones",
                credential=plan.outcome.credential,
                created=plan.outcome.created,
                settings_groups=plan.outcome.settings_groups,
                unmapped=plan.outcome.unmapped,
            )

    def _etags(self, tenant_ids: list[str]) -> dict[str, str]:
        """The ETag each tenant's metadata row has now; a save fails if anyone moves it."""
        if not tenant_ids:
            return {}
        with unit_of_work(self.engine) as session:
            rows = session.exec(
                select(IntegrationCredential)
                .where(col(IntegrationCredential.tenant_id).in_(tenant_ids))
                .where(IntegrationCredential.provider == PROVIDER)
            )
            return {row.tenant_id: etag(row) for row in rows}

    # -- record -------------------------------------------------------------------------

    def _record(self, plans: list[TenantPlan]) -> None:
        """Every outcome into the progress table and the audit trail, in one transaction."""
        if not plans:
            return
        now = utcnow()
        with unit_of_work(self.engine) as session:
            records = _lock_records(session, self.source.label, [p.group for p in plans])
            for plan in plans:
                principal = self._bind(plan.group)
                status = _progress_status(plan.outcome)
                for legacy in plan.group.legacy_ids:
                    _note(records[legacy], plan, status, now, self.run_id)
                    session.add(records[legacy])
                _audit(session, plan, status, principal, self.source.label)

    def _bind(self, group: Group) -> Principal:
        principal = operator(self.subject, group.tenant_id)
        bind(self.run_id, principal, group.tenant_id, "legacy.migrate")
        return principal

    def _context(self, group: Group, principal: Principal) -> RequestContext:
        return request_context(self.run_id, principal, group.tenant_id, "legacy.migrate")


_Item = TypeVar("_Item", TenantPlan, tuple[TenantPlan, BatchSave])


def _plan_of(item: TenantPlan | tuple[TenantPlan, BatchSave]) -> TenantPlan:
    return item if isinstance(item, TenantPlan) else item[0]


def _first_stop(pairs: list[tuple[TenantPlan, BatchSave]]) -> Stop | None:
    """Stop when marking met Vault or PostgreSQL unavailable: the saves left are not reached."""
    failed = [(p, s.error) for p, s in pairs if isinstance(s.error, _SYSTEMIC)]
    if not failed:
        return None
    plan, error = failed[0]
    for other, save in pairs:
        if other is not plan and save.error is None:
            other.reached = False
    return Stop(error.message, plan.fail(error.message))


def _lock_records(
    session: Session, source: str, groups: Sequence[Group]
) -> dict[str, LegacyMigration]:
    """The progress rows of `groups`, locked; created (pending) for legacy ids without one."""
    ids = [legacy for g in groups for legacy in g.legacy_ids]
    now = utcnow()
    session.execute(
        pg_insert(LegacyMigration).on_conflict_do_nothing(),
        [
            {
                "source": source,
                "legacy_id": legacy,
                "status": "pending",
                "settings_applied": False,
                "settings_groups": [],
                "unmapped_keys": [],
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for legacy in ids
        ],
    )
    rows = session.exec(
        select(LegacyMigration)
        .where(LegacyMigration.source == source)
        .where(col(LegacyMigration.legacy_id).in_(ids))
        .with_for_update()
    )
    return {row.legacy_id: row for row in rows}


def _note_prepared(
    session: Session, records: dict[str, LegacyMigration], plan: TenantPlan, run_id: str
) -> None:
    """The progress rows of a prepared tenant: pending, its metadata applied."""
    for legacy in plan.group.legacy_ids:
        record = records[legacy]
        record.tenant_id = plan.tenant_id
        record.status = "pending"
        record.settings_applied = True
        record.settings_groups = plan.outcome.settings_groups
        record.unmapped_keys = [u.as_dict() for u in plan.outcome.unmapped]
        record.run_id = run_id
        record.updated_at = utcnow()
        session.add(record)


def _tenant_name(plan: TenantPlan) -> str:
    """The legacy row's name, cut to fit; the tenant id when it has none."""
    return ((plan.row.name if plan.row else None) or "").strip()[:200] or plan.tenant_id


def _progress_status(outcome: TenantOutcome) -> str:
    if outcome.status in ("conflict", "failed"):
        return outcome.status
    if outcome.credential == "incomplete":
        return "skipped"
    return "verified"


def _note(
    record: LegacyMigration, plan: TenantPlan, status: str, now: datetime, run_id: str
) -> None:
    """Write one outcome into a progress row."""
    outcome = plan.outcome
    record.tenant_id = plan.group.tenant_id
    record.status = status
    record.credential = outcome.credential
    record.attempts += 1
    record.run_id = run_id
    # "already in the broker" is a note, not an error.
    note = outcome.reason if status != "verified" else None
    record.last_error = (note or "")[:500] or None
    record.updated_at = now
    if outcome.credential == "stored":
        record.connection_test = "skipped"
    if status == "verified":
        record.kv_version = plan.kv_version
        record.verified_at = now


def _audit(
    session: Session, plan: TenantPlan, status: str, principal: Principal, source: str
) -> None:
    outcome, group = plan.outcome, plan.group
    trail.record(
        session,
        action="legacy.migrate",
        resource=f"tenants/{group.tenant_id}" if group.tenant_id else "legacy",
        outcome="success" if status in ("verified", "skipped") else "failed",
        principal=principal,
        tenant_id=group.tenant_id,
        detail={
            "source": source,
            "legacy_ids": group.legacy_ids[:20],
            "status": status,
            "credential": outcome.credential,
            "connection_test": "skipped" if outcome.credential == "stored" else None,
            "settings_groups": outcome.settings_groups,
            "unmapped_keys": [u.key for u in outcome.unmapped],
            "reason": outcome.reason,
        },
    )
