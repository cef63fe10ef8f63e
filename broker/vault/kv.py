"""KV version 2 operations, over the gateway's `call`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import hvac
import hvac.exceptions
from hvac.utils import format_url

from broker.core.errors import BrokerError, Conflict, NotFound
from broker.vault.errors import WriteOutcomeUnknown, may_have_applied

if TYPE_CHECKING:
    from broker.vault.gateway import VaultGateway

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class KvEntry:
    """One version of a KV v2 secret."""

    data: dict[str, Any]
    version: int


class Kv:
    """The KV v2 engine mounted at `mount`."""

    def __init__(self, vault: VaultGateway, mount: str) -> None:
        self._vault = vault
        self.mount = mount

    def read(self, path: str, *, version: int | None = None) -> KvEntry | None:
        """Read a KV v2 secret (latest or a given version); None when absent or deleted."""
        return self._vault.call(
            "read a secret", lambda client: self._version(client, path, version)
        )

    async def read_on_loop(self, path: str, *, threads: anyio.CapacityLimiter) -> KvEntry | None:
        """`read` (the latest version), on the event loop when it can be (`call_on_loop`)."""
        url = format_url("/v1/{mount}/data/{path}", mount=self.mount, path=path)
        try:
            return await self._vault.call_on_loop(
                "read a secret",
                ("GET", url, None),
                parse=_entry,
                fallback=lambda: self.read(path),
                threads=threads,
            )
        except NotFound:  # a 404: absent, or its latest version deleted
            return None

    def write(
        self, path: str, data: Mapping[str, Any], *, cas: int | None, tried: bool = False
    ) -> int:
        """Write a KV v2 secret with check-and-set; `cas=0` means "must not exist yet".

        A retried write is checked rather than trusted blindly: when an attempt failed
        in a way that may have reached Vault (the leader died after committing, before
        answering) and the retry then fails check-and-set, the version it would have
        created is read back; if it holds exactly this data, that write was ours and
        its version is returned instead of a false conflict. `tried` says an attempt
        made elsewhere (on the event loop, `write_on_loop`) may already have landed.

        Raises `WriteOutcomeUnknown` when no attempt was answered and one may still
        be applied (a timeout, a cut connection, a 500 from a raft commit).
        """
        attempts = int(tried)

        def write(client: hvac.Client) -> int:
            nonlocal attempts
            attempts += 1
            try:
                result = client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=dict(data), cas=cas, mount_point=self.mount
                )
            except hvac.exceptions.InvalidRequest as exc:
                if attempts > 1 and cas is not None and "check-and-set" in str(exc):
                    if self._holds(client, path, cas + 1, data):
                        log.info("a retried Vault write had already landed")
                        return cas + 1
                raise
            return int(result["data"]["version"])

        return self._write_call("write a secret", write, sent=tried)

    async def write_on_loop(
        self,
        path: str,
        data: Mapping[str, Any],
        *,
        cas: int,
        threads: anyio.CapacityLimiter,
    ) -> int:
        """`write` with check-and-set, on the event loop when it can be (`call_on_loop`).

        A refused check-and-set is a definite answer (`Conflict`). Anything indefinite
        goes on to `write` as a retry of an attempt that may have landed: a check-and-set
        refusal is then checked against what Vault holds, and no answer at all is
        `WriteOutcomeUnknown`.
        """
        url = format_url("/v1/{mount}/data/{path}", mount=self.mount, path=path)
        payload = {"options": {"cas": cas}, "data": dict(data)}
        return await self._vault.call_on_loop(
            "write a secret",
            ("POST", url, payload),
            parse=lambda result: int(result["data"]["version"]),
            fallback=lambda: self.write(path, data, cas=cas, tried=True),
            threads=threads,
        )

    def metadata(self, path: str) -> dict[str, Any] | None:
        """The metadata of a KV v2 secret (versions, current_version), or None."""

        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                result = client.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self.mount
                )
            except hvac.exceptions.InvalidPath:
                return None
            return dict(result["data"])

        return self._vault.call("read secret metadata", read)

    def keys(self, path: str) -> list[str]:
        """Keys directly under a KV v2 folder (names ending in / are folders)."""

        def list_keys(client: hvac.Client) -> list[str]:
            try:
                result = client.secrets.kv.v2.list_secrets(path=path, mount_point=self.mount)
            except hvac.exceptions.InvalidPath:
                return []
            return list(result["data"]["keys"])

        return self._vault.call("list secrets", list_keys)

    async def keys_on_loop(self, path: str, *, threads: anyio.CapacityLimiter) -> list[str]:
        """`keys`, on the event loop when it can be (`call_on_loop`)."""
        url = format_url("/v1/{mount}/metadata/{path}", mount=self.mount, path=path)
        try:
            return await self._vault.call_on_loop(
                "list secrets",
                ("GET", f"{url}?list=true", None),
                parse=lambda result: list(result["data"]["keys"]),
                fallback=lambda: self.keys(path),
                threads=threads,
            )
        except NotFound:  # a 404: nothing under that folder
            return []

    def delete_versions(self, path: str, versions: list[int]) -> None:
        """Delete the given versions (restorable with undelete); deleting twice is harmless.

        Naming versions, unlike "delete the latest", means a delete that Vault
        applies late can never remove a version written after it was sent.
        """
        self._write_call(
            "delete a secret",
            lambda client: client.secrets.kv.v2.delete_secret_versions(
                path=path, versions=versions, mount_point=self.mount
            ),
        )

    def destroy(self, path: str) -> None:
        """Destroy every version and the metadata of a KV v2 secret."""
        self._vault.call(
            "destroy a secret",
            lambda client: client.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self.mount
            ),
        )

    def _version(self, client: hvac.Client, path: str, version: int | None) -> KvEntry | None:
        try:
            result = client.secrets.kv.v2.read_secret_version(
                path=path,
                version=version,
                mount_point=self.mount,
                raise_on_deleted_version=True,
            )
        except hvac.exceptions.InvalidPath:
            return None
        return _entry(result)

    def _holds(self, client: hvac.Client, path: str, version: int, data: Mapping[str, Any]) -> bool:
        """True when KV `path` at `version` holds exactly `data` (JSON-equal)."""
        entry = self._version(client, path, version)
        return entry is not None and entry.data == json.loads(json.dumps(dict(data)))

    def _write_call(
        self, operation: str, fn: Callable[[hvac.Client], T], *, sent: bool = False
    ) -> T:
        """`call` for a write: an attempt sent but never answered (here, or before the
        call when `sent`) makes the outcome unknown."""

        def attempt(client: hvac.Client) -> T:
            nonlocal sent
            try:
                return fn(client)
            except Exception as exc:
                sent = sent or may_have_applied(exc)
                raise

        try:
            return self._vault.call(operation, attempt)
        except Conflict:
            raise  # check-and-set refused: nothing based on this version can land now
        except BrokerError:
            # Whatever the last attempt said, an earlier one that went unanswered may land.
            if sent:
                raise WriteOutcomeUnknown(
                    f"Vault did not confirm the write ({operation}); it may still be applied",
                    retry_after=self._vault.retry_after_s,
                ) from None
            raise


def _entry(result: dict[str, Any]) -> KvEntry:
    """The entry in Vault's answer to a KV v2 read."""
    data = result["data"]
    return KvEntry(data=data["data"] or {}, version=int(data["metadata"]["version"]))
