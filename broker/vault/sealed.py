"""Tenant secrets sealed with the tenant's own Transit key and kept in KV v2.

Layout (defaults): KV path `tenants/<tenant>/<item>` (item `integrations/shopify`,
`payout`, ...), holding `{"ciphertext": "vault:vN:...", "public": {...}}`. The
ciphertext is produced by the derived key `tenant-<tenant>` with the context
`<tenant>/<name>`, where name is the item's last segment (the provider), so a
ciphertext copied to another provider's path or another tenant's fails to
decrypt. `public` holds only what may be shown anyway: masked hints and
non-secret identifiers, so metadata can be rebuilt from Vault alone.

`public` is readable without Transit, so it is also sealed: the plaintext is
`{"secrets": {...}, "public": {...}}`, and opening an item checks that the
`public` stored beside the ciphertext is the one sealed inside it. Whoever can
write KV but not use Transit therefore cannot pair a tenant's real secret with
an identifier of their choosing (a WooCommerce store URL that points at them):
the read fails with `StoredDataUnverified` instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from broker.core.errors import NotFound
from broker.vault.errors import StoredDataUnverified, VaultMisconfigured
from broker.vault.gateway import VaultGateway
from broker.vault.kv import KvEntry

_CIPHERTEXT_VERSION = re.compile(r"^vault:v(\d+):")


def key_name(tenant_id: str) -> str:
    """The tenant's Transit key."""
    return f"tenant-{tenant_id}"


def binding(tenant_id: str, item: str) -> str:
    """The derivation context a ciphertext is bound to: `<tenant>/<provider>`."""
    return f"{tenant_id}/{item.rsplit('/', 1)[-1]}"


def ciphertext_key_version(ciphertext: str) -> int:
    """The Transit key version a ciphertext was written with."""
    match = _CIPHERTEXT_VERSION.match(ciphertext)
    if match is None:
        raise ValueError("not a Transit ciphertext")
    return int(match.group(1))


@dataclass(frozen=True)
class SealedRecord:
    """One KV version of a sealed item, as read back: ciphertext plus its public metadata."""

    version: int
    ciphertext: str
    public: dict[str, Any]

    def __repr__(self) -> str:
        return f"SealedRecord(version={self.version}, public={self.public!r})"


def _normal(public: Mapping[str, Any]) -> Any:
    """`public` as it reads back from KV (JSON), so a comparison is exact."""
    return json.loads(json.dumps(dict(public), sort_keys=True))


def _record(entry: KvEntry | None) -> SealedRecord | None:
    """A KV entry as a sealed record; None when absent or not a sealed item."""
    if entry is None or "ciphertext" not in entry.data:
        return None
    return SealedRecord(
        version=entry.version,
        ciphertext=str(entry.data["ciphertext"]),
        public=dict(entry.data.get("public") or {}),
    )


def verified_secrets(plaintext: bytes, record: SealedRecord) -> dict[str, str]:
    """The secrets sealed in `plaintext`, once its `public` part matches the stored one.

    `record.public` was read back from KV, as JSON, so it is compared as it is: `_normal`
    would turn it into what it already is.
    """
    try:
        document = json.loads(plaintext)
    except ValueError:
        raise StoredDataUnverified() from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("secrets"), dict)
        or document.get("public") != record.public
    ):
        raise StoredDataUnverified()
    return {str(k): str(v) for k, v in document["secrets"].items()}


