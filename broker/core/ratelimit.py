"""Rate limits, keyed by principal and tenant, and by address: sliding-window counters.

Counters live in this process by default (`LocalWindows`). With
`BROKER_RATE_LIMIT_STORAGE=redis://...` several broker processes share them
through the `limits` library; if Redis cannot be reached the limiter falls back
to the local counters rather than stop limiting, says so (`degraded`), and
returns to the shared counters once Redis answers again.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from limits import RateLimitItem, WindowStats, parse
from limits.storage import Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from broker.core.errors import RateLimited

log = logging.getLogger(__name__)


class _Strategy(Protocol):
    def hit(self, item: RateLimitItem, *identifiers: str) -> bool: ...
    def test(self, item: RateLimitItem, *identifiers: str) -> bool: ...
    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats: ...


@dataclass(slots=True)
class _Window:
    index: int  # which window of `period` seconds since the epoch `current` counts
    previous: int
    current: int
    period: int


class LocalWindows:
    """Sliding-window counters in this process: O(1) per hit, no background thread.

    The count is the current window's hits plus the previous window's, weighted
    by how much of it still overlaps the last `period` seconds (the algorithm of
    `limits`' sliding-window counter, so both backends agree).

    Not `limits`' MemoryStorage: while traffic flows it starts a timer thread
    every 10 ms that walks every key it holds, and keys are per (principal,
    tenant), so with 50,000 keys that sweep alone took a third of a core and
    slowed every request. Here a key past both of its windows is dropped by a
    sweep that runs at most every `sweep_every_s`, inline, under the lock.
    """

    def __init__(
        self, *, sweep_every_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._sweep_every_s = sweep_every_s
        self._next_sweep = clock() + sweep_every_s

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        """Count one hit unless it would exceed the limit; True when counted."""
        key = item.key_for(*identifiers)
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            window = self._rolled(key, item, now)
            if self._weighted(window, now) + 1 > item.amount:
                return False
            window.current += 1
            return True

    def test(self, item: RateLimitItem, *identifiers: str) -> bool:
        """True when one more hit would be allowed (counts nothing)."""
        now = self._clock()
        with self._lock:
            window = self._peek(item.key_for(*identifiers), item, now)
        return window is None or self._weighted(window, now) + 1 <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """When the next hit will be allowed (reset_time), and how many remain now."""
        now = self._clock()
        with self._lock:
            window = self._peek(item.key_for(*identifiers), item, now)
        if window is None:
            return WindowStats(now, item.amount)
        weighted = self._weighted(window, now)
        remaining = max(0, item.amount - math.floor(weighted))
        if weighted + 1 <= item.amount:
            return WindowStats(now, remaining)
        return WindowStats(self._allowed_again(window, item.amount), remaining)

    def _peek(self, key: str, item: RateLimitItem, now: float) -> _Window | None:
        window = self._windows.get(key)
        if window is None:
            return None
        return self._roll(replace(window), now)  # a copy: looking counts nothing

    def _rolled(self, key: str, item: RateLimitItem, now: float) -> _Window:
        window = self._windows.get(key)
        if window is None:
            period = int(item.get_expiry())
            window = self._windows[key] = _Window(int(now // period), 0, 0, period)
            return window
        return self._roll(window, now)

    @staticmethod
    def _roll(window: _Window, now: float) -> _Window:
        """Move `window` forward to the window `now` falls in."""
        index = int(now // window.period)
        if index == window.index + 1:
            window.previous, window.current = window.current, 0
        elif index > window.index + 1:
            window.previous, window.current = 0, 0
        window.index = index
        return window

    @staticmethod
    def _weighted(window: _Window, now: float) -> float:
        into = now - window.index * window.period
        return window.previous * (window.period - into) / window.period + window.current

    @staticmethod
    def _allowed_again(window: _Window, limit: int) -> float:
        """The moment the weighted count first leaves room for one more hit."""
        start, period = window.index * window.period, window.period
        room = limit - 1 - window.current
        if room >= 0 and window.previous:
            # Within this window, once enough of the previous one has slid out.
            return start + period * (1 - room / window.previous)
        # Not before the next window; then this window's hits slide out in turn.
        if window.current == 0:
            return start + period
        return start + period + period * max(0.0, 1 - (limit - 1) / window.current)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every_s
        stale = [
            key
            for key, window in self._windows.items()
            if int(now // window.period) > window.index + 1
        ]
        for key in stale:
            del self._windows[key]


class RateLimiter:
    """Named limits (`fetch`, `write`, `auth_failures`, ...) over one storage, failing safe.

    With a shared storage (Redis), a failed call switches this process to its
    own counters rather than stop limiting, and `degraded` says so. While
    degraded, a background thread pings the storage at most every
    `reconnect_every_s`, never on the request's own time, and switches back to
    the shared counters once it answers.
    """

    def __init__(
        self, storage_uri: str, limits: dict[str, str], *, reconnect_every_s: float = 5.0
    ) -> None:
        self.limits: dict[str, RateLimitItem] = {name: parse(spec) for name, spec in limits.items()}
        # Sliding-window counters, not a moving window: a moving window keeps
        # every hit of every key, and keys are per (principal, tenant).
        self._memory = LocalWindows()
        # Told the limit's name at each rejection (/metrics counts them).
        self.on_rejected: Callable[[str], None] = lambda name: None
        self._shares = not storage_uri.startswith("memory://")
        self._storage: Storage | None = None
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._reconnect_every_s = reconnect_every_s
        self._next_reconnect = 0.0
        self._reconnecting = threading.Lock()
        if self._shares:
            self._storage = self._open(storage_uri)
            if self._storage is not None and self._answers(self._storage):
                self._shared = SlidingWindowCounterRateLimiter(self._storage)
            else:
                log.warning("rate-limit storage unreachable; limiting in memory instead")
                self._next_reconnect = time.monotonic() + reconnect_every_s

    @property
    def degraded(self) -> bool:
        """True while the shared storage is configured but unreachable: limits are per process."""
        if self._shares and self._shared is None:
            # Also a chance to reconnect, so a probe that only watches this
            # (/readyz, the metric) sees recovery even while no request is limited.
            self._reconnect_soon()
            return True
        return False

    @staticmethod
    def _open(uri: str) -> Storage | None:
        try:
            storage = storage_from_string(uri, socket_timeout=0.5, socket_connect_timeout=0.5)
        except Exception:  # noqa: BLE001 - a bad URI or a missing driver: stay degraded
            log.error("rate-limit storage cannot be configured; limiting in memory instead")
            return None
        return storage if isinstance(storage, Storage) else None

    @staticmethod
    def _answers(storage: Storage) -> bool:
        try:
            return bool(storage.check())
        except Exception:  # noqa: BLE001 - any failure means "not now"
            return False

    def hit(self, name: str, *keys: str) -> None:
        """Count one event against `name` for each key; raise RateLimited past the limit."""
        item = self.limits[name]
        for key in keys:
            if not self._call("hit", item, name, key):
                self.on_rejected(name)
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

    def _strategy(self) -> _Strategy:
        shared = self._shared
        if shared is None and self._shares:
            self._reconnect_soon()
        return shared or self._memory

    def _call(self, method: str, item: RateLimitItem, name: str, key: str) -> bool:
        strategy = self._strategy()
        try:
            return bool(getattr(strategy, method)(item, name, key))
        except Exception:  # noqa: BLE001
            if strategy is self._memory:
                raise
            # Redis went away mid-flight: keep limiting, per process, until it is back.
            log.warning("rate-limit storage failed; limiting in memory instead")
            self._shared = None
            self._next_reconnect = time.monotonic() + self._reconnect_every_s
            return bool(getattr(self._memory, method)(item, name, key))

    def _reconnect_soon(self) -> None:
        """Start one background ping of the storage, if one is due and none is running."""
        if self._storage is None or time.monotonic() < self._next_reconnect:
            return
        if not self._reconnecting.acquire(blocking=False):
            return
        self._next_reconnect = time.monotonic() + self._reconnect_every_s
        threading.Thread(
            target=self._reconnect, args=(self._storage,), name="ratelimit-reconnect", daemon=True
        ).start()

    def _reconnect(self, storage: Storage) -> None:
        try:
            if self._answers(storage):
                self._shared = SlidingWindowCounterRateLimiter(storage)
                log.warning("rate-limit storage reachable again; limits are shared again")
        finally:
            self._reconnecting.release()


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
