"""Audit-device hashing, over the gateway's `call`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvac

if TYPE_CHECKING:
    from broker.vault.gateway import VaultGateway


class AuditDevices:
    """`sys/audit-hash`: find a value in an audit log, where it is HMACed."""

    def __init__(self, vault: VaultGateway) -> None:
        self._vault = vault

    def hash(self, device: str, value: str) -> str:
        """HMAC `value` the way audit device `device` writes it to its log."""

        def audit_hash(client: hvac.Client) -> str:
            response = client.adapter.post(f"/v1/sys/audit-hash/{device}", json={"input": value})
            return str(response["data"]["hash"] if "data" in response else response["hash"])

        return self._vault.call("hash a value for the audit log", audit_hash)
