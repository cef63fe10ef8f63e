"""The broker's Vault errors, and the one table that maps every hvac and transport failure
to one of them and says whether it is worth retrying."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

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
    default_message = (
        "this version was sealed before a key rotation retired its key version; "
        "it can no longer be decrypted or restored"
    )


class StoredDataUnverified(BrokerError):
    """What KV holds beside a ciphertext is not what was sealed with it: tampered with."""

    status = 409
    title = "Stored data does not verify"
    default_message = "the stored data does not verify against its sealed copy; it was not used"


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


class BudgetSpent(Exception):
    """The request's Vault time budget ran out before a call could be tried (again)."""


# -- the error table -----------------------------------------------------------------------
#
# One row per kind of failure: whether it is worth retrying on the same or another node
# (transient), and the broker error a caller sees when retries are over. Rows are tried in
# order, so a subclass comes before its base (a TLS verification failure is an OSError).
# Messages name the operation, never the payload: hvac exceptions can carry response
# bodies, and those stay out of anything user-visible.

Explain = Callable[[BaseException, str], BrokerError]


@dataclass(frozen=True)
class Failure:
    """What one kind of Vault failure means to the broker: the exceptions it covers, only
    those whose Vault errors say one of `says` when that is given."""

    kinds: tuple[type[BaseException], ...]
    transient: bool
    explain: Explain
    says: tuple[str, ...] = ()

    def covers(self, exc: BaseException) -> bool:
        """Whether `exc` is this kind of failure."""
        if not isinstance(exc, self.kinds):
            return False
        return not self.says or any(phrase in _said(exc) for phrase in self.says)

    def error(self, exc: BaseException, operation: str) -> BrokerError:
        """The broker error for `exc`, raised by a call named `operation`."""
        return self.explain(exc, operation)


def _said(exc: BaseException) -> str:
    """The errors a Vault answer listed (hvac keeps them), as one line."""
    errors = exc.errors if isinstance(exc, hvac.exceptions.VaultError) else None
    return " ".join(str(e) for e in (errors or []))


def _unavailable(why: str) -> Explain:
    return lambda exc, operation: VaultUnavailable(f"{why} ({operation})")


def _tls_unverified(exc: BaseException, operation: str) -> BrokerError:
    # Not an outage: the CA setting or the server's certificate is wrong
    # (or someone is in the middle). Retrying will not fix it.
    log.error("vault TLS certificate not verified", extra={"fields": {"operation": operation}})
    return VaultMisconfigured(f"Vault's TLS certificate could not be verified ({operation})")


def _unsendable(exc: BaseException, operation: str) -> BrokerError:
    return VaultMisconfigured(f"a Vault request could not be sent: {exc} ({operation})")


# What Vault's 400 says, mapped to what it means for a stored credential.
_REJECTIONS: tuple[tuple[tuple[str, ...], Callable[[], BrokerError]], ...] = (
    (
        ("check-and-set",),
        lambda: Conflict("the credential changed since it was read; reload and retry"),
    ),
    (("disallowed by policy", "too old"), CiphertextRetired),
    (("message authentication failed", "decryption failed"), CiphertextRejected),
    (
        ("encryption key not found", "key not found"),
        lambda: CiphertextRejected("the tenant's encryption key no longer exists"),
    ),
)


def _rejected(exc: BaseException, operation: str) -> BrokerError:
    text = _said(exc)
    for phrases, error in _REJECTIONS:
        if any(phrase in text for phrase in phrases):
            return error()
    log.error("vault rejected a request", extra={"fields": {"operation": operation}})
    return BrokerError(f"Vault rejected the request ({operation})")


def _refused(exc: BaseException, operation: str) -> BrokerError:
    return VaultMisconfigured(f"the broker's Vault token may not {operation}")


FAILURES: tuple[Failure, ...] = (
    Failure((ssl.SSLCertVerificationError,), transient=False, explain=_tls_unverified),
    Failure((InvalidHeader,), transient=False, explain=_unsendable),
    Failure(TRANSIENT_TRANSPORT, transient=True, explain=_unavailable("Vault is unreachable")),
    Failure(
        (NoActiveNode,),
        transient=True,
        explain=_unavailable("no active Vault node; a leader election may be under way"),
    ),
    Failure(
        (BudgetSpent,), transient=False, explain=lambda exc, operation: VaultUnavailable(str(exc))
    ),
    Failure((hvac.exceptions.VaultDown,), transient=True, explain=_unavailable("Vault is sealed")),
    # Not retried: a Vault that is not initialised will not be within the budget.
    Failure(
        (hvac.exceptions.VaultNotInitialized,),
        transient=False,
        explain=_unavailable("Vault is not initialised"),
    ),
    Failure(
        (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway),
        transient=True,
        explain=_unavailable("Vault failed"),
    ),
    Failure(
        (hvac.exceptions.RateLimitExceeded,),
        transient=True,
        explain=_unavailable("Vault is rate limiting"),
    ),
    Failure(
        (hvac.exceptions.InvalidPath,), transient=False, explain=lambda exc, operation: NotFound()
    ),
    # A KV v2 mount answers 400 for a moment while it (re)initialises: on a node that has
    # just become active after a failover, or a mount just upgraded from KV v1. Nothing
    # was done, and the same request succeeds once it is over.
    Failure(
        (hvac.exceptions.InvalidRequest,),
        transient=True,
        explain=_unavailable("a Vault secrets engine is starting"),
        says=("non-versioned to versioned data",),
    ),
    Failure((hvac.exceptions.InvalidRequest,), transient=False, explain=_rejected),
    Failure(
        (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized), transient=False, explain=_refused
    ),
    # 3xx (a standby pointing at a dead leader, `StandbyRedirect`) and other oddities.
    Failure(
        (hvac.exceptions.UnexpectedError,),
        transient=True,
        explain=_unavailable("Vault answered unexpectedly"),
    ),
    Failure(
        (hvac.exceptions.VaultError,),
        transient=False,
        explain=lambda exc, operation: BrokerError(f"Vault call failed ({operation})"),
    ),
)


def failure(exc: BaseException) -> Failure | None:
    """The row of the error table for `exc`; None for an error that is not Vault's."""
    for row in FAILURES:
        if row.covers(exc):
            return row
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying on the same or another Vault node."""
    row = failure(exc)
    return row is not None and row.transient


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
