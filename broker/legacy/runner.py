"""The batch runner `migrate` and `finalize` share: which tenants, in what batches, how fast.

Legacy ids are grouped by the tenant id they map to (`select_groups`); the
groups go through a run's step batch by batch (`run_batches`), with up to
`workers` tenants of a batch in flight at once (`fan_out`). A run stops at the
first sign that Vault or PostgreSQL is unavailable: the remaining tenants would
only fail the same way, and rerunning resumes.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import col, select

from broker.auth.principal import Principal
from broker.cli_support import OPERATOR_SCOPES
from broker.core import context
from broker.core.db import unit_of_work
from broker.core.errors import UpstreamUnavailable
from broker.legacy.mapping import normalise_tenant_id
from broker.legacy.reports import RunReport
from broker.legacy.source import LegacyKey, LegacyRow, LegacySource
from broker.models import LegacyMigration
from broker.vault.gateway import VaultGateway

__all__ = [
    "MIGRATION_SUBJECT",
    "Group",
    "Run",
    "Stop",
    "bind",
    "fan_out",
    "load_progress",
    "operator",
    "request_context",
    "rows_by_group",
    "run_batches",
    "select_groups",
]

log = logging.getLogger(__name__)

MIGRATION_SUBJECT = "legacy-migration"


@dataclass
class Group:
    """The legacy ids that land on one tenant id (None: no usable tenant id)."""

    tenant_id: str | None
    keys: list[LegacyKey]

    @property
    def legacy_ids(self) -> list[str]:
        """The legacy ids as text, as the progress table keys them."""
        return [k.text for k in self.keys]


class Stop(Exception):
    """Vault or PostgreSQL is unavailable: stop the run after recording this tenant."""

    def __init__(self, message: str, outcome: Any) -> None:
        super().__init__(message)
        self.message = message
        self.outcome = outcome


@dataclass
class Run:
    """What one migrate or finalize run works with; its `batch` is the step `run_batches` feeds.

    A subclass makes its report (and whatever else it needs) in `__post_init__`.
    """

    engine: Engine
    vault: VaultGateway
    source: LegacySource
    dry_run: bool
    subject: str
    workers: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


def select_groups(
    source: LegacySource, tenants: Sequence[str] | None
) -> tuple[list[Group], list[str]]:
    """Group the legacy ids by tenant id; also the --tenant values that matched nothing."""
    by_tenant: dict[str, list[LegacyKey]] = {}
    unusable: list[Group] = []
    for key in source.keys():
        tenant_id = normalise_tenant_id(key.text)
        if tenant_id is None:
            unusable.append(Group(None, [key]))
        else:
            by_tenant.setdefault(tenant_id, []).append(key)
    groups = [Group(t, keys) for t, keys in sorted(by_tenant.items())] + unusable
    if not tenants:
        return groups, []
    wanted = list(dict.fromkeys(tenants))

    def matches(group: Group, value: str) -> bool:
        return value in group.legacy_ids or (
            group.tenant_id is not None and group.tenant_id in (value, normalise_tenant_id(value))
        )

    selected = [g for g in groups if any(matches(g, w) for w in wanted)]
    missing = [w for w in wanted if not any(matches(g, w) for g in selected)]
    return selected, missing


def run_batches(
    groups: list[Group],
    report: RunReport[Any, Any],
    step: Callable[[list[Group]], None],
    *,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    on_batch_done: Callable[[int, list[Any]], None] | None = None,
) -> None:
    """Feed `groups` to `step` batch by batch until done or stopped.

    `step` appends each tenant's outcome to `report` and sets `report.stopped`
    when it had to stop; an UpstreamUnavailable it raises stops the run too.
    `on_progress(advanced, total)` is called at the start (0) and after each
    batch; `on_batch_done(batch_number, outcomes)` after each completed batch.
    It runs in a copied context: the per-tenant request contexts bound on the way
    must not outlive the run in the caller's thread.
    """
    contextvars.copy_context().run(
        _feed, groups, report, step, batch_size, on_progress, on_batch_done
    )


def _feed(
    groups: list[Group],
    report: RunReport[Any, Any],
    step: Callable[[list[Group]], None],
    batch_size: int,
    on_progress: Callable[[int, int], None] | None,
    on_batch_done: Callable[[int, list[Any]], None] | None,
) -> None:
    if on_progress is not None:
        on_progress(0, report.total)  # the bar shows from the start, not after a batch
    for number, start in enumerate(range(0, len(groups), batch_size), start=1):
        before = len(report.outcomes)
        try:
            step(groups[start : start + batch_size])
        except UpstreamUnavailable as exc:  # between tenants: nothing half-done
            report.stopped = report.stopped or f"{exc.message}; rerun to resume"
        if on_progress is not None and len(report.outcomes) > before:
            on_progress(len(report.outcomes) - before, report.total)
        if report.stopped is not None:
            log.warning(
                "legacy run stopped",
                extra={"fields": {"run_id": report.run_id, "reason": report.stopped}},
            )
            return
        if on_batch_done is not None:
            on_batch_done(number, report.outcomes[before:])


_T = TypeVar("_T")
_R = TypeVar("_R")


def fan_out(
    fn: Callable[[_T], _R], items: list[_T], workers: int
) -> Iterator[tuple[_T, _R | None, Stop | None]]:
    """Run `fn` over `items` (one per tenant) on `workers` threads; yield (item, result, stop).

    In order. Once one tenant raises Stop (Vault or PostgreSQL is gone), tenants
    not yet started are not started at all and come back with neither result
    nor stop. Each task runs in a copy of the caller's context, so the request
    context one tenant binds never leaks into another's.
    """
    halt = threading.Event()

    def task(item: _T) -> _R | None:
        if halt.is_set():
            return None
        try:
            return fn(item)
        except Stop:
            halt.set()
            raise

    if not items:
        return
    if workers == 1:
        for item in items:
            yield _settled(item, partial(contextvars.copy_context().run, task, item))
        return
    with ThreadPoolExecutor(
        max_workers=min(workers, len(items)), thread_name_prefix="legacy-migration"
    ) as pool:
        futures = [(i, pool.submit(contextvars.copy_context().run, task, i)) for i in items]
        try:
            for item, future in futures:
                yield _settled(item, future.result)
        finally:
            # On Ctrl-C (or any error) let the tenants in flight finish, start no more.
            halt.set()
            for _, future in futures:
                future.cancel()


def _settled(item: _T, result: Callable[[], _R | None]) -> tuple[_T, _R | None, Stop | None]:
    try:
        return item, result(), None
    except Stop as stop:
        return item, None, stop


def load_progress(
    engine: Engine, source: str, groups: Sequence[Group]
) -> dict[str, LegacyMigration]:
    """The progress rows of these groups' legacy ids, by legacy id."""
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


