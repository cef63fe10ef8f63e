"""Denials past the denial limit: counted in memory, written to the trail as one row per window.

Within the limit every denied request keeps its own trail event. Past it the
caller gets 429s, and the trail gets one event per (actor, tenant, action) and
window that says how many denials it stands for, so a flood of requests with a
low-privilege token cannot flood the trail.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine

from broker.audit import trail
from broker.auth.principal import Principal


@dataclass
class DeniedRun:
    """The denials of one caller on one action within one window, beyond the limit."""

    principal: Principal | None
    action: str
    resource: str
    status: int
    reason: str
    window_start: float
    window_s: float
    count: int = 0


class DenialTally:
    """Counts denials past the limit per (actor, tenant, action, status) and window; O(1) each."""

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._runs: dict[tuple[str | None, str | None, str, int], DeniedRun] = {}
        self._lock = threading.Lock()
        self._next_sweep = clock() + window_s

    def add(
        self, *, principal: Principal | None, action: str, resource: str, status: int, reason: str
    ) -> list[DeniedRun]:
        """Count one denial; return the runs whose windows have closed, to be written now."""
        now = self._clock()
        start = now - now % self.window_s
        key = (principal.actor if principal else None, _tenant(principal), action, status)
        closed: list[DeniedRun] = []
        with self._lock:
            run = self._runs.get(key)
            if run is not None and run.window_start != start:
                closed.append(self._runs.pop(key))
                run = None
            if run is None:
                run = self._runs[key] = DeniedRun(
                    principal, action, resource, status, reason, start, self.window_s
                )
            run.count += 1
            if now >= self._next_sweep:
                closed.extend(self._pop_closed(start))
                self._next_sweep = now + self.window_s
        return closed

    def closed(self) -> list[DeniedRun]:
        """The runs whose windows have closed, removed from the tally (cheap when none can be)."""
        now = self._clock()
        with self._lock:
            if now < self._next_sweep:
                return []
            self._next_sweep = now + self.window_s
            return self._pop_closed(now - now % self.window_s)

    def drain(self) -> list[DeniedRun]:
        """Every run, closed or not (at shutdown)."""
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        return runs

    def _pop_closed(self, current_start: float) -> list[DeniedRun]:
        keys = [key for key, run in self._runs.items() if run.window_start != current_start]
        return [self._runs.pop(key) for key in keys]


def _tenant(principal: Principal | None) -> str | None:
    return principal.tenant_id if principal else None


def write(engine: Engine, runs: Iterable[DeniedRun]) -> None:
    """Append one trail event per run, saying how many denials it stands for."""
    for run in runs:
        # In an empty context: the event belongs to no single request, so it must
        # not carry the request id and address of whichever request flushed it.
        contextvars.Context().run(
            trail.record_separately,
            engine,
            action=run.action,
            resource=run.resource,
            outcome="denied",
            principal=run.principal,
            detail={
                "status": run.status,
                "reason": run.reason,
                "repeated": run.count,
                "answered": 429,
                "from": _iso(run.window_start),
                "until": _iso(run.window_start + run.window_s),
            },
        )


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()
