"""Response wrapping, over the gateway's `call`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hvac

if TYPE_CHECKING:
    from broker.vault.gateway import VaultGateway


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


class Wrapping:
    """`sys/wrapping`: hand a payload over as a single-use token."""

    def __init__(self, vault: VaultGateway) -> None:
        self._vault = vault

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

        return self._vault.call("wrap a response", wrap)
