"""The Shopify OAuth connect a tenant's admin makes, through a broker and the fake Shopify.

The same steps whether the broker is an in-process TestClient (paths) or a process of
its own (`base` is its URL): start the connect, let the merchant approve it at the fake
(the browser talks to the shop's host), and bring the signed query back to the callback.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Protocol

import httpx

from tests.support.tokens import bearer, token

CONNECT = "/v1/tenants/settings/integrations/shopify/connect"
CALLBACK_PATH = "/v1/oauth/callback/shopify"


class Http(Protocol):
    """A TestClient or an httpx.Client: the two calls a connect needs."""

    def post(self, url: str, *, json: Any = ..., headers: Any = ...) -> httpx.Response: ...

    def get(self, url: str, *, follow_redirects: bool = ...) -> httpx.Response: ...


def admin(tenant: str, subject: str = "alice") -> dict[str, str]:
    """The headers of the tenant's admin who connects."""
    return bearer(token("integrations:manage", tenant_id=tenant, subject=subject))


def service(tenant: str) -> dict[str, str]:
    """The headers of the tenant's sync service, which fetches the credentials."""
    return bearer(token("credentials:read", kind="service", tenants=(tenant,), subject="sync"))


def consent(http: Http, tenant: str, shop: str, *, base: str = "") -> httpx.Response:
    """Start a connect and let the merchant approve it at the fake: the fake's redirect."""
    response = http.post(f"{base}{CONNECT}", json={"shop": shop}, headers=admin(tenant))
    assert response.status_code == 200, response.text
    # The browser at Shopify: the shop is the host it talks to.
    answer = httpx.get(
        response.json()["authorization_url"], headers={"Host": shop}, follow_redirects=False
    )
    assert answer.status_code == 302, answer.text
    return answer


def callback(
    http: Http, params: dict[str, str] | list[tuple[str, str]] | str, *, base: str = ""
) -> httpx.Response:
    """The browser arriving at the broker's callback with the (signed) query."""
    query = params if isinstance(params, str) else urllib.parse.urlencode(params)
    return http.get(f"{base}{CALLBACK_PATH}?{query}", follow_redirects=False)
