"""What a migration or finalize run reports: per tenant, and the summary.

Nothing secret is ever in a report: metadata keys are named only when they read
as plain names, and values never appear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

__all__ = [
    "ALREADY_DONE",
    "FinalizeOutcome",
    "FinalizeReport",
    "FinalizeStatus",
    "MigrationReport",
    "OutcomeStatus",
    "RunReport",
    "TenantOutcome",
    "UnmappedKey",
]

# Reasons of a "skipped" outcome that mean an earlier run did the work.
ALREADY_DONE = frozenset({"already migrated", "already finalized"})

OutcomeStatus = Literal["migrated", "skipped", "conflict", "failed"]


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

    def as_dict(self) -> dict[str, Any]: ...


_O = TypeVar("_O", bound=_HasStatus)
_S = TypeVar("_S", bound=str)  # the status literals of _O


@dataclass
class RunReport(Generic[_O, _S]):
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

    @property
    def ok(self) -> bool:
        """True when nothing went wrong and every tenant was reached."""
        raise NotImplementedError

    def summary(self) -> dict[str, int]:
        """The counts of this kind of run, between the tenants and those not reached."""
        raise NotImplementedError

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (no secret anywhere in it)."""
        return {
            "run_id": self.run_id,
            "source": self.source,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "summary": {"tenants": self.total, **self.summary(), "not_reached": self.remaining},
            "stopped": self.stopped,
            **self.extra(),
            "tenants": [o.as_dict() for o in self.outcomes],
        }

    def extra(self) -> dict[str, Any]:
        """What this kind of run reports besides the summary and the tenants."""
        return {}


@dataclass
class MigrationReport(RunReport[TenantOutcome, OutcomeStatus]):
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

    def summary(self) -> dict[str, int]:
        """The migration's counts."""
        return {
            "migrated": self.count("migrated"),
            "already_migrated": self.already_migrated,
            "skipped": self.count("skipped") - self.already_migrated,
            "conflicts": self.count("conflict"),
            "failed": self.count("failed"),
            "unmapped_keys": self.unmapped_keys,
        }

    def extra(self) -> dict[str, Any]:
        """The legacy ids that became a different tenant id."""
        return {"id_changes": self.id_changes()}


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
class FinalizeReport(RunReport[FinalizeOutcome, FinalizeStatus]):
    """The summary of one `broker migrate legacy --finalize` run."""

    rows_nulled: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing failed and every tenant was reached (left-alone ones are fine)."""
        return self.stopped is None and self.remaining == 0 and not self.count("failed")

    def summary(self) -> dict[str, int]:
        """The finalize run's counts."""
        return {
            "finalized": self.count("finalized"),
            "already_finalized": self.count("already_finalized"),
            "left_alone": self.count("left_alone"),
            "failed": self.count("failed"),
            "rows_nulled": self.rows_nulled,
        }
