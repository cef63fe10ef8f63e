"""Production sign-in: OpenID Connect code flow with PKCE against a local provider."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.core.config import Settings
from broker.models import utcnow
from broker.vault.gateway import VaultGateway
from tests.console.conftest import ORIGIN, csrf_of
from tests.fakes.oidc import TOKEN_TTL_S, FakeOIDC
from tests.support.tenants import make_tenant
from tests.support.tokens import AUDIENCE

CLIENT_ID = "console"
CLIENT_SECRET = "console-secret-for-tests"


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeOIDC]:
    with FakeOIDC(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE) as fake:
        fake.redirect_uris = [f"{ORIGIN}/console/auth/callback"]
        yield fake


@pytest.fixture(scope="module")
def oidc_app(settings: Settings, engine: Engine, broker_vault: VaultGateway, idp: FakeOIDC) -> Any:
    """The broker trusting the provider's tokens (as the API does in production), no dev key."""
    configured = settings.model_copy(
        update={
            "jwt_hs256_secret": None,
            "jwt_jwks_url": f"{idp.issuer}/jwks",
            "jwt_issuer": idp.issuer,
            "jwt_algorithms": ["RS256"],
            "console_oidc_issuer": idp.issuer,
            "console_oidc_client_id": CLIENT_ID,
            "console_oidc_client_secret": SecretStr(CLIENT_SECRET),
            "console_oidc_scope": "openid tenant:admin",
            "console_public_url": ORIGIN,
        }
    )
    return create_app(configured, engine=engine, vault=broker_vault)


@pytest.fixture
def web(oidc_app: Any) -> Iterator[TestClient]:
    client = TestClient(oidc_app, base_url=ORIGIN, raise_server_exceptions=False)
    yield client
    client.close()


def _start(web: TestClient) -> str:
    """Open the sign-in page and press the button: the provider's authorization URL."""
    page = web.get("/console/sign-in")
    assert page.status_code == 200
    assert 'id="dev-sign-in"' not in page.text  # no dev sign-in without the dev key
    policy = page.headers["content-security-policy"]
    assert isinstance(web.app, FastAPI)
    assert f"form-action 'self' {web.app.state.settings.console_oidc_issuer};" in policy
    started = web.post(
        "/console/sign-in/oidc",
        data={"csrf_token": csrf_of(page.text), "next": "/console/settings"},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert started.status_code == 303, started.text
    return str(started.headers["location"])


def _consent(url: str) -> str:
    """What the provider answers the browser: the callback path and query on the console."""
    answer = httpx.get(url, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    back = urllib.parse.urlsplit(answer.headers["location"])
    assert f"{back.scheme}://{back.netloc}" == ORIGIN
    return f"{back.path}?{back.query}"


def test_sign_in_through_the_identity_provider_with_pkce(
    web: TestClient, idp: FakeOIDC, shop_for_oidc: str, engine: Engine
) -> None:
    idp.user = {"sub": "wanjiru", "scope": "tenant:admin", "tenant_id": shop_for_oidc}
    url = _start(web)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert url.startswith(f"{idp.issuer}/authorize?")
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) >= 43
    assert query["nonce"]
    assert query["state"]
    assert query["redirect_uri"] == f"{ORIGIN}/console/auth/callback"
    done = web.get(_consent(url), follow_redirects=False)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/console/settings"
    assert "code_verifier" in idp.token_requests[-1]
    page = web.get("/console/settings")
    assert page.status_code == 200
    assert "wanjiru" in page.text
    assert "access_token" not in page.text
    with engine.connect() as conn:
        expires_at, claims = conn.execute(
            text(
                "SELECT expires_at, claims FROM console_sessions WHERE tenant_id = :t"
                " AND status = 'active'"
            ),
            {"t": shop_for_oidc},
        ).one()
    # The session ends with the provider's token (an hour), not after the 8-hour default.
    assert expires_at <= utcnow() + timedelta(seconds=TOKEN_TTL_S)
    assert claims == {
        "sub": "wanjiru",
        "kind": "user",
        "scope": "tenant:admin",
        "tenant_id": shop_for_oidc,
    }


def test_a_callback_opened_in_another_browser_signs_nobody_in(
    web: TestClient, oidc_app: Any, idp: FakeOIDC, shop_for_oidc: str
) -> None:
    idp.user = {"sub": "wanjiru", "scope": "tenant:admin", "tenant_id": shop_for_oidc}
    callback = _consent(_start(web))
    other = TestClient(oidc_app, base_url=ORIGIN)
    other.get("/console/sign-in")
    answer = other.get(callback, follow_redirects=False)
    assert answer.headers["location"] == "/console/sign-in"
    assert other.get("/console/settings", follow_redirects=False).status_code == 303


def test_a_changed_state_is_refused(web: TestClient, idp: FakeOIDC, shop_for_oidc: str) -> None:
    idp.user = {"sub": "wanjiru", "scope": "tenant:admin", "tenant_id": shop_for_oidc}
    path, _, query = _consent(_start(web)).partition("?")
    params = dict(urllib.parse.parse_qsl(query)) | {"state": "forged"}
    answer = web.get(f"{path}?{urllib.parse.urlencode(params)}")
    assert answer.status_code == 400
    assert "stale" in answer.text
    assert web.get("/console/settings", follow_redirects=False).status_code == 303


def test_an_id_token_minted_for_another_login_is_refused(
    web: TestClient, idp: FakeOIDC, shop_for_oidc: str
) -> None:
    idp.user = {"sub": "wanjiru", "scope": "tenant:admin", "tenant_id": shop_for_oidc}
    idp.id_token_nonce = "someone-elses-nonce"
    try:
        answer = web.get(_consent(_start(web)))
    finally:
        idp.id_token_nonce = None
    assert answer.status_code == 400
    assert "belongs to another login" in answer.text


def test_an_access_token_the_api_would_refuse_signs_nobody_in(
    web: TestClient, idp: FakeOIDC, shop_for_oidc: str
) -> None:
    idp.user = {"sub": "wanjiru", "scope": "tenant:admin root:all", "tenant_id": shop_for_oidc}
    answer = web.get(_consent(_start(web)))
    assert answer.status_code == 403
    assert "cannot use the console" in answer.text
    assert web.get("/console/settings", follow_redirects=False).status_code == 303


def test_a_refusal_at_the_provider_is_explained(web: TestClient, idp: FakeOIDC) -> None:
    idp.user = None
    answer = web.get(_consent(_start(web)))
    assert answer.status_code == 400
    assert "cancelled at the identity provider" in answer.text


@pytest.fixture
def shop_for_oidc(client: TestClient) -> str:
    return make_tenant(client)
