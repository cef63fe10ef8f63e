"""The Vault side of one tenant's key rotation: rewrap every sealed item, write it back
with check-and-set, then retire the key versions before the rotation's target.

No PostgreSQL here: `broker.tenants.keys` marks the rows before and settles them after.
Vault requests per tenant: one listing per folder (the tenant's own, its
integrations, the keys of live dynamic leases), one read per item, one rewrap per
`batch` items (all of a tenant's items in one call), one check-and-set write per
item, and one key configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

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


_Stale = tuple[str, SealedRecord]
_Rewrapped = tuple[_Stale, str]


def rewrap_tenant(store: SealedStore, tenant_id: str, target: int, *, batch: int) -> Outcome:
    """Rewrap every live item older than `target` (`batch` ciphertexts per call), write
    each back with check-and-set, then refuse ciphertexts older than `target`.

    The key versions are retired only once every rewrapped item is written back, and
    even when some items failed: those never decrypted anyway, every other ciphertext
    is on `target` by then.
    """
    stale, current, failed = _stale_items(store, tenant_id, target)
    rewrapped, unwrappable = _rewrap(store, tenant_id, stale, batch)
    written = [w for w in (_write_back(store, tenant_id, entry) for entry in rewrapped) if w]
    # An item another save rewrote meanwhile is current: it was sealed with the newest key.
    current += len(rewrapped) - len(written)
    store.vault.transit.set_min_decryption_version(key_name(tenant_id), target)
    return Outcome(written, current, tuple(sorted([*failed, *unwrappable])))


def _stale_items(
    store: SealedStore, tenant_id: str, target: int
) -> tuple[list[_Stale], int, list[str]]:
    """Every live item sealed before `target`, how many are current, and which are not
    Transit ciphertexts at all."""
    stale: list[_Stale] = []
    current = 0
    failed: list[str] = []
    # Everything under the tenant's path: its integrations, the payout record, and the
    # sealed keys of live dynamic leases (`leases/<id>`), which a fetch still opens.
    for item in store.items(tenant_id):
        record = store.read(tenant_id, item)
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


def _write_back(store: SealedStore, tenant_id: str, entry: _Rewrapped) -> Written | None:
    """Write one rewrapped item over the version it was read at; None when a save won."""
    (item, record), ciphertext = entry
    try:
        after = store.write(
            tenant_id, item, ciphertext=ciphertext, public=record.public, cas=record.version
        )
    except Conflict:
        return None
    return Written(item, record.version, after)


def _rewrap(
    store: SealedStore, tenant_id: str, stale: list[_Stale], batch: int
) -> tuple[list[_Rewrapped], list[str]]:
    """Rewrap ciphertexts in batch calls, one by one only within a batch that fails."""
    done: list[_Rewrapped] = []
    failed: list[str] = []
    for start in range(0, len(stale), batch):
        chunk_done, chunk_failed = _rewrap_batch(store, tenant_id, stale[start : start + batch])
        done.extend(chunk_done)
        failed.extend(chunk_failed)
    return done, failed


def _rewrap_batch(
    store: SealedStore, tenant_id: str, stale: list[_Stale]
) -> tuple[list[_Rewrapped], list[str]]:
    """One batch call when all succeed, else one by one to name the bad items."""
    key = key_name(tenant_id)
    try:
        # Each entry carries its own context; one bad entry fails the whole batch.
        fresh = store.vault.transit.rewrap(
            key, [(r.ciphertext, binding(tenant_id, item)) for item, r in stale]
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
            (ciphertext,) = store.vault.transit.rewrap(
                key, [(record.ciphertext, binding(tenant_id, item))]
            )
        except (UpstreamUnavailable, VaultMisconfigured):
            raise
        except BrokerError:
            failed.append(item)
            continue
        done.append(((item, record), ciphertext))
    return done, failed
