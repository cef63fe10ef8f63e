"""Which tenants are being deleted, as the credential-fetch path sees them without waiting.

Delivery must stop the moment a tenant's deletion starts, yet a fetch must never
wait on PostgreSQL. Three layers, each cheaper and later than the one before:

1. the process handling the DELETE marks the tenant here before it touches Vault;
2. the deletion's first Vault step retires every version of the tenant's key,
   so from then on Vault itself refuses every ciphertext, for every replica;
3. the other replicas read the tenants marked deleting from PostgreSQL, at most
   `ttl_s` apart, in a background thread; a fetch only ever reads the last
   answer (stale while revalidating), and keeps it while the database is down.

So a replica delivers a deleting tenant's credentials for at most `ttl_s` plus
one database round trip after the mark was committed, and only if Vault was
unavailable for step 2; otherwise it stops at once everywhere.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine
from sqlmodel import col, select

from broker.core.db import unit_of_work
from broker.models import Tenant

log = logging.getLogger(__name__)


class DeletionWatch:
    """The tenants this process knows are being deleted; reading it never blocks."""

    def __init__(self, engine: Engine, *, ttl_s: float) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._local: set[str] = set()
        self._seen: frozenset[str] = frozenset()
        self._checked_at = float("-inf")
        self._refreshing = threading.Lock()

    def mark(self, tenant_id: str) -> None:
        """This process is deleting the tenant: stop delivering it now."""
        self._local.add(tenant_id)

    def forget(self, tenant_id: str) -> None:
        """The tenant is gone for good (its key with it); nothing left to guard."""
        self._local.discard(tenant_id)

    def is_deleting(self, tenant_id: str) -> bool:
        """True when this process marked the tenant or last saw it marked in PostgreSQL."""
        self.revalidate()
        return tenant_id in self._local or tenant_id in self._seen

    def revalidate(self) -> None:
        """Start one background refresh when the last answer is older than `ttl_s`."""
        if time.monotonic() - self._checked_at < self._ttl_s:
            return
        # Single flight: while one refresh runs (perhaps stuck on a stalled
        # database, for at most its deadline) no other one starts.
        if not self._refreshing.acquire(blocking=False):
            return
        threading.Thread(target=self._refresh, name="deletion-watch", daemon=True).start()

    def refresh(self) -> None:
        """Read the tenants marked deleting now (blocking; tests and the CLI call this)."""
        with self._refreshing:
            self._read()

    def _refresh(self) -> None:
        try:
            self._read()
        finally:
            self._refreshing.release()

    def _read(self) -> None:
        try:
            with unit_of_work(self._engine) as session:
                query = select(Tenant.id).where(col(Tenant.deleting_at).is_not(None))
                self._seen = frozenset(session.exec(query))
        except Exception as exc:  # a background thread: nobody else would see it
            # Keep the last answer; the next fetch after `ttl_s` tries again.
            log.warning(
                "tenant deletions could not be read; keeping the last answer",
                extra={"fields": {"error": type(exc).__name__}},
            )
        self._checked_at = time.monotonic()
