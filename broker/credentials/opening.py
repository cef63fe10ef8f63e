"""A fetch's two Vault calls, the KV read and the Transit decrypt, overlapped when they can be.

A fetch reads the tenant's sealed item from KV, then asks Transit to decrypt the
ciphertext it holds: two round trips, one after the other. That ciphertext changes
only when the item is written (a save, a key rotation's rewrap, an OAuth refresh),
so each process remembers, per tenant and item, the ciphertext it last opened
(`LastOpened`: ciphertexts only, never a plaintext, and at most `MAX_REMEMBERED` of
them, the least recently opened dropped first). With one remembered, `read_and_open`
starts its decrypt at the same time as the KV read. When the read answers:

- no record, or a provider in dynamic delivery: the early decrypt is cancelled (its
  answer, if any, is dropped unread) and the remembered ciphertext forgotten; the
  fetch goes on as it always did (404, or a minted key). The process that switches a
  provider to dynamic delivery forgets it at once (broker.leases.routes), so only the
  other processes make that one guess;
- the record holds exactly the remembered ciphertext: the early plaintext is the one
  a decrypt made now would return (same ciphertext, same tenant key, same binding),
  so it is used, checked against the record's public part like any other
  (`verified_secrets`: tampering is still refused);
- another ciphertext, or the early decrypt failed for any reason: it is dropped and
  the record's own ciphertext decrypted, as without a guess. An error therefore
  means what it always did (503 with Retry-After, a retired key version, ...).

Nothing a fetch guarantees moves: every fetch still reads KV (a change is served at
once) and makes at least one Transit decrypt, both carrying the caller's audited
headers (the early decrypt's task copies the request context) and both within the
request's one Vault budget. A fetch that is cancelled (the client went away) cancels
the early decrypt and waits for it to end, so nothing outlives the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

import anyio

from broker.vault.sealed import SealedRecord, SealedStore, verified_secrets

# Above the tenant count the bench measures (10,000) at a few hundred bytes each: a few MB.
MAX_REMEMBERED = 16_384


class LastOpened:
    """Per (tenant, item), the ciphertext this process last opened; at most `size` of them."""

    def __init__(self, size: int = MAX_REMEMBERED) -> None:
        self.size = size
        self._ciphertexts: OrderedDict[tuple[str, str], str] = OrderedDict()
        # The app's loop uses it; a test client may serve from more than one thread.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ciphertexts)

    def __repr__(self) -> str:
        return f"LastOpened({len(self)} of {self.size})"

    def get(self, tenant_id: str, item: str) -> str | None:
        """The ciphertext last opened for this item, if still remembered."""
        return self._ciphertexts.get((tenant_id, item))

    def remember(self, tenant_id: str, item: str, ciphertext: str) -> None:
        """Keep `ciphertext` as this item's, dropping the least recently opened past `size`."""
        with self._lock:
            self._ciphertexts[tenant_id, item] = ciphertext
            self._ciphertexts.move_to_end((tenant_id, item))
            while len(self._ciphertexts) > self.size:
                self._ciphertexts.popitem(last=False)

    def forget(self, tenant_id: str, item: str) -> None:
        """Expect nothing of this item any more."""
        with self._lock:
            self._ciphertexts.pop((tenant_id, item), None)


def delivers_stored(record: SealedRecord) -> bool:
    """Whether a fetch hands out what `record` seals: not in dynamic delivery, whose stored
    root credential only mints the keys handed out (broker/leases)."""
    return record.public.get("delivery") != "dynamic"


async def read_and_open(
    store: SealedStore,
    opened: LastOpened,
    tenant_id: str,
    item: str,
    *,
    threads: anyio.CapacityLimiter,
) -> tuple[SealedRecord | None, dict[str, str] | None]:
    """The item's record (None when missing) and its verified secrets (None when missing
    or in dynamic delivery), the decrypt begun early when a ciphertext is remembered."""
    expected = opened.get(tenant_id, item)
    early = None
    if expected is not None:
        early = asyncio.create_task(_decrypt_or_none(store, tenant_id, item, expected, threads))
    try:
        record = await store.read_on_loop(tenant_id, item, threads=threads)
        if record is None or not delivers_stored(record):
            opened.forget(tenant_id, item)
            return record, None
        plaintext = None
        if early is not None and record.ciphertext == expected:
            plaintext = await early
        if plaintext is None:
            plaintext = await store.decrypt_on_loop(
                tenant_id, item, record.ciphertext, threads=threads
            )
        secrets = verified_secrets(plaintext, record)
    finally:
        if early is not None:
            await _ended(early)
    opened.remember(tenant_id, item, record.ciphertext)
    return record, secrets


async def _decrypt_or_none(
    store: SealedStore,
    tenant_id: str,
    item: str,
    ciphertext: str,
    threads: anyio.CapacityLimiter,
) -> bytes | None:
    """The early decrypt: its plaintext, or None when it failed in any way, for the record's
    ciphertext is then decrypted again (and that answer, or error, is the fetch's).

    One attempt on the loop, never retried on a thread: it is a guess, and during a Vault
    outage a threaded retry would hold a second of the fetch's `threads` for nothing.
    """
    try:
        return await store.decrypt_on_loop(
            tenant_id, item, ciphertext, threads=threads, retry=False
        )
    except Exception:
        return None


async def _ended(early: asyncio.Task[bytes | None]) -> None:
    """Cancel the early decrypt unless it has ended, and wait until it has, even while the
    fetch itself is being cancelled."""
    if early.done():
        return
    early.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait([early])
