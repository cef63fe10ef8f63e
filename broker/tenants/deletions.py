"""Which tenants are being deleted, as the credential-fetch path sees them without waiting.

Delivery must stop the moment a tenant's deletion starts, yet a fetch must never
wait on PostgreSQL. Three layers, each cheaper and later than the one before:

1. the process handling the DELETE marks the tenant here before it touches Vault;
2. the deletion's first Vault step retires every version of the tenant's key,
   so from then on Vault itself refuses every ciphertext, for every replica;
3. the other replicas read the tenants marked deleting from PostgreSQL, in a
   background thread, when a fetch finds their view older than `ttl_s`. That
   fetch waits for the refresh at most `grace_s`; every other fetch reads the
   last view as it is (stale while revalidating), so a database that does not
   answer delays one fetch per refresh by `grace_s`, and stops none.

So while PostgreSQL answers, a replica delivers a deleting tenant's credentials
for at most `ttl_s` after the mark was committed, and only if Vault was
unavailable for step 2; otherwise delivery stops at once everywhere. While
PostgreSQL does not answer, a replica goes on with the last view it read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlmodel import col, select

from broker.core.db import unit_of_work
from broker.models import Tenant

log = logging.getLogger(__name__)


class DeletionWatch:
    """The tenants this process knows are being deleted; reading it never blocks."""

    def __init__(self, engine: Engine, *, ttl_s: float, grace_s: float = 0.25) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._grace_s = grace_s
        self._local: set[str] = set()
        self._seen: frozenset[str] = frozenset()
        self._checked_at = float("-inf")
        self._refreshing = threading.Lock()
        self.on_refresh_failed: Callable[[], None] = lambda: None  # for /metrics

    @property
    def grace_s(self) -> float:
        """How long the fetch that finds the view stale waits for the refresh."""
        return self._grace_s

    def mark(self, tenant_id: str) -> None:
        """This process is deleting the tenant: stop delivering it now."""
        self._local.add(tenant_id)

    def forget(self, tenant_id: str) -> None:
        """The tenant is gone for good (its key with it); nothing left to guard."""
        self._local.discard(tenant_id)

    def is_deleting(self, tenant_id: str) -> bool:
        """True when this process marked the tenant or last saw it marked in PostgreSQL."""
        refreshed = self.revalidate()
        if refreshed is not None:
            # This fetch found the view stale: a healthy database answers
            # within the grace, and a stalled one costs this fetch no more.
            refreshed.wait(self._grace_s)
        return tenant_id in self._local or tenant_id in self._seen

    def revalidate(self) -> threading.Event | None:
        """Start one background refresh when the view is older than `ttl_s`; set when done."""
        if time.monotonic() - self._checked_at < self._ttl_s:
            return None
        # Single flight: while one refresh runs (perhaps stuck on a stalled
        # database, for at most its deadline) no other one starts.
        if not self._refreshing.acquire(blocking=False):
            return None
        done = threading.Event()
        threading.Thread(
            target=self._refresh, args=(done,), name="deletion-watch", daemon=True
        ).start()
        return done

    def refresh(self) -> None:
        """Read the tenants marked deleting now (blocking; tests and the CLI call this)."""
        with self._refreshing:
            self._read()

    def _refresh(self, done: threading.Event) -> None:
        try:
            self._read()
        finally:
            self._refreshing.release()
            done.set()

    def _read(self) -> None:
        try:
            with unit_of_work(self._engine) as session:
                query = select(Tenant.id).where(col(Tenant.deleting_at).is_not(None))
                self._seen = frozenset(session.exec(query))
        except Exception as exc:  # a background thread: nobody else would see it
            # Keep the last answer; the next fetch after `ttl_s` tries again.
            self.on_refresh_failed()
            log.warning(
                "tenant deletions could not be read; keeping the last answer",
                extra={"fields": {"error": type(exc).__name__}},
            )
        self._checked_at = time.monotonic()
