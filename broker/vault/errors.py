"""Translation of hvac and transport errors into broker errors, at the Vault edge."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl

import hvac.exceptions

from broker.core.errors import BrokerError, Conflict, NotFound, UpstreamUnavailable

log = logging.getLogger(__name__)


class VaultUnavailable(UpstreamUnavailable):
    """Vault is sealed, unreachable, electing a leader or overloaded."""

    title = "Vault unavailable"


class WriteOutcomeUnknown(VaultUnavailable):
    """A Vault write was sent but never answered: it may land, or may never land.

    Callers keep whatever records the write would change marked pending until
    Vault shows the outcome; the same write retried is recognised, not refused.
    """

    title = "Vault write not confirmed"


class VaultMisconfigured(BrokerError):
    """Vault refused the broker's own token: a policy or bootstrap problem, not the caller's."""

    status = 500
    title = "Vault refused the broker"


class CiphertextRejected(BrokerError):
    """Transit would not decrypt: wrong tenant or provider binding, or a shredded key."""

    status = 409
    title = "Stored ciphertext cannot be decrypted"


class CiphertextRetired(BrokerError):
    """A ciphertext older than the key's minimum decryption version: a rotation retired it."""

    status = 410
    title = "Sealed with a retired key version"

    def __init__(self, message: str | None = None, **extra: object) -> None:
        super().__init__(
            message
            or "this version was sealed before a key rotation retired its key version; "
            "it can no longer be decrypted or restored",
            **extra,
        )


class StoredDataUnverified(BrokerError):
    """What KV holds beside a ciphertext is not what was sealed with it: tampered with."""

    status = 409
    title = "Stored data does not verify"

    def __init__(self, message: str | None = None, **extra: object) -> None:
        super().__init__(
            message or "the stored data does not verify against its sealed copy; it was not used",
            **extra,
        )


class NoActiveNode(Exception):
    """None of the configured addresses answered as the active node.

    Raised inside the gateway while a raft cluster elects a leader, or when every node is
    sealed or down. Transient; it leaves the gateway only as `VaultUnavailable`.
    """


class StandbyRedirect(hvac.exceptions.UnexpectedError):
    """A 3xx from Vault: a standby pointing at the active node, which may be dead.

    The gateway never follows it (a standby keeps pointing at a dead leader until the
    next election completes); it looks for the active node itself instead.
    """


# What the transport (broker.vault.transport: http.client, no retries of its own)
# raises when a node cannot be reached or drops the connection: OSError covers
# refused, reset, timed out and unresolvable (a TLS certificate that fails
# verification is an OSError too, but is a misconfiguration: see below);
# BadStatusLine (RemoteDisconnected) and IncompleteRead a connection closed
# before or during the answer. Other HTTPExceptions (InvalidURL, a connection in
# the wrong state) are bugs or configuration, and are not retried.
TRANSIENT_TRANSPORT = (OSError, http.client.BadStatusLine, http.client.IncompleteRead)


class InvalidHeader(ValueError):
    """A request header HTTP cannot carry (a line break, or non-Latin-1 text).

    Usually a Vault token read with its trailing newline. The message names the
    header, never its value.
    """


def translate(exc: Exception, *, operation: str) -> BrokerError:
    """Map one hvac/transport exception to the broker error the caller should see.

    Messages name the operation, never the payload: hvac exceptions can carry
    response bodies, and those stay out of anything user-visible.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Not an outage: the CA setting or the server's certificate is wrong
        # (or someone is in the middle). Retrying will not fix it.
        log.error("vault TLS certificate not verified", extra={"fields": {"operation": operation}})
        return VaultMisconfigured(f"Vault's TLS certificate could not be verified ({operation})")
    if isinstance(exc, InvalidHeader):
        return VaultMisconfigured(f"a Vault request could not be sent: {exc} ({operation})")
    if isinstance(exc, TRANSIENT_TRANSPORT):
        return VaultUnavailable(f"Vault is unreachable ({operation})")
    if isinstance(exc, NoActiveNode):
        return VaultUnavailable(
            f"no active Vault node; a leader election may be under way ({operation})"
        )
    if isinstance(exc, hvac.exceptions.VaultDown):
        return VaultUnavailable(f"Vault is sealed ({operation})")
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return VaultUnavailable(f"Vault is not initialised ({operation})")
    if isinstance(exc, hvac.exceptions.InternalServerError | hvac.exceptions.BadGateway):
        return VaultUnavailable(f"Vault failed ({operation})")
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return VaultUnavailable(f"Vault is rate limiting ({operation})")
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return NotFound()
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        text = " ".join(str(e) for e in (exc.errors or []))
        if "check-and-set" in text:
            return Conflict("the credential changed since it was read; reload and retry")
        if "disallowed by policy" in text or "too old" in text:
            return CiphertextRetired()
        if "message authentication failed" in text or "decryption failed" in text:
            return CiphertextRejected()
        if "encryption key not found" in text or "key not found" in text:
            return CiphertextRejected("the tenant's encryption key no longer exists")
        log.error("vault rejected a request", extra={"fields": {"operation": operation}})
        return BrokerError(f"Vault rejected the request ({operation})")
    if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
        return VaultMisconfigured(f"the broker's Vault token may not {operation}")
    if isinstance(exc, hvac.exceptions.UnexpectedError):
        # 3xx (a standby pointing at a dead leader) and other oddities are transient.
        return VaultUnavailable(f"Vault answered unexpectedly ({operation})")
    return BrokerError(f"Vault call failed ({operation})")


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying on the same or another Vault node."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    return isinstance(exc, (*TRANSIENT_TRANSPORT, NoActiveNode)) or isinstance(
        exc,
        hvac.exceptions.VaultDown
        | hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway
        | hvac.exceptions.UnexpectedError
        | hvac.exceptions.RateLimitExceeded,
    )


def may_have_applied(exc: BaseException) -> bool:
    """True when a failed write may still have been (or still be) applied by Vault.

    A request that was refused before Vault read it (connection refused, no
    name, a TLS handshake failure, no active node, a standby's redirect, a
    sealed or rate-limiting node) changed nothing. One that was sent and then
    timed out, was cut off, or failed inside Vault (500/502: a raft commit
    that timed out may still be applied) has an unknown outcome.
    """
    if isinstance(
        exc,
        ConnectionRefusedError | socket.gaierror | ssl.SSLError | NoActiveNode | StandbyRedirect,
    ):
        return False
    if isinstance(exc, TRANSIENT_TRANSPORT):
        return True
    return isinstance(exc, hvac.exceptions.InternalServerError | hvac.exceptions.BadGateway)
