"""Transit operations (derived keys, context-bound encryption), over the gateway's `call`."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import hvac
import hvac.exceptions
from hvac.utils import format_url

from broker.core.errors import BrokerError

if TYPE_CHECKING:
    from broker.vault.gateway import VaultGateway


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _plaintext(result: dict[str, Any]) -> bytes:
    """The plaintext in Vault's answer to a Transit decrypt."""
    return base64.b64decode(result["data"]["plaintext"])


class Transit:
    """The Transit engine mounted at `mount`."""

    def __init__(self, vault: VaultGateway, mount: str) -> None:
        self._vault = vault
        self.mount = mount

    def ensure_key(self, name: str) -> bool:
        """Create a derived aes256-gcm96 key unless it exists. True when created."""

        def ensure(client: hvac.Client) -> bool:
            try:
                client.secrets.transit.read_key(name=name, mount_point=self.mount)
                return False
            except hvac.exceptions.InvalidPath:
                pass
            self._create(client, name)
            return True

        return self._vault.call("create an encryption key", ensure)

    def create_key(self, name: str) -> None:
        """`ensure_key` in one call, for callers that need not know whether it existed:
        Vault's create leaves an existing key as it is."""
        self._vault.call("create an encryption key", lambda client: self._create(client, name))

    async def create_key_on_loop(self, name: str, *, threads: anyio.CapacityLimiter) -> None:
        """`create_key`, on the event loop when it can be (`call_on_loop`)."""
        url = format_url("/v1/{mount}/keys/{name}", mount=self.mount, name=name)
        await self._vault.call_on_loop(
            "create an encryption key",
            ("POST", url, {"type": "aes256-gcm96", "derived": True}),  # as `_create`
            parse=lambda _: None,
            fallback=lambda: self.create_key(name),
            threads=threads,
        )

    def _create(self, client: hvac.Client, name: str) -> None:
        # derived=True: every encryption must name a context, and the key
        # used is derived from it, so a ciphertext only decrypts under the
        # tenant/provider it was written for.
        client.secrets.transit.create_key(
            name=name, key_type="aes256-gcm96", derived=True, mount_point=self.mount
        )

    def key_info(self, name: str) -> dict[str, Any] | None:
        """Latest and minimum decryption versions of a key, or None if it is gone."""

        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                result = client.secrets.transit.read_key(name=name, mount_point=self.mount)
            except hvac.exceptions.InvalidPath:
                return None
            return dict(result["data"])

        return self._vault.call("read an encryption key", read)

    def encrypt(self, key: str, plaintext: bytes, *, context: str) -> str:
        """Encrypt under `key`, bound to `context`; returns `vault:vN:...`."""

        def encrypt(client: hvac.Client) -> str:
            result = client.secrets.transit.encrypt_data(
                name=key,
                plaintext=_b64(plaintext),
                context=_b64(context.encode()),
                mount_point=self.mount,
            )
            return str(result["data"]["ciphertext"])

        return self._vault.call("encrypt", encrypt)

    def decrypt(self, key: str, ciphertext: str, *, context: str) -> bytes:
        """Decrypt a ciphertext written for `context`; fails for any other context."""

        def decrypt(client: hvac.Client) -> bytes:
            result = client.secrets.transit.decrypt_data(
                name=key,
                ciphertext=ciphertext,
                context=_b64(context.encode()),
                mount_point=self.mount,
            )
            return _plaintext(result)

        return self._vault.call("decrypt", decrypt)

    async def decrypt_on_loop(
        self,
        key: str,
        ciphertext: str,
        *,
        context: str,
        threads: anyio.CapacityLimiter,
        retry: bool = True,
    ) -> bytes:
        """`decrypt`, on the event loop when it can be (`call_on_loop`); with `retry=False`,
        one attempt on the loop or `VaultUnavailable`, never a thread."""
        url = format_url("/v1/{mount}/decrypt/{name}", mount=self.mount, name=key)
        payload = {"ciphertext": ciphertext, "context": _b64(context.encode())}
        return await self._vault.call_on_loop(
            "decrypt",
            ("POST", url, payload),
            parse=_plaintext,
            fallback=(lambda: self.decrypt(key, ciphertext, context=context)) if retry else None,
            threads=threads,
        )

    def rotate(self, key: str) -> int:
        """Rotate a key; returns its new latest version."""

        def rotate(client: hvac.Client) -> int:
            data = client.secrets.transit.rotate_key(name=key, mount_point=self.mount)
            # OpenBao answers with the key's new state; read it only where it does not.
            if not isinstance(data, dict) or "latest_version" not in (data.get("data") or {}):
                data = client.secrets.transit.read_key(name=key, mount_point=self.mount)
            return int(data["data"]["latest_version"])

        return self._vault.call("rotate an encryption key", rotate)

    def rewrap(self, key: str, items: list[tuple[str, str]]) -> list[str]:
        """Rewrap (ciphertext, context) pairs to the latest key version in one batch call."""
        if not items:
            return []

        def rewrap(client: hvac.Client) -> list[str]:
            result = client.secrets.transit.rewrap_data(
                name=key, ciphertext="", batch_input=_batch_input(items), mount_point=self.mount
            )
            return _rewrapped(result)

        return self._vault.call("rewrap ciphertexts", rewrap)

    async def rewrap_on_loop(
        self, key: str, items: list[tuple[str, str]], *, threads: anyio.CapacityLimiter
    ) -> list[str]:
        """`rewrap`, on the event loop when it can be (`call_on_loop`)."""
        if not items:
            return []
        url = format_url("/v1/{mount}/rewrap/{name}", mount=self.mount, name=key)
        return await self._vault.call_on_loop(
            "rewrap ciphertexts",
            ("POST", url, {"batch_input": _batch_input(items)}),
            parse=_rewrapped,
            fallback=lambda: self.rewrap(key, items),
            threads=threads,
        )

    def set_min_decryption_version(self, key: str, version: int) -> None:
        """Refuse ciphertexts older than `version` from now on."""
        self._vault.call(
            "configure an encryption key",
            lambda client: client.secrets.transit.update_key_configuration(
                name=key, min_decryption_version=version, mount_point=self.mount
            ),
        )

    async def set_min_decryption_version_on_loop(
        self, key: str, version: int, *, threads: anyio.CapacityLimiter
    ) -> None:
        """`set_min_decryption_version`, on the event loop when it can be (`call_on_loop`).

        Setting it twice is harmless, so an indefinite attempt is simply made again.
        """
        url = format_url("/v1/{mount}/keys/{name}/config", mount=self.mount, name=key)
        await self._vault.call_on_loop(
            "configure an encryption key",
            ("POST", url, {"min_decryption_version": version}),
            parse=lambda result: None,
            fallback=lambda: self.set_min_decryption_version(key, version),
            threads=threads,
        )

    def delete_key(self, key: str) -> None:
        """Delete a key for good (crypto-shredding); a missing key is fine."""

        def delete(client: hvac.Client) -> None:
            if _absent(
                lambda: client.secrets.transit.update_key_configuration(
                    name=key, deletion_allowed=True, mount_point=self.mount
                ),
                "no existing key",
                "not found",
            ):
                return
            # A concurrent deletion of the same tenant may get there first.
            _absent(
                lambda: client.secrets.transit.delete_key(name=key, mount_point=self.mount),
                "not found",
            )

        self._vault.call("delete an encryption key", delete)


def _batch_input(items: list[tuple[str, str]]) -> list[dict[str, str]]:
    """A Transit batch of (ciphertext, context) pairs."""
    return [{"ciphertext": ct, "context": _b64(ctx.encode())} for ct, ctx in items]


def _rewrapped(result: dict[str, Any]) -> list[str]:
    """The new ciphertexts in Vault's answer to a batch rewrap; one bad entry fails all."""
    out = []
    for entry in result["data"]["batch_results"]:
        if entry.get("error"):
            raise BrokerError("rewrap failed for one ciphertext")
        out.append(str(entry["ciphertext"]))
    return out


def _absent(step: Callable[[], object], *missing: str) -> bool:
    """Run `step`; True when Vault says the key is not there (404, or a 400 saying so)."""
    try:
        step()
    except hvac.exceptions.InvalidPath:
        return True
    except hvac.exceptions.InvalidRequest as exc:
        if any(phrase in str(exc) for phrase in missing):
            return True
        raise
    return False
