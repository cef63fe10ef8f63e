"""The Vault gateway: the one object through which the broker talks to Vault.

It owns the hvac clients (one per configured address, over one keep-alive
connection pool, `broker.vault.transport`, which also stamps the audited
request headers), authentication (token or AppRole, renewed before expiry),
retries across nodes, and the translation of every hvac error into a broker
error. Nothing outside `broker.vault` sees an hvac type.

Several addresses (a raft cluster). Every call (reads, writes, wraps) goes to
the *active* node, found with `sys/health` (200 active, 429 standby, 503
sealed) and cached until a call to it fails transiently. Why not standbys:

- reads: an OpenBao standby serves reads from its own copy, which can lag the
  write the broker just made (unless the server runs with
  `disable_standby_reads`); the active node never does;
- wraps: `sys/wrapping/wrap` on a standby answers 500;
- writes: a standby forwards them, but once the leader dies it answers 307 to
  the dead leader's address until the election completes. 3xx are never
  followed (the transport has no redirects) and become `StandbyRedirect`.

A transient failure (connection error, 3xx, 5xx, 429, no active node) drops
the cached node, finds the active one again and retries with tenacity inside a
short budget (`retry_budget_s`); after that the caller gets `VaultUnavailable`
(503 with Retry-After) instead of hanging through a whole election.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.exceptions
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from broker.core import context
from broker.core.config import Settings
from broker.core.errors import BrokerError, Conflict
from broker.vault.errors import (
    TRANSIENT_TRANSPORT,
    InvalidHeader,
    NoActiveNode,
    VaultMisconfigured,
    VaultUnavailable,
    WriteOutcomeUnknown,
    is_transient,
    may_have_applied,
    translate,
)
from broker.vault.transport import ConnectionPool, PooledAdapter, attempt_timeout

log = logging.getLogger(__name__)
T = TypeVar("T")

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

# After a search finds no active node, calls fail fast for this long instead of each
# probing every node again (they back off and retry within their own budget).
_NO_ACTIVE_GRACE_S = 0.1
_HEALTH_ACTIVE = 200


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


@dataclass(frozen=True)
class KvEntry:
    """One version of a KV v2 secret."""

    data: dict[str, Any]
    version: int


@dataclass(frozen=True)
class WrappedSecret:
    """A response-wrapping token and its metadata. The token is single-use."""

    token: str
    accessor: str
    ttl: int
    creation_time: str
    creation_path: str

    def __repr__(self) -> str:
        return f"WrappedSecret(accessor={self.accessor!r}, ttl={self.ttl})"


class BudgetSpent(Exception):
    """The request's Vault time budget ran out before this call could be tried again."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


VaultObserver = Callable[[str, str, float, str | None], None]


def _ignore(operation: str, node: str, seconds: float, error: str | None) -> None:
    return None


