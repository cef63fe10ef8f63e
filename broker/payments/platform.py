"""The platform's Stripe key, read from Vault and never from the environment.

The key is cached in memory for a few minutes (so a rotation in Vault is picked
up without a restart) and handed only to the SDK client inside StripeGateway.
"""

from __future__ import annotations

import threading
import time

from broker.core.errors import BrokerError
from broker.payments.stripe_gateway import StripeGateway, StripeObserver
from broker.vault.gateway import VaultGateway

KEY_CACHE_S = 300.0


class StripeNotConfigured(BrokerError):
    """No platform Stripe key in Vault: an operator must store one; retrying cannot help."""

    # Not a 503 with Retry-After: that tells clients to retry a misconfiguration. 501
    # says this broker does not offer payments as deployed, and clients do not retry it.
    status = 501
    title = "Stripe is not configured"


class StripeAccess:
    """Builds (and rebuilds on key change) the StripeGateway from the key in Vault."""

    def __init__(
        self,
        vault: VaultGateway,
        *,
        api_base: str,
        key_path: str,
        observe: StripeObserver | None = None,
    ) -> None:
        self._vault = vault
        self._observe = observe
        self._api_base = api_base
        self._key_path = key_path
        self._lock = threading.Lock()
        self._gateway: StripeGateway | None = None
        self._fingerprint: int | None = None
        self._fetched_at = 0.0

    def gateway(self) -> StripeGateway:
        """The gateway for the current platform key."""
        with self._lock:
            if self._gateway is not None and time.monotonic() - self._fetched_at < KEY_CACHE_S:
                return self._gateway
            entry = self._vault.kv.read(self._key_path)
            key = str((entry.data if entry else {}).get("api_key") or "")
            if not key:
                raise StripeNotConfigured(
                    "payments are not set up on this broker: an operator must store the "
                    f"platform Stripe key in Vault at {self._key_path} (field api_key)"
                )
            fingerprint = hash(key)
            if self._gateway is None or fingerprint != self._fingerprint:
                if self._gateway is not None:
                    self._gateway.close()
                self._gateway = StripeGateway(
                    api_key=key, api_base=self._api_base, observe=self._observe
                )
                self._fingerprint = fingerprint
            self._fetched_at = time.monotonic()
            return self._gateway

    def configured(self) -> bool:
        """Whether a platform key is in Vault (VaultUnavailable when Vault cannot say)."""
        try:
            self.gateway()
        except StripeNotConfigured:
            return False
        return True

    def close(self) -> None:
        """Release the HTTP client."""
        with self._lock:
            if self._gateway is not None:
                self._gateway.close()
                self._gateway = None