def rows_by_group(source: LegacySource, groups: Sequence[Group]) -> dict[str, list[LegacyRow]]:
    """Every legacy row (secrets included) of these groups, by tenant id, in one read."""
    by_legacy: dict[str, list[LegacyRow]] = {}
    for row in source.rows([k for g in groups for k in g.keys], secrets=True):
        by_legacy.setdefault(row.key.text, []).append(row)
    return {
        g.tenant_id or "": [r for legacy in g.legacy_ids for r in by_legacy.get(legacy, [])]
        for g in groups
    }


def operator(subject: str, tenant_id: str | None) -> Principal:
    """The principal a run acts as for one tenant."""
    return Principal(subject=subject, kind="user", scopes=OPERATOR_SCOPES, tenant_id=tenant_id)


def request_context(
    run_id: str, principal: Principal, tenant_id: str | None, action: str
) -> context.RequestContext:
    """The context naming the run, the operator and the tenant on Vault calls and trail events."""
    return context.RequestContext(
        request_id=f"legacy-{run_id}-{tenant_id or 'none'}",
        actor=principal.actor,
        tenant_id=tenant_id,
        action=action,
    )


def bind(run_id: str, principal: Principal, tenant_id: str | None, action: str) -> None:
    """Name the run, the operator and the tenant on every Vault call and trail event."""
    # The Vault gateway stamps these on every call as audited headers.
    context.bind(request_context(run_id, principal, tenant_id, action))
