"""The one private piece of hvac the transport relies on, pinned by behaviour.

`PooledAdapter` (broker/vault/transport.py) hands its error answers to hvac's own
`RawAdapter._raise_for_error`, so hvac keeps mapping statuses to its exceptions. That
method is not public API: pyproject pins hvac below its next major version, and this
test says exactly what is relied on, so an upgrade that changes it fails here first.
"""

from __future__ import annotations

import http.client
from typing import Any

import hvac.adapters
import hvac.exceptions
import pytest

from broker.vault.transport import VaultResponse


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, hvac.exceptions.InvalidRequest),
        (403, hvac.exceptions.Forbidden),
        (404, hvac.exceptions.InvalidPath),
        (429, hvac.exceptions.RateLimitExceeded),
        (500, hvac.exceptions.InternalServerError),
        (503, hvac.exceptions.VaultDown),
    ],
)
def test_raise_for_error_maps_a_response_of_our_own_to_hvacs_exceptions(
    status: int, error: type[Exception]
) -> None:
    raise_for_error: Any = hvac.adapters.RawAdapter._raise_for_error  # type: ignore[attr-defined]
    headers = http.client.HTTPMessage()
    headers["Content-Type"] = "application/json"
    answer = VaultResponse(status, headers, b'{"errors": ["nope"]}')
    with pytest.raises(error) as raised:
        raise_for_error(None, "GET", "http://127.0.0.1:8200/v1/secret/data/x", answer)
    assert "nope" in str(raised.value)
