"""The one error table: what each Vault failure becomes, and whether it is retried."""

from __future__ import annotations

import http.client
import ssl

import hvac.exceptions
import pytest

from broker.core.errors import BrokerError, Conflict, NotFound
from broker.vault.errors import (
    FAILURES,
    BudgetSpent,
    CiphertextRejected,
    CiphertextRetired,
    InvalidHeader,
    NoActiveNode,
    StandbyRedirect,
    VaultMisconfigured,
    VaultUnavailable,
    failure,
    is_transient,
)


def _rejected(message: str) -> hvac.exceptions.InvalidRequest:
    return hvac.exceptions.InvalidRequest(message, errors=[message])


@pytest.mark.parametrize(
    ("exc", "transient", "error"),
    [
        (ssl.SSLCertVerificationError("self-signed"), False, VaultMisconfigured),
        (InvalidHeader("header X-Vault-Token has a line break"), False, VaultMisconfigured),
        (ConnectionRefusedError(), True, VaultUnavailable),
        (TimeoutError(), True, VaultUnavailable),
        (http.client.RemoteDisconnected("closed"), True, VaultUnavailable),
        (http.client.IncompleteRead(b""), True, VaultUnavailable),
        (NoActiveNode("electing"), True, VaultUnavailable),
        (BudgetSpent("Vault did not answer in time (read a secret)"), False, VaultUnavailable),
        (hvac.exceptions.VaultDown(), True, VaultUnavailable),
        (hvac.exceptions.VaultNotInitialized(), False, VaultUnavailable),
        (hvac.exceptions.InternalServerError(), True, VaultUnavailable),
        (hvac.exceptions.BadGateway(), True, VaultUnavailable),
        (hvac.exceptions.RateLimitExceeded(), True, VaultUnavailable),
        (StandbyRedirect("307"), True, VaultUnavailable),
        (hvac.exceptions.InvalidPath(), False, NotFound),
        (_rejected("check-and-set parameter did not match"), False, Conflict),
        (_rejected("requested version is disallowed by policy"), False, CiphertextRetired),
        (_rejected("cipher: message authentication failed"), False, CiphertextRejected),
        (_rejected("encryption key not found"), False, CiphertextRejected),
        (hvac.exceptions.Forbidden(), False, VaultMisconfigured),
        (hvac.exceptions.Unauthorized(), False, VaultMisconfigured),
        (hvac.exceptions.PreconditionFailed(), False, BrokerError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_each_failure_has_one_meaning(
    exc: BaseException, transient: bool, error: type[BrokerError]
) -> None:
    kind = failure(exc)
    assert kind is not None
    assert (kind.transient, is_transient(exc)) == (transient, transient)
    assert type(kind.error(exc, "read a secret")) is error


def test_a_message_names_the_operation_never_what_vault_said() -> None:
    exc = _rejected("the value sk_live_123 is invalid")
    kind = failure(exc)
    assert kind is not None
    message = str(kind.error(exc, "write a secret"))
    assert "write a secret" in message
    assert "sk_live_123" not in message


def test_a_retried_failure_that_runs_out_of_budget_is_a_503() -> None:
    # Retrying only makes sense for an outage: once retries are over, the caller
    # must see 503 with Retry-After, never a 4xx or 500.
    for row in FAILURES:
        if row.transient:
            assert isinstance(row.error(row.kinds[0](), "call"), VaultUnavailable), row


def test_an_error_that_is_not_vaults_is_not_in_the_table() -> None:
    assert failure(KeyError("data")) is None
    assert failure(BrokerError("rewrap failed for one ciphertext")) is None
    assert not is_transient(ValueError("bad input"))
