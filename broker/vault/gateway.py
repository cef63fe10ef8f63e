"""The Vault gateway: the one object through which the broker talks to Vault.

Laid out the way hvac separates its adapter from its API classes:

- this module is the core: it owns the hvac clients (one per configured address,
  over one keep-alive connection pool, `broker.vault.transport`, which also stamps
  the audited request headers), the broker's token (`broker.vault.login`), the
  choice of node (`broker.vault.nodes`) and `call`, which retries transient failures
  and turns every hvac or transport error into a broker error through the one table
  in `broker.vault.errors`;
- the operations sit on top, each a small class calling `call`: `gateway.kv`
  (`broker.vault.kv`), `gateway.transit`, `gateway.wrapping` and `gateway.audit`
  (audit-device hashes).

Nothing outside `broker.vault` sees an hvac type.

The credential fetch's two reads may also be made on the event loop
(`call_on_loop`, over `broker.vault.loop`): one attempt, with the same audited
headers, node, token and budget; anything but a definite answer goes on to `call`
in the Vault threads, so retries, failover and logging in again stay here, once.

A transient failure (connection error, 3xx, 5xx, 429, no active node) drops the
cached active node, finds the active one again and retries with tenacity inside a
short budget (`retry_budget_s`); after that the caller gets `VaultUnavailable`
(503 with Retry-After) instead of hanging through a whole election.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import hvac
import hvac.exceptions
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from broker.core import context
from broker.core.config import Settings
from broker.core.errors import BrokerError
from broker.vault.audit_hash import AuditDevices
from broker.vault.errors import (
    FAILURES,
    BudgetSpent,
    Failure,
    VaultUnavailable,
    failure,
    is_transient,
)
from broker.vault.kv import Kv
from broker.vault.login import Login
from broker.vault.loop import LoopClient
from broker.vault.nodes import Nodes, VaultHealth
from broker.vault.transit import Transit
from broker.vault.transport import ConnectionPool, PooledAdapter, attempt_timeout
from broker.vault.wrapping import Wrapping

T = TypeVar("T")
E = TypeVar("E")
R = TypeVar("R")

# Headers Vault is told to copy into its audit log (see bootstrap). They name
# the human or service behind each call the broker makes on their behalf.
AUDITED_HEADERS = (
    "X-Request-Id",
    "X-Broker-Actor",
    "X-Broker-Tenant",
    "X-Broker-Action",
    # Vault sees only the broker's address; this is where the caller came from.
    "X-Broker-Client-Addr",
)


def audit_headers() -> dict[str, str]:
    """The audited headers for the request being served (empty outside a request)."""
    ctx = context.current()
    if ctx is None:
        return {}
    values = {
        "X-Request-Id": ctx.request_id,
        "X-Broker-Actor": ctx.actor,
        "X-Broker-Tenant": ctx.tenant_id,
        "X-Broker-Action": ctx.action,
        "X-Broker-Client-Addr": ctx.client_addr,
    }
    return {name: value for name, value in values.items() if value}


VaultObserver = Callable[[str, str, float, str | None], None]


def _ignore(operation: str, node: str, seconds: float, error: str | None) -> None:
    return None


class VaultGateway:
    """Discovery, authentication and `call`; KV, Transit, wrapping and audit hashes on top."""

    def __init__(
        self,
        *,
        addrs: list[str],
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        approle_mount: str = "approle",
        namespace: str | None = None,
        verify: bool | str = True,
        timeout_s: float = 5.0,
        kv_mount: str = "secret",
        transit_mount: str = "transit",
        retry_after_s: int = 5,
        retry_budget_s: float = 3.0,
        pool_size: int = 48,
    ) -> None:
        # One keep-alive pool for every node, with a connection per worker thread.
        self._pool = ConnectionPool(verify=verify, timeout_s=timeout_s, maxsize=pool_size)
        self._pool_size = pool_size
        self._namespace = namespace
        # Keep-alive connections of the event loops serving this gateway (`serving_on_loop`).
        self._loop_clients: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._nodes = Nodes(addrs, self._pool, probe_timeout_s=min(timeout_s, 2.0))
        self._login = Login(token=token, role_id=role_id, secret_id=secret_id, mount=approle_mount)
        # Told of every attempt: (operation, node, seconds, error class or None). The app
        # that serves this gateway points it at its metrics.
        self.observe: VaultObserver = _ignore
        self.retry_after_s = retry_after_s
        self._retry_budget_s = retry_budget_s
        self._timeout_s = timeout_s
        self._clients = [
            hvac.Client(
                url=addr,
                token=token,
                namespace=namespace,
                adapter=PooledAdapter,
                pool=self._pool,
                headers_for_call=audit_headers,
            )
            for addr in self._nodes.addrs
        ]
        self.kv = Kv(self, kv_mount)
        self.transit = Transit(self, transit_mount)
        self.wrapping = Wrapping(self)
        self.audit = AuditDevices(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultGateway:
        """Build the gateway the configuration describes."""

        def reveal(secret: Any) -> str | None:
            return secret.get_secret_value() if secret is not None else None

        return cls(
            addrs=settings.vault_addrs,
            token=reveal(settings.vault_token),
            role_id=reveal(settings.vault_role_id),
            secret_id=reveal(settings.vault_secret_id),
            approle_mount=settings.vault_approle_mount,
            namespace=settings.vault_namespace,
            verify=str(settings.vault_ca_cert) if settings.vault_ca_cert else True,
            timeout_s=settings.vault_timeout_s,
            kv_mount=settings.kv_mount,
            transit_mount=settings.transit_mount,
            retry_after_s=settings.retry_after_s,
            # Read only if the configuration has it (BROKER_VAULT_RETRY_BUDGET_S).
            retry_budget_s=settings.vault_retry_budget_s,
        )

    def __repr__(self) -> str:
        return f"VaultGateway(addrs={self.addrs!r})"

    @property
    def addrs(self) -> list[str]:
        """The configured node addresses."""
        return self._nodes.addrs

    @property
    def address(self) -> str:
        """The node the next call goes to first (the active node, once found)."""
        return self._nodes.address

    def health(self) -> VaultHealth:
        """What the first node that answers says about itself (`sys/health`)."""
        return self._nodes.health()

    def close(self) -> None:
        """Stop the probe threads and close the pooled connections."""
        self._nodes.close()
        self._pool.close()

    # -- call ---------------------------------------------------------------------

    def call(self, operation: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run `fn` against the active node, retrying transient failures across nodes.

        The retry budget is short on purpose: an API caller would rather get a
        503 with Retry-After in a few seconds than hang through an election.
        Within an API request the budget covers all of the request's Vault calls
        together (`context.vault_deadline`), and no attempt waits on a socket
        past it, so a hung Vault costs a request one budget, whatever it calls.
        """
        deadline = context.vault_deadline(self._retry_budget_s)
        retrying = self._retrying(deadline)
        logged_in_again = False
        while True:
            try:
                return self._with_retries(retrying, operation, fn, deadline)
            except Exception as exc:
                if not logged_in_again and self._may_log_in_again(exc):
                    logged_in_again = True
                    continue
                kind = failure(exc)
                if kind is None:
                    raise  # not Vault's (a bug, or a broker error `fn` raised itself)
                raise self._broker_error(kind, exc, operation) from None

    def _retrying(self, deadline: float) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(max(3, 4 * len(self.addrs)))
            | stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )

    def _with_retries(
        self, retrying: Retrying, operation: str, fn: Callable[[hvac.Client], T], deadline: float
    ) -> T:
        for attempt in retrying:
            with attempt:
                return self._attempt(operation, fn, deadline)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _attempt(self, operation: str, fn: Callable[[hvac.Client], T], deadline: float) -> T:
        """One try on the node the call should go to, within what is left of the budget."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BudgetSpent(f"Vault did not answer in time ({operation})")
        index = self._nodes.target(left)
        started = time.perf_counter()
        try:
            with attempt_timeout(min(self._timeout_s, left)):
                result = fn(self._client_at(index))
        except Exception as exc:
            self._observed(operation, index, started, type(exc).__name__)
            if is_transient(exc):
                self._nodes.forget(index)
            raise
        self._observed(operation, index, started, None)
        return result

    def _observed(self, operation: str, index: int, started: float, error: str | None) -> None:
        self.observe(operation, self.addrs[index], time.perf_counter() - started, error)

    def _client_at(self, index: int) -> hvac.Client:
        client = self._clients[index]
        client.token = self._login.token(client)
        return client

    def _may_log_in_again(self, exc: Exception) -> bool:
        """A refused AppRole token may have been revoked or expired early: log in once
        more before calling it a misconfiguration."""
        if isinstance(exc, hvac.exceptions.Forbidden) and self._login.renewable:
            self._login.expire()
            return True
        return False

    def _broker_error(self, kind: Failure, exc: Exception, operation: str) -> BrokerError:
        error = kind.error(exc, operation)
        if isinstance(error, VaultUnavailable):
            error.retry_after = self.retry_after_s
        return error

    # -- calls on the event loop ------------------------------------------------------

    @asynccontextmanager
    async def serving_on_loop(self) -> AsyncIterator[None]:
        """Let `call_on_loop` use connections of the running loop until the block ends."""
        client = LoopClient(tls=self._pool.tls, maxsize=self._pool_size)
        self._loop_clients[client.loop] = client
        try:
            yield
        finally:
            if self._loop_clients.get(client.loop) is client:
                del self._loop_clients[client.loop]
            await client.close()

    def each_on_loop(
        self,
        step: Callable[[E, anyio.CapacityLimiter], Awaitable[R]],
        items: Sequence[E],
        *,
        at_once: int,
    ) -> list[R | Exception]:
        """`step(item, threads)` for each item, at most `at_once` at a time, on an event
        loop of its own serving this gateway (`serving_on_loop`); each item's result, or
        the exception it raised, in order.

        For batch work outside a request (a key rotation, a legacy migration): on the
        loop a Vault call costs the process far less than on a worker thread, and what
        the loop cannot settle in one attempt goes through the threaded `call`, on at
        most `at_once` threads.
        """
        return asyncio.run(self._each_on_loop(step, items, at_once))

    async def _each_on_loop(
        self,
        step: Callable[[E, anyio.CapacityLimiter], Awaitable[R]],
        items: Sequence[E],
        at_once: int,
    ) -> list[R | Exception]:
        threads = anyio.CapacityLimiter(at_once)
        slots = asyncio.Semaphore(at_once)

        async def one(item: E) -> R | Exception:
            async with slots:
                try:
                    return await step(item, threads)
                except Exception as exc:
                    return exc

        async with self.serving_on_loop():
            return await asyncio.gather(*(one(item) for item in items))

    async def call_on_loop(
        self,
        operation: str,
        request: tuple[str, str, dict[str, Any] | None],
        *,
        parse: Callable[[dict[str, Any]], T],
        fallback: Callable[[], T] | None,
        threads: anyio.CapacityLimiter,
    ) -> T:
        """`fallback()` (the same operation through `call`), made on the event loop if it can be.

        `request` is (method, path, JSON payload). One attempt, on the active node with
        the token already held, carrying the audited headers, within the request's Vault
        budget. A 200 is `parse`d; a 400 or 404 (answers no retry changes) raises the
        broker error the one table gives it. Anything else (no client on this loop, no
        known active node, a token due for renewal, a failed connection, a timeout, a
        3xx, 401, 403, 429 or 5xx) runs `fallback` on `threads`, which retries, fails
        over and logs in again within what is left of the same budget. Without a
        `fallback` (a call made on a guess, which must not hold a thread or retry) it
        raises `VaultUnavailable` instead.
        """
        try:
            answer = await self._attempt_on_loop(operation, *request)
            return parse(answer)
        except (_Indefinite, KeyError, TypeError, ValueError):
            if fallback is None:
                raise VaultUnavailable(f"Vault did not {operation} on the loop") from None
            return await anyio.to_thread.run_sync(fallback, limiter=threads)

    async def _attempt_on_loop(
        self, operation: str, method: str, path: str, payload: dict[str, Any] | None
    ) -> dict[str, Any]:
        client = self._loop_clients.get(asyncio.get_running_loop())
        index = self._nodes.known()
        token = self._login.current()
        left = context.vault_deadline(self._retry_budget_s) - time.monotonic()
        if client is None or index is None or token is None or left <= 0:
            raise _Indefinite
        headers = audit_headers()
        headers |= {"X-Vault-Request": "true", "X-Vault-Token": token}
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        body = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(payload).encode()
        url = self.addrs[index].rstrip("/") + path
        started = time.perf_counter()
        try:
            async with asyncio.timeout(min(self._timeout_s, left)):
                answer = await client.request(method, url, headers=headers, body=body)
        except Exception as exc:  # refused, reset, timed out, malformed, unsendable
            self._failed_on_loop(operation, index, started, exc)
            raise _Indefinite from None
        if answer.status == 200:
            self._observed(operation, index, started, None)
            return dict(json.loads(answer.data))
        refused = _vault_error(method, url, answer.status, answer.data)
        self._failed_on_loop(operation, index, started, refused)
        if answer.status not in _DEFINITE or is_transient(refused):
            raise _Indefinite
        raise self._broker_error(failure(refused) or FAILURES[-1], refused, operation) from None

    def _failed_on_loop(self, operation: str, index: int, started: float, exc: Exception) -> None:
        """As `_attempt` does for a failed try: measured, and a transient one forgets the node."""
        self._observed(operation, index, started, type(exc).__name__)
        if is_transient(exc):
            self._nodes.forget(index)

    def _raw(self) -> hvac.Client:
        """The active node's hvac client, for bootstrap code inside `broker.vault` only.

        Finding the active node is retried like any call; raises VaultUnavailable when
        there is none within the budget.
        """
        return self.call("find the active Vault node", lambda client: client)


class _Indefinite(Exception):
    """An attempt on the loop that the threaded `call` must make again (or could not start)."""


# Answers that retrying on this or another node cannot change, unless the error table says
# otherwise of one (a KV mount starting up answers 400 for a moment).
_DEFINITE = (400, 404)


def _vault_error(method: str, url: str, status: int, data: bytes) -> hvac.exceptions.VaultError:
    """The hvac exception hvac's adapter raises for this answer (its `errors`, or its text)."""
    text = data.decode("utf-8", "replace")
    try:
        errors = json.loads(data).get("errors")
    except (ValueError, AttributeError):
        errors = None
    return hvac.exceptions.VaultError.from_status(
        status, None if errors is not None else text, errors=errors, method=method, url=url
    )
