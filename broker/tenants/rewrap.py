"""The Vault side of one tenant's key rotation: rewrap every sealed item, write it back
with check-and-set, then retire the key versions before the rotation's target.

No PostgreSQL here: `broker.tenants.keys` marks the rows before and settles them after.
The requests are made on the event loop (`VaultGateway.call_on_loop`: one attempt, the
audited headers, anything indefinite handed to the threaded `call` on `threads`, which
retries, fails over and logs in again). A tenant's item reads go out together, then its
rewraps, then its check-and-set writes together, each group answered in full before the
next starts; `keys` runs several tenants at once. Vault requests per tenant: one listing
per folder (the tenant's own, its integrations, the keys of live dynamic leases), one
read per item, one rewrap per `batch` items (all of a tenant's items in one call), one
check-and-set write per item, and one key configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

import anyio

from broker.core.errors import BrokerError, Conflict, UpstreamUnavailable
from broker.vault.errors import VaultMisconfigured
from broker.vault.sealed import (
    SealedRecord,
    SealedStore,
    binding,
    ciphertext_key_version,
    key_name,
)


@dataclass(frozen=True)
class Written:
    """One item moved from KV version `before` to `after` by the rewrap."""

    item: str
    before: int
    after: int


@dataclass(frozen=True)
class Outcome:
    """What the rewrap did to one tenant's items."""

    written: list[Written]
    current: int
    # Items Vault would not rewrap (e.g. a ciphertext that never decrypted under this
    # tenant's binding): left as they were, named for an operator.
    failed: tuple[str, ...]

    def moved(self, item: str) -> Written | None:
        """The move of `item`, if this rewrap wrote it."""
        return next((w for w in self.written if w.item == item), None)


T = TypeVar("T")
_Stale = tuple[str, SealedRecord]
_Rewrapped = tuple[_Stale, str]


@dataclass(frozen=True)
class _Tenant:
    """Where one tenant's items are, and the threads its indefinite requests go on to."""

    store: SealedStore
    tenant_id: str
    threads: anyio.CapacityLimiter


async def rewrap_tenant(
    store: SealedStore,
    tenant_id: str,
    target: int,
    *,
    batch: int,
    threads: anyio.CapacityLimiter,
) -> Outcome:
    """Rewrap every live item older than `target` (`batch` ciphertexts per call), write
    each back with check-and-set, then refuse ciphertexts older than `target`.

    The key versions are retired only once every rewrapped item is written back, and
    even when some items failed: those never decrypted anyway, every other ciphertext
    is on `target` by then.
    """
    tenant = _Tenant(store, tenant_id, threads)
    stale, current, failed = await _stale_items(tenant, target)
    rewrapped, unwrappable = await _rewrap(tenant, stale, batch)
    written = [w for w in await _together(_write_back(tenant, e) for e in rewrapped) if w]
    # An item another save rewrote meanwhile is current: it was sealed with the newest key.
    current += len(rewrapped) - len(written)
    await store.vault.transit.set_min_decryption_version_on_loop(
        key_name(tenant_id), target, threads=threads
    )
    return Outcome(written, current, tuple(sorted([*failed, *unwrappable])))


async def _stale_items(tenant: _Tenant, target: int) -> tuple[list[_Stale], int, list[str]]:
    """Every live item sealed before `target`, how many are current, and which are not
    Transit ciphertexts at all."""
    stale: list[_Stale] = []
    current = 0
    failed: list[str] = []
    # Everything under the tenant's path: its integrations, the payout record, and the
    # sealed keys of live dynamic leases (`leases/<id>`), which a fetch still opens.
    store, tenant_id, threads = tenant.store, tenant.tenant_id, tenant.threads
    items = await store.items_on_loop(tenant_id, threads=threads)
    records = await _together(store.read_on_loop(tenant_id, i, threads=threads) for i in items)
    for item, record in zip(items, records, strict=True):
        if record is None:
            continue
        try:
            version = ciphertext_key_version(record.ciphertext)
        except ValueError:
            failed.append(item)
            continue
        if version >= target:
            current += 1
        else:
            stale.append((item, record))
    return stale, current, failed


async def _together(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Each call's answer, in order, once every one is answered; then the first error.

    Unlike a bare `gather`, none is left running when one fails: the caller (and the
    settling in `keys`) may rely on every request of this tenant being answered.
    """
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


async def _write_back(tenant: _Tenant, entry: _Rewrapped) -> Written | None:
    """Write one rewrapped item over the version it was read at; None when a save won."""
    (item, record), ciphertext = entry
    try:
        after = await tenant.store.write_on_loop(
            tenant.tenant_id,
            item,
            ciphertext=ciphertext,
            public=record.public,
            cas=record.version,
            threads=tenant.threads,
        )
    except Conflict:
        return None
    return Written(item, record.version, after)


async def _rewrap(
    tenant: _Tenant, stale: list[_Stale], batch: int
) -> tuple[list[_Rewrapped], list[str]]:
    """Rewrap ciphertexts in batch calls, one by one only within a batch that fails."""
    done: list[_Rewrapped] = []
    failed: list[str] = []
    for start in range(0, len(stale), batch):
        chunk_done, chunk_failed = await _rewrap_batch(tenant, stale[start : start + batch])
        done.extend(chunk_done)
        failed.extend(chunk_failed)
    return done, failed


async def _rewrap_batch(tenant: _Tenant, stale: list[_Stale]) -> tuple[list[_Rewrapped], list[str]]:
    """One batch call when all succeed, else one by one to name the bad items."""
    transit, tenant_id = tenant.store.vault.transit, tenant.tenant_id
    key = key_name(tenant_id)
    try:
        # Each entry carries its own context; one bad entry fails the whole batch.
        fresh = await transit.rewrap_on_loop(
            key,
            [(r.ciphertext, binding(tenant_id, item)) for item, r in stale],
            threads=tenant.threads,
        )
        return list(zip(stale, fresh, strict=True)), []
    except (UpstreamUnavailable, VaultMisconfigured):
        raise  # Vault or the broker's policy, not an item: stop here, resumable
    except BrokerError:
        pass
    done: list[_Rewrapped] = []
    failed: list[str] = []
    for item, record in stale:
        try:
            (ciphertext,) = await transit.rewrap_on_loop(
                key, [(record.ciphertext, binding(tenant_id, item))], threads=tenant.threads
            )
        except (UpstreamUnavailable, VaultMisconfigured):
            raise
        except BrokerError:
            failed.append(item)
            continue
        done.append(((item, record), ciphertext))
    return done, failed