class VaultGateway:
    """Typed KV v2, Transit and wrapping operations with retries and audited headers."""

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
        if not addrs:
            raise ValueError("at least one Vault address is required")
        if token is None and not (role_id and secret_id):
            raise ValueError("Vault auth needs a token or an AppRole role_id and secret_id")
        self.addrs = list(addrs)
        # Told of every attempt: (operation, node, seconds, error class or None). The app
        # that serves this gateway points it at its metrics.
        self.observe: VaultObserver = _ignore
        self.kv_mount = kv_mount
        self.transit_mount = transit_mount
        self.retry_after_s = retry_after_s
        self._retry_budget_s = retry_budget_s
        self._static_token = token
        self._role_id = role_id
        self._secret_id = secret_id
        self._approle_mount = approle_mount
        self._token: str | None = token
        self._token_expires_at: float | None = None
        self._auth_lock = threading.Lock()
        # Index of the node calls go to: the active node once found. With one address
        # there is nothing to find (it may be a load balancer in front of a cluster).
        self._current = 0
        self._active_known = len(self.addrs) == 1
        self._discovery_lock = threading.Lock()
        self._no_active_until = 0.0
        self._timeout_s = timeout_s
        self._probe_timeout_s = min(timeout_s, 2.0)
        self._probes: ThreadPoolExecutor | None = None
        # One keep-alive pool for every node, with a connection per worker thread.
        self._pool = ConnectionPool(verify=verify, timeout_s=timeout_s, maxsize=pool_size)
        self._clients = [
            hvac.Client(
                url=addr,
                token=token,
                namespace=namespace,
                adapter=PooledAdapter,
                pool=self._pool,
                headers_for_call=audit_headers,
            )
            for addr in self.addrs
        ]

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

    def close(self) -> None:
        """Close the pooled connections."""
        with self._discovery_lock:
            probes, self._probes = self._probes, None
        if probes is not None:
            probes.shutdown(wait=True, cancel_futures=True)
        self._pool.close()

    # -- plumbing -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """The node the next call goes to first (the active node, once found)."""
        return self.addrs[self._current]

    def _client_at(self, index: int) -> hvac.Client:
        client = self._clients[index]
        client.token = self._ensure_token(client)
        return client

    # -- finding the active node ---------------------------------------------------------

    def _target(self, left_s: float) -> int:
        """The index of the node to call: the cached active node, or a fresh search."""
        if self._active_known:
            return self._current
        with self._discovery_lock:
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

    def _forget(self, index: int) -> None:
        """A call to node `index` failed transiently: search again before the next call."""
        if len(self.addrs) > 1 and self._current == index:
            self._active_known = False

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

    def _ensure_token(self, client: hvac.Client) -> str:
        if self._static_token is not None:
            return self._static_token
        with self._auth_lock:
            # Log in again when a third of the TTL is left, so a long request
            # never starts with a token about to expire.
            fresh = self._token_expires_at is None or time.monotonic() < self._token_expires_at
            if self._token is None or not fresh:
                self._approle_login(client)
            assert self._token is not None
            return self._token

    def _approle_login(self, client: hvac.Client) -> None:
        try:
            result = client.auth.approle.login(
                role_id=self._role_id,
                secret_id=self._secret_id,
                mount_point=self._approle_mount,
                use_token=False,
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise VaultMisconfigured("Vault refused the broker's AppRole login") from exc
        auth = result["auth"]
        self._token = auth["client_token"]
        ttl = int(auth.get("lease_duration") or 0)
        self._token_expires_at = time.monotonic() + ttl * 2 / 3 if ttl else None
        log.info("logged in to Vault with AppRole", extra={"fields": {"ttl_s": ttl}})

    def call(self, operation: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run `fn` against the active node, retrying transient failures across nodes.

        The retry budget is short on purpose: an API caller would rather get a
        503 with Retry-After in a few seconds than hang through an election.
        Within an API request the budget covers all of the request's Vault calls
        together (`context.vault_deadline`), and no attempt waits on a socket
        past it, so a hung Vault costs a request one budget, whatever it calls.
        """
        deadline = context.vault_deadline(self._retry_budget_s)
        retrying = Retrying(
            stop=stop_after_attempt(max(3, 4 * len(self.addrs)))
            | stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
        reauthenticated = False
        while True:
            try:
                for attempt in retrying:
                    with attempt:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise BudgetSpent(f"Vault did not answer in time ({operation})")
                        index = self._target(left)
                        started = time.perf_counter()
                        try:
                            with attempt_timeout(min(self._timeout_s, left)):
                                result = fn(self._client_at(index))
                        except Exception as exc:
                            self.observe(
                                operation,
                                self.addrs[index],
                                time.perf_counter() - started,
                                type(exc).__name__,
                            )
                            if is_transient(exc):
                                self._forget(index)
                            raise
                        self.observe(
                            operation, self.addrs[index], time.perf_counter() - started, None
                        )
                        return result
            except BudgetSpent as exc:
                raise VaultUnavailable(str(exc), retry_after=self.retry_after_s) from None
            except hvac.exceptions.Forbidden as exc:
                # An AppRole token may have been revoked or expired early:
                # log in once more before calling it a misconfiguration.
                if self._static_token is None and not reauthenticated:
                    reauthenticated = True
                    self._token_expires_at = 0.0
                    continue
                raise translate(exc, operation=operation) from None
            except (
                hvac.exceptions.VaultError,
                NoActiveNode,
                InvalidHeader,
                *TRANSIENT_TRANSPORT,
            ) as exc:
                error = translate(exc, operation=operation)
                if isinstance(error, VaultUnavailable):
                    error.retry_after = self.retry_after_s
                raise error from None
            except RetryError as exc:  # pragma: no cover - reraise=True makes this rare
                raise VaultUnavailable(
                    f"Vault is unavailable ({operation})", retry_after=self.retry_after_s
                ) from exc
            raise AssertionError("unreachable")  # pragma: no cover

    # -- health -------------------------------------------------------------------

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

    # -- KV v2 --------------------------------------------------------------------

    def kv_read(self, path: str, *, version: int | None = None) -> KvEntry | None:
        """Read a KV v2 secret (latest or a given version); None when absent or deleted."""

        return self.call("read a secret", lambda client: self._kv_version(client, path, version))

    def _kv_version(self, client: hvac.Client, path: str, version: int | None) -> KvEntry | None:
        try:
            result = client.secrets.kv.v2.read_secret_version(
                path=path,
                version=version,
                mount_point=self.kv_mount,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            return None
        data = result["data"]
        return KvEntry(data=data["data"] or {}, version=int(data["metadata"]["version"]))

    def kv_write(self, path: str, data: Mapping[str, Any], *, cas: int | None) -> int:
        """Write a KV v2 secret with check-and-set; `cas=0` means "must not exist yet".

        A retried write is checked rather than trusted blindly: when an attempt failed
        in a way that may have reached Vault (the leader died after committing, before
        answering) and the retry then fails check-and-set, the version it would have
        created is read back; if it holds exactly this data, that write was ours and
        its version is returned instead of a false conflict.

        Raises `WriteOutcomeUnknown` when no attempt was answered and one may still
        be applied (a timeout, a cut connection, a 500 from a raft commit).
        """
        attempts = 0

        def write(client: hvac.Client) -> int:
            nonlocal attempts
            attempts += 1
            try:
                result = client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=dict(data), cas=cas, mount_point=self.kv_mount
                )
            except hvac.exceptions.InvalidRequest as exc:
                if attempts > 1 and cas is not None and "check-and-set" in str(exc):
                    if self._kv_holds(client, path, cas + 1, data):
                        log.info("a retried Vault write had already landed")
                        return cas + 1
                raise
            return int(result["data"]["version"])

        return self._write_call("write a secret", write)

    def _write_call(self, operation: str, fn: Callable[[hvac.Client], T]) -> T:
        """`call` for a write: an attempt sent but never answered makes the outcome unknown."""
        sent = False

        def attempt(client: hvac.Client) -> T:
            nonlocal sent
            try:
                return fn(client)
            except Exception as exc:
                sent = sent or may_have_applied(exc)
                raise

        try:
            return self.call(operation, attempt)
        except Conflict:
            raise  # check-and-set refused: nothing based on this version can land now
        except BrokerError:
            # Whatever the last attempt said, an earlier one that went unanswered may land.
            if sent:
                raise WriteOutcomeUnknown(
                    f"Vault did not confirm the write ({operation}); it may still be applied",
                    retry_after=self.retry_after_s,
                ) from None
            raise

    def _kv_holds(
        self, client: hvac.Client, path: str, version: int, data: Mapping[str, Any]
    ) -> bool:
        """True when KV `path` at `version` holds exactly `data` (JSON-equal)."""
        entry = self._kv_version(client, path, version)
        return entry is not None and entry.data == json.loads(json.dumps(dict(data)))

    def kv_metadata(self, path: str) -> dict[str, Any] | None:
        """The metadata of a KV v2 secret (versions, current_version), or None."""

        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                result = client.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self.kv_mount
                )
            except hvac.exceptions.InvalidPath:
                return None
            return dict(result["data"])

        return self.call("read secret metadata", read)

    def kv_list(self, path: str) -> list[str]:
        """Keys directly under a KV v2 folder (names ending in / are folders)."""

        def list_keys(client: hvac.Client) -> list[str]:
            try:
                result = client.secrets.kv.v2.list_secrets(path=path, mount_point=self.kv_mount)
            except hvac.exceptions.InvalidPath:
                return []
            return list(result["data"]["keys"])

        return self.call("list secrets", list_keys)

    def kv_delete_versions(self, path: str, versions: list[int]) -> None:
        """Delete the given versions (restorable with undelete); deleting twice is harmless.

        Naming versions, unlike "delete the latest", means a delete that Vault
        applies late can never remove a version written after it was sent.
        """
        self._write_call(
            "delete a secret",
            lambda client: client.secrets.kv.v2.delete_secret_versions(
                path=path, versions=versions, mount_point=self.kv_mount
            ),
        )

    def kv_destroy(self, path: str) -> None:
        """Destroy every version and the metadata of a KV v2 secret."""
        self.call(
            "destroy a secret",
            lambda client: client.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self.kv_mount
            ),
        )

    # -- Transit ------------------------------------------------------------------

    def transit_ensure_key(self, name: str) -> bool:
        """Create a derived aes256-gcm96 key unless it exists. True when created."""

        def ensure(client: hvac.Client) -> bool:
            try:
                client.secrets.transit.read_key(name=name, mount_point=self.transit_mount)
                return False
            except hvac.exceptions.InvalidPath:
                pass
            # derived=True: every encryption must name a context, and the key
            # used is derived from it, so a ciphertext only decrypts under the
            # tenant/provider it was written for.
            client.secrets.transit.create_key(
                name=name, key_type="aes256-gcm96", derived=True, mount_point=self.transit_mount
            )
            return True

        return self.call("create an encryption key", ensure)

    def transit_key_info(self, name: str) -> dict[str, Any] | None:
        """Latest and minimum decryption versions of a key, or None if it is gone."""

        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                result = client.secrets.transit.read_key(name=name, mount_point=self.transit_mount)
            except hvac.exceptions.InvalidPath:
                return None
            return dict(result["data"])

        return self.call("read an encryption key", read)

    def transit_encrypt(self, key: str, plaintext: bytes, *, context: str) -> str:
        """Encrypt under `key`, bound to `context`; returns `vault:vN:...`."""

        def encrypt(client: hvac.Client) -> str:
            result = client.secrets.transit.encrypt_data(
                name=key,
                plaintext=_b64(plaintext),
                context=_b64(context.encode()),
                mount_point=self.transit_mount,
            )
            return str(result["data"]["ciphertext"])

        return self.call("encrypt", encrypt)

    def transit_decrypt(self, key: str, ciphertext: str, *, context: str) -> bytes:
        """Decrypt a ciphertext written for `context`; fails for any other context."""

        def decrypt(client: hvac.Client) -> bytes:
            result = client.secrets.transit.decrypt_data(
                name=key,
                ciphertext=ciphertext,
                context=_b64(context.encode()),
                mount_point=self.transit_mount,
            )
            return base64.b64decode(result["data"]["plaintext"])

        return self.call("decrypt", decrypt)

    def transit_rotate(self, key: str) -> int:
        """Rotate a key; returns its new latest version."""

        def rotate(client: hvac.Client) -> int:
            data = client.secrets.transit.rotate_key(name=key, mount_point=self.transit_mount)
            # OpenBao answers with the key's new state; read it only where it does not.
            if not isinstance(data, dict) or "latest_version" not in (data.get("data") or {}):
                data = client.secrets.transit.read_key(name=key, mount_point=self.transit_mount)
            return int(data["data"]["latest_version"])

        return self.call("rotate an encryption key", rotate)

    def transit_rewrap(self, key: str, items: list[tuple[str, str]]) -> list[str]:
        """Rewrap (ciphertext, context) pairs to the latest key version in one batch call."""
        if not items:
            return []

        def rewrap(client: hvac.Client) -> list[str]:
            batch = [{"ciphertext": ct, "context": _b64(ctx.encode())} for ct, ctx in items]
            result = client.secrets.transit.rewrap_data(
                name=key, ciphertext="", batch_input=batch, mount_point=self.transit_mount
            )
            out = []
            for entry in result["data"]["batch_results"]:
                if entry.get("error"):
                    raise BrokerError("rewrap failed for one ciphertext")
                out.append(str(entry["ciphertext"]))
            return out

        return self.call("rewrap ciphertexts", rewrap)

    def transit_set_min_decryption_version(self, key: str, version: int) -> None:
        """Refuse ciphertexts older than `version` from now on."""
        self.call(
            "configure an encryption key",
            lambda client: client.secrets.transit.update_key_configuration(
                name=key, min_decryption_version=version, mount_point=self.transit_mount
            ),
        )

    def transit_delete_key(self, key: str) -> None:
        """Delete a key for good (crypto-shredding); a missing key is fine."""

        def delete(client: hvac.Client) -> None:
            try:
                client.secrets.transit.update_key_configuration(
                    name=key, deletion_allowed=True, mount_point=self.transit_mount
                )
            except hvac.exceptions.InvalidPath:
                return
            except hvac.exceptions.InvalidRequest as exc:
                if "no existing key" in str(exc) or "not found" in str(exc):
                    return
                raise
            try:
                client.secrets.transit.delete_key(name=key, mount_point=self.transit_mount)
            except hvac.exceptions.InvalidPath:
                return
            except hvac.exceptions.InvalidRequest as exc:
                # A concurrent deletion of the same tenant got there first.
                if "not found" in str(exc):
                    return
                raise

        self.call("delete an encryption key", delete)

    # -- response wrapping --------------------------------------------------------

    def wrap(self, payload: Mapping[str, Any], *, ttl: str) -> WrappedSecret:
        """Wrap `payload` in a single-use token valid for `ttl`."""

        def wrap(client: hvac.Client) -> WrappedSecret:
            info = client.sys.wrap(payload=dict(payload), ttl=ttl)["wrap_info"]  # type: ignore[arg-type]
            return WrappedSecret(
                token=info["token"],
                accessor=info["accessor"],
                ttl=int(info["ttl"]),
                creation_time=info["creation_time"],
                creation_path=info["creation_path"],
            )

        return self.call("wrap a response", wrap)

    def audit_hash(self, device: str, value: str) -> str:
        """HMAC `value` the way audit device `device` writes it to its log."""

        def audit_hash(client: hvac.Client) -> str:
            response = client.adapter.post(f"/v1/sys/audit-hash/{device}", json={"input": value})
            return str(response["data"]["hash"] if "data" in response else response["hash"])

        return self.call("hash a value for the audit log", audit_hash)

    def raw(self) -> hvac.Client:
        """The active node's hvac client, for bootstrap code inside `broker.vault` only.

        Finding the active node is retried like any call; raises VaultUnavailable when
        there is none within the budget.
        """
        return self.call("find the active Vault node", lambda client: client)