class SealedStore:
    """Encrypt-then-store and load-then-decrypt for one tenant's items."""

    def __init__(self, vault: VaultGateway) -> None:
        self.vault = vault

    def path(self, tenant_id: str, item: str) -> str:
        """The KV path of an item."""
        return f"tenants/{tenant_id}/{item}"

    def ensure_tenant_key(self, tenant_id: str) -> bool:
        """Create the tenant's Transit key if missing; True when it was created."""
        return self.vault.transit.ensure_key(key_name(tenant_id))

    def seal(
        self, tenant_id: str, item: str, secrets: Mapping[str, str], public: Mapping[str, Any]
    ) -> str:
        """Encrypt `secrets` with the `public` part they will be stored beside, bound to
        the tenant and item."""
        document = {"secrets": dict(secrets), "public": _normal(public)}
        plaintext = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        key = key_name(tenant_id)
        try:
            return self.vault.transit.encrypt(key, plaintext, context=binding(tenant_id, item))
        except VaultMisconfigured:
            # Encrypting under a missing key would create it, which the broker's policy
            # forbids: a deletion shredded the key since the caller found the tenant.
            if self.vault.transit.key_info(key) is None:
                raise NotFound("no such tenant") from None
            raise

    def open(self, tenant_id: str, item: str, record: SealedRecord) -> dict[str, str]:
        """Decrypt a record's secrets, after checking its public part is the sealed one."""
        plaintext = self.vault.transit.decrypt(
            key_name(tenant_id), record.ciphertext, context=binding(tenant_id, item)
        )
        return verified_secrets(plaintext, record)

    async def open_on_loop(
        self, tenant_id: str, item: str, record: SealedRecord, *, threads: anyio.CapacityLimiter
    ) -> dict[str, str]:
        """`open`, with the decryption on the event loop when it can be."""
        plaintext = await self.decrypt_on_loop(tenant_id, item, record.ciphertext, threads=threads)
        return verified_secrets(plaintext, record)

    async def decrypt_on_loop(
        self,
        tenant_id: str,
        item: str,
        ciphertext: str,
        *,
        threads: anyio.CapacityLimiter,
        retry: bool = True,
    ) -> bytes:
        """The plaintext of one of the item's ciphertexts, on the event loop when it can be
        (with `retry=False`, one attempt there only: see `Transit.decrypt_on_loop`).

        Not yet checked: `verified_secrets(plaintext, record)` checks it against the record
        that holds `ciphertext`, as `open_on_loop` does.
        """
        return await self.vault.transit.decrypt_on_loop(
            key_name(tenant_id),
            ciphertext,
            context=binding(tenant_id, item),
            threads=threads,
            retry=retry,
        )

    def read(self, tenant_id: str, item: str, *, version: int | None = None) -> SealedRecord | None:
        """The latest (or a given) live version of an item, still sealed."""
        return _record(self.vault.kv.read(self.path(tenant_id, item), version=version))

    async def read_on_loop(
        self, tenant_id: str, item: str, *, threads: anyio.CapacityLimiter
    ) -> SealedRecord | None:
        """`read` of the latest version, on the event loop when it can be."""
        return _record(
            await self.vault.kv.read_on_loop(self.path(tenant_id, item), threads=threads)
        )

    def write(
        self, tenant_id: str, item: str, *, ciphertext: str, public: Mapping[str, Any], cas: int
    ) -> int:
        """Store a sealed item with check-and-set against KV version `cas`."""
        return self.vault.kv.write(
            self.path(tenant_id, item),
            {"ciphertext": ciphertext, "public": dict(public)},
            cas=cas,
        )

    async def write_on_loop(
        self,
        tenant_id: str,
        item: str,
        *,
        ciphertext: str,
        public: Mapping[str, Any],
        cas: int,
        threads: anyio.CapacityLimiter,
    ) -> int:
        """`write`, on the event loop when it can be."""
        return await self.vault.kv.write_on_loop(
            self.path(tenant_id, item),
            {"ciphertext": ciphertext, "public": dict(public)},
            cas=cas,
            threads=threads,
        )

    def current_version(self, tenant_id: str, item: str) -> tuple[int, bool]:
        """(current KV version, whether that version is live); (0, False) when absent."""
        meta = self.vault.kv.metadata(self.path(tenant_id, item))
        if meta is None:
            return 0, False
        current = int(meta.get("current_version") or 0)
        info = (meta.get("versions") or {}).get(str(current)) or {}
        live = bool(current) and not info.get("deletion_time") and not info.get("destroyed")
        return current, live

    def versions(self, tenant_id: str, item: str) -> list[dict[str, Any]]:
        """Every KV version of an item with its timestamps (no data)."""
        meta = self.vault.kv.metadata(self.path(tenant_id, item))
        if meta is None:
            return []
        return [
            {
                "version": int(number),
                "created_time": info.get("created_time"),
                "deletion_time": info.get("deletion_time") or None,
                "destroyed": bool(info.get("destroyed")),
            }
            for number, info in sorted(
                (meta.get("versions") or {}).items(), key=lambda kv: int(kv[0])
            )
        ]

    def delete_version(self, tenant_id: str, item: str, version: int) -> None:
        """Delete one version (the current one, as the caller knows it); others stay."""
        self.vault.kv.delete_versions(self.path(tenant_id, item), [version])

    def items(self, tenant_id: str) -> list[str]:
        """Every item stored for the tenant (recursively), e.g. `integrations/shopify`."""
        found: list[str] = []
        pending = [""]
        while pending:
            folder = pending.pop()
            names = self.vault.kv.keys(self.path(tenant_id, folder).rstrip("/"))
            _file(folder, names, pending, found)
        return sorted(found)

    async def items_on_loop(self, tenant_id: str, *, threads: anyio.CapacityLimiter) -> list[str]:
        """`items`, listing on the event loop when it can be."""
        found: list[str] = []
        pending = [""]
        while pending:
            folder = pending.pop()
            path = self.path(tenant_id, folder).rstrip("/")
            names = await self.vault.kv.keys_on_loop(path, threads=threads)
            _file(folder, names, pending, found)
        return sorted(found)

    def destroy(self, tenant_id: str, item: str) -> None:
        """Destroy one item's versions and metadata."""
        self.vault.kv.destroy(self.path(tenant_id, item))

    def shred(self, tenant_id: str) -> int:
        """Destroy every item's versions and metadata, then delete the tenant's key.

        Deleting the key is what makes any copy of a ciphertext (a backup, a
        log) undecryptable for good: crypto-shredding.
        """
        items = self.items(tenant_id)
        for item in items:
            self.destroy(tenant_id, item)
        self.vault.transit.delete_key(key_name(tenant_id))
        return len(items)


def _file(folder: str, names: list[str], pending: list[str], found: list[str]) -> None:
    """Sort one folder's listing: sub-folders still to list, items found."""
    for name in names:
        (pending if name.endswith("/") else found).append(f"{folder}{name}")
