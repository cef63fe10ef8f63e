"""Which Vault node to call: the active one of the configured addresses, and their health.

Every call (reads, writes, wraps) goes to the *active* node, found with `sys/health`
(200 active, 429 standby, 503 sealed) and cached until a call to it fails transiently.
Why not standbys:

- reads: an OpenBao standby serves reads from its own copy, which can lag the
  write the broker just made (unless the server runs with
  `disable_standby_reads`); the active node never does;
- wraps: `sys/wrapping/wrap` on a standby answers 500;
- writes: a standby forwards them, but once the leader dies it answers 307 to
  the dead leader's address until the election completes. 3xx are never
  followed (the transport has no redirects) and become `StandbyRedirect`.

With one address there is nothing to find (it may be a load balancer in front of a
cluster): that address is always the one called.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from broker.vault.errors import TRANSIENT_TRANSPORT, NoActiveNode
from broker.vault.transport import ConnectionPool

log = logging.getLogger(__name__)

# After a search finds no active node, calls fail fast for this long instead of each
# probing every node again (they back off and retry within their own budget).
_NO_ACTIVE_GRACE_S = 0.1
_HEALTH_ACTIVE = 200


@dataclass(frozen=True)
class VaultHealth:
    """What `sys/health` said about the node that answered."""

    reachable: bool
    initialized: bool = False
    sealed: bool = True
    standby: bool = False
    version: str | None = None
    address: str | None = None

    @property
    def ready(self) -> bool:
        """Reachable, initialised and unsealed."""
        return self.reachable and self.initialized and not self.sealed


class Nodes:
    """The configured Vault addresses, and which of them is the active node."""

    def __init__(self, addrs: list[str], pool: ConnectionPool, *, probe_timeout_s: float) -> None:
        if not addrs:
            raise ValueError("at least one Vault address is required")
        self.addrs = list(addrs)
        self._pool = pool
        self._probe_timeout_s = probe_timeout_s
        # Index of the node calls go to: the active node once found.
        self._current = 0
        self._active_known = len(self.addrs) == 1
        self._lock = threading.Lock()
        self._no_active_until = 0.0
        self._probes: ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        """The node the next call goes to first (the active node, once found)."""
        return self.addrs[self._current]

    def target(self, left_s: float) -> int:
        """The index of the node to call: the cached active node, or a fresh search."""
        if self._active_known:
            return self._current
        with self._lock:
            if self._active_known:  # another thread found it while we waited
                return self._current
            if time.monotonic() < self._no_active_until:
                raise NoActiveNode("no active Vault node (searched moments ago)")
            index = self._find_active(min(self._probe_timeout_s, left_s))
            if index is None:
                self._no_active_until = time.monotonic() + _NO_ACTIVE_GRACE_S
                raise NoActiveNode("no configured Vault address is the active node")
            if index != self._current:
                log.info(
                    "Vault active node found",
                    extra={"fields": {"address": self.addrs[index]}},
                )
            self._current = index
            self._active_known = True
            return index

    def known(self) -> int | None:
        """The index of the active node when it is known (never searches), else None."""
        return self._current if self._active_known else None

    def forget(self, index: int) -> None:
        """A call to node `index` failed transiently: search again before the next call."""
        if len(self.addrs) > 1 and self._current == index:
            self._active_known = False

    def health(self) -> VaultHealth:
        """Ask each node in turn for `sys/health`; report the first that answers."""
        for addr in self.addrs:
            try:
                # sys/health needs no token and answers non-2xx by design
                # (503 sealed, 429 standby...), so it bypasses hvac's error mapping.
                response = self._pool.request(
                    "GET", f"{addr}/v1/sys/health?standbyok=true&perfstandbyok=true"
                )
                body = json.loads(response.data)
            except (*TRANSIENT_TRANSPORT, ValueError):
                continue
            return VaultHealth(
                reachable=True,
                initialized=bool(body.get("initialized")),
                sealed=bool(body.get("sealed", True)),
                standby=bool(body.get("standby")),
                version=body.get("version"),
                address=addr,
            )
        return VaultHealth(reachable=False)

    def close(self) -> None:
        """Stop the probe threads."""
        with self._lock:
            probes, self._probes = self._probes, None
        if probes is not None:
            probes.shutdown(wait=True, cancel_futures=True)

    def _find_active(self, timeout_s: float) -> int | None:
        """Ask every node's `sys/health` at once; the first (by order) answering 200 wins.

        In parallel, so one node that hangs (rather than refusing) costs one probe
        timeout, not one per node. The last known node is listed first.
        """
        if self._probes is None:
            self._probes = ThreadPoolExecutor(
                max_workers=len(self.addrs), thread_name_prefix="vault-probe"
            )
        order = [self._current] + [i for i in range(len(self.addrs)) if i != self._current]
        probe = functools.partial(self._is_active, timeout_s=timeout_s)
        for index, active in zip(order, self._probes.map(probe, order), strict=True):
            if active:
                return index
        return None

    def _is_active(self, index: int, *, timeout_s: float) -> bool:
        try:
            # No standbyok: only the active node answers 200 (429 standby, 503 sealed,
            # 501 not initialised, 472/473 DR/performance standby).
            response = self._pool.request(
                "GET", f"{self.addrs[index]}/v1/sys/health", timeout_s=timeout_s
            )
        except (*TRANSIENT_TRANSPORT, ValueError):
            return False
        return response.status == _HEALTH_ACTIVE
