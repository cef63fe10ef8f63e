"""Console fixtures: an HTTPS test client per test (its own cookie jar), signed in or not."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes.providers import VALID
from tests.support.tenants import make_tenant

ORIGIN = "https://testserver"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The synchronizer token a console page's forms carry."""
    found = CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def post_form(
    browser: TestClient, path: str, data: dict[str, Any], *, page: str | None = None
) -> Any:
    """Post a console form the way a browser would: same Origin, the page's CSRF token."""
    html = browser.get(page or "/console").text
    return browser.post(
        path,
        data={"csrf_token": csrf_of(html), **data},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )


def sign_in(browser: TestClient, tenant_id: str, role: str = "admin") -> None:
    """The dev sign-in, through its page and form."""
    page = browser.get("/console/sign-in")
    assert page.status_code == 200, page.text
    answer = browser.post(
        "/console/sign-in/dev",
        data={"csrf_token": csrf_of(page.text), "tenant_id": tenant_id, "role": role},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console"


@pytest.fixture
def browser(app: Any) -> Iterator[TestClient]:
    """A fresh browser: HTTPS (the session cookie is Secure outside dev), no cookies yet."""
    # Not as a context manager: that would run the lifespan, whose shutdown closes the
    # session's shared engine and Vault gateway.
    client = TestClient(app, base_url=ORIGIN, raise_server_exceptions=False)
    yield client
    client.close()


@pytest.fixture
def browser_factory(app: Any) -> Iterator[Any]:
    """More browsers, each with its own cookies."""
    made: list[TestClient] = []

    def make() -> TestClient:
        made.append(TestClient(app, base_url=ORIGIN, raise_server_exceptions=False))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def shop(client: TestClient) -> str:
    """A fresh tenant."""
    return make_tenant(client)


@pytest.fixture
def admin(browser: TestClient, shop: str) -> TestClient:
    """A browser signed in as the shop's tenant admin."""
    sign_in(browser, shop)
    return browser


@pytest.fixture
def admin_of(browser_factory: Any, providers: Any) -> Any:
    """Sets a shop up the way its admin would: WooCommerce credentials, tested and saved."""

    def setup(shop: str) -> None:
        admin = browser_factory()
        sign_in(admin, shop)
        fields = dict(VALID["woocommerce"]) | {"store_url": providers.base_url}
        page = "/console/integrations/woocommerce"
        saved = post_form(
            admin,
            f"{page}/credentials",
            {**{f"field.{k}": v for k, v in fields.items()}, "action": "save", "version": "0"},
            page=page,
        )
        assert saved.status_code == 303, saved.text

    return setup
