"""OpenID Connect sign-in: authorization code with PKCE (Authlib), against the configured IdP.

The console is a confidential client when a secret is configured, a public one
otherwise; PKCE (S256) is used either way. The state and nonce are random per login and
bound to the browser's pending session (the state only as a hash). The ID token proves
the login belongs to this browser (nonce, audience, issuer, signature); the access token
is what carries scopes and tenant, and it is verified by the API's own TokenVerifier, so
the console signs in exactly those the API would let in.
"""

from __future__ import annotations

import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from jwt import PyJWKClient

from broker.core.config import Settings
from broker.core.errors import BrokerError, UpstreamUnavailable

with warnings.catch_warnings():
    # As in broker/integrations/oauth.py: Authlib warns that it prefers httpx2.
    import authlib.deprecate

    warnings.simplefilter("ignore", authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.common.security import generate_token
    from authlib.integrations.httpx_client import OAuth2Client, OAuthError

TIMEOUT_S = 5.0
DISCOVERY_TTL_S = 3600.0


class SignInFailed(BrokerError):
    """The identity provider refused or the answer did not check out; sign in again."""

    status = 400
    title = "Sign-in failed"


@dataclass(frozen=True)
class Login:
    """A login under way: where to send the browser, and what to remember about it."""

    url: str
    state: str
    nonce: str
    verifier: str


@dataclass(frozen=True)
class Answer:
    """A checked sign-in: the access token (for the API's verifier) and the ID token's subject."""

    access_token: str
    subject: str


def configured(settings: Settings) -> bool:
    """Whether an identity provider is configured for the console."""
    return bool(settings.console_oidc_issuer and settings.console_oidc_client_id)


class IdentityProvider:
    """The configured IdP: discovery (cached), the authorization URL, the code exchange."""

    def __init__(self, settings: Settings) -> None:
        if not (settings.console_oidc_issuer and settings.console_oidc_client_id):
            raise ValueError("no OpenID Connect provider is configured")
        self.issuer = settings.console_oidc_issuer
        self.client_id = settings.console_oidc_client_id
        secret = settings.console_oidc_client_secret
        self._secret = secret.get_secret_value() if secret else None
        self.scope = settings.console_oidc_scope
        self.leeway_s = settings.jwt_leeway_s
        self._lock = threading.Lock()
        self._document: dict[str, Any] | None = None
        self._fetched = 0.0
        self._jwks: PyJWKClient | None = None

    def discovery(self) -> dict[str, Any]:
        """The provider's metadata (`/.well-known/openid-configuration`), kept for an hour."""
        with self._lock:
            if self._document is not None and time.monotonic() - self._fetched < DISCOVERY_TTL_S:
                return self._document
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            answer = httpx.get(url, timeout=TIMEOUT_S, follow_redirects=False, trust_env=False)
            answer.raise_for_status()
            document = answer.json()
        except (httpx.HTTPError, ValueError):
            raise UpstreamUnavailable("the identity provider did not answer") from None
        needed = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
        if not isinstance(document, dict) or any(
            not isinstance(document.get(k), str) for k in needed
        ):
            raise UpstreamUnavailable("the identity provider's metadata is incomplete")
        if document["issuer"] != self.issuer:
            # OpenID Connect Discovery 4.3: a document for another issuer is not this one's.
            raise UpstreamUnavailable("the identity provider's metadata names another issuer")
        with self._lock:
            self._document, self._fetched = document, time.monotonic()
            self._jwks = PyJWKClient(document["jwks_uri"], lifespan=300, timeout=int(TIMEOUT_S))
        return document

    def authorization_endpoint(self) -> str | None:
        """The authorization endpoint, if discovery has already found it (never fetches)."""
        with self._lock:
            document = self._document
        endpoint = document.get("authorization_endpoint") if document else None
        return endpoint if isinstance(endpoint, str) else None

    def _client(self, redirect_uri: str) -> Any:
        return OAuth2Client(
            client_id=self.client_id,
            client_secret=self._secret,
            token_endpoint_auth_method="client_secret_basic" if self._secret else "none",
            scope=self.scope,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            timeout=TIMEOUT_S,
            follow_redirects=False,
            trust_env=False,
        )

    def start(self, redirect_uri: str) -> Login:
        """A fresh state, nonce and PKCE verifier, and the authorization URL that uses them."""
        document = self.discovery()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = generate_token(64)
        client = self._client(redirect_uri)
        try:
            url, _ = client.create_authorization_url(
                document["authorization_endpoint"],
                state=state,
                nonce=nonce,
                code_verifier=verifier,
            )
        finally:
            client.close()
        return Login(url=str(url), state=state, nonce=nonce, verifier=verifier)

    def finish(self, redirect_uri: str, *, code: str, verifier: str, nonce: str) -> Answer:
        """Exchange the code (with the PKCE verifier); return the access token once the
        ID token has been checked: signature, issuer, audience, expiry and nonce."""
        document = self.discovery()
        client = self._client(redirect_uri)
        try:
            token = client.fetch_token(
                document["token_endpoint"],
                grant_type="authorization_code",
                code=code,
                code_verifier=verifier,
            )
        except OAuthError:
            raise SignInFailed("the identity provider refused the sign-in; try again") from None
        except (httpx.HTTPError, ValueError):
            raise UpstreamUnavailable("the identity provider did not answer") from None
        finally:
            client.close()
        access, id_token = token.get("access_token"), token.get("id_token")
        if not isinstance(access, str) or not isinstance(id_token, str):
            raise SignInFailed("the identity provider sent no ID token or access token")
        claims = self._id_claims(id_token)
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(
            claims["nonce"], nonce
        ):
            raise SignInFailed("the sign-in answer belongs to another login; try again")
        return Answer(access_token=access, subject=str(claims["sub"]))

    def _id_claims(self, id_token: str) -> dict[str, Any]:
        jwks = self._jwks
        if jwks is None:
            raise RuntimeError("the provider's keys are read by discovery(), which has not run")
        try:
            key = jwks.get_signing_key_from_jwt(id_token).key
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key,
                algorithms=["RS256", "ES256", "EdDSA", "PS256"],
                issuer=self.issuer,
                audience=self.client_id,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWKClientConnectionError:
            raise UpstreamUnavailable("the identity provider's keys could not be fetched") from None
        except (jwt.PyJWTError, TypeError):
            raise SignInFailed("the ID token did not verify; try again") from None
        return claims
