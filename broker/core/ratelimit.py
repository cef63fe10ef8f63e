"""Rate limits with the `limits` library, keyed by principal and tenant, and by address.

Counters live in memory by default. With `BROKER_RATE_LIMIT_STORAGE=redis://...`
several broker processes share them; if Redis cannot be reached the limiter
falls back to memory (per process) rather than stop limiting.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from broker.core.errors import RateLimited

log = logging.getLogger(__name__)


class RateLimiter:
    """Named limits (`fetch`, `write`, `auth_failures`) over one storage, failing safe."""

    def __init__(self, storage_uri: str, limits: dict[str, str]) -> None:
        self.limits: dict[str, RateLimitItem] = {name: parse(spec) for name, spec in limits.items()}
        # A sliding-window counter, not a moving window: the in-memory moving
        # window of `limits` keeps an entry for every key it ever saw and sweeps
        # them all every 10 ms, so with one key per (principal, tenant) the sweep
        # grows with the number of tenants and slows every request.
        self._memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        if not storage_uri.startswith("memory://"):
            self._shared = self._connect(storage_uri)

    @staticmethod
    def _connect(uri: str) -> SlidingWindowCounterRateLimiter | None:
        try:
            storage = storage_from_string(uri, socket_timeout=0.5, socket_connect_timeout=0.5)
            if not isinstance(storage, Storage) or not storage.check():
                raise ConnectionError("storage did not answer")
        except Exception:  # noqa: BLE001 - any failure means "use memory"
            log.warning("rate-limit storage unreachable; limiting in memory instead")
            return None
        return SlidingWindowCounterRateLimiter(storage)

    def hit(self, name: str, *keys: str) -> None:
        """Count one event against `name` for each key; raise RateLimited past the limit."""
        item = self.limits[name]
        for key in keys:
            if not self._call("hit", item, name, key):
                raise RateLimited(
                    "too many requests; slow down", retry_after=self.retry_after(name, key)
                )

    def exceeded(self, name: str, key: str) -> bool:
        """True when `key` has no budget left under `name` (without counting)."""
        return not self._call("test", self.limits[name], name, key)

    def retry_after(self, name: str, key: str) -> int:
        """Seconds until `key` may try again under `name`."""
        item = self.limits[name]
        try:
            stats = self._strategy().get_window_stats(item, name, key)
            return max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:  # noqa: BLE001
            return int(item.get_expiry())

    def _strategy(self) -> SlidingWindowCounterRateLimiter:
        return self._shared or self._memory

    def _call(self, method: str, item: RateLimitItem, name: str, key: str) -> bool:
        strategy = self._strategy()
        try:
            return bool(getattr(strategy, method)(item, name, key))
        except Exception:  # noqa: BLE001
            if strategy is self._memory:
                raise
            # Redis went away mid-flight: keep limiting, per process.
            log.warning("rate-limit storage failed; limiting in memory instead")
            self._shared = None
            return bool(getattr(self._memory, method)(item, name, key))


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[str]
) -> str | None:
    """The caller's address: X-Forwarded-For is believed only when the peer is a trusted proxy.

    Walks the X-Forwarded-For chain from the right, skipping trusted proxies,
    and returns the first address that is not one of ours.
    """
    if peer is None or not forwarded_for or not trusted:
        return peer
    networks = [ipaddress.ip_network(net, strict=False) for net in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks)

    if not is_trusted(peer):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
        if not is_trusted(hop):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer
            return hop
    return peer
