"""The broker's own Vault token: a static one, or an AppRole login renewed before expiry."""

from __future__ import annotations

import logging
import threading
import time

import hvac
import hvac.exceptions

from broker.vault.errors import VaultMisconfigured

log = logging.getLogger(__name__)


class Login:
    """Hands out the token every call carries."""

    def __init__(
        self,
        *,
        token: str | None,
        role_id: str | None,
        secret_id: str | None,
        mount: str,
    ) -> None:
        if token is None and not (role_id and secret_id):
            raise ValueError("Vault auth needs a token or an AppRole role_id and secret_id")
        self._static = token
        self._role_id = role_id
        self._secret_id = secret_id
        self._mount = mount
        self._token: str | None = token
        self._expires_at: float | None = None
        self._lock = threading.Lock()

    @property
    def renewable(self) -> bool:
        """True for AppRole: a refused token can be replaced by logging in again."""
        return self._static is None

    def token(self, client: hvac.Client) -> str:
        """The current token, logging in (through `client`) first when there is none yet
        or a third of its TTL is left, so a long request never starts with a token about
        to expire."""
        if self._static is not None:
            return self._static
        with self._lock:
            fresh = self._expires_at is None or time.monotonic() < self._expires_at
            if self._token is None or not fresh:
                self._token = self._approle_login(client)
            return self._token

    def current(self) -> str | None:
        """The token when it needs no login first (never blocks), else None."""
        if self._static is not None:
            return self._static
        token, expires_at = self._token, self._expires_at
        if token is None or (expires_at is not None and time.monotonic() >= expires_at):
            return None
        return token

    def expire(self) -> None:
        """Log in again before the next call (the token may have been revoked)."""
        self._expires_at = 0.0

    def _approle_login(self, client: hvac.Client) -> str:
        try:
            result = client.auth.approle.login(
                role_id=self._role_id,
                secret_id=self._secret_id,
                mount_point=self._mount,
                use_token=False,
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise VaultMisconfigured("Vault refused the broker's AppRole login") from exc
        auth = result["auth"]
        ttl = int(auth.get("lease_duration") or 0)
        self._expires_at = time.monotonic() + ttl * 2 / 3 if ttl else None
        log.info("logged in to Vault with AppRole", extra={"fields": {"ttl_s": ttl}})
        return str(auth["client_token"])
