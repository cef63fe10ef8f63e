"""A local OpenID Connect provider on 127.0.0.1, for the console's production sign-in.

from tests.support.loopback import LoopbackServer, QuietHandler

| GET  /.well-known/openid-configuration | discovery                                            |
| GET  /jwks                             | the signing key (RS256)                              |
| GET  /authorize                        | code flow; PKCE S256 required; 302 with code + state |
| POST /token                            | code exchange: client auth, redirect_uri, verifier   |

Whoever is in `user` signs in at once (a session at the provider); with `user = None` the
provider answers `error=access_denied`. Codes are single-use and live 60 s. The access
token carries the broker's claims (`scope`, `tenant_id`) for the broker's audience; the ID
token is for the client, with the request's nonce. `id_token_nonce` (when set) replaces
the nonce, to play a token minted for another login.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.loopback import LoopbackServer, QuietHandler

CODE_TTL_S = 60
TOKEN_TTL_S = 3600


class FakeOIDC(LoopbackServer):
    """An OpenID Connect provider for one client; a context manager."""

    thread_name = "fake-oidc"
    join_handlers = False

    def __init__(self, *, client_id: str, client_secret: str, audience: str) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.redirect_uris: list[str] = []
        self.user: dict[str, Any] | None = None
        self.id_token_nonce: str | None = None
        self.token_requests: list[dict[str, str]] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)
        self._codes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """Discovery, authorize, token and JWKS, answered from this fake's state."""
        return _make_handler(self)

    @property
    def issuer(self) -> str:
        """The provider's issuer URL (also its base URL)."""
        return self.base_url

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [public | {"kid": self._kid, "use": "sig", "alg": "RS256"}]}

    def authorize(self, query: dict[str, str]) -> str | None:
        """The redirect for an authorization request, or None for a request refused outright."""
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id or redirect_uri not in self.redirect_uris:
            return None
        if query.get("response_type") != "code" or "openid" not in query.get("scope", "").split():
            return None
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return None  # this provider insists on PKCE
        state = query.get("state", "")
        if self.user is None:
            answer = {"error": "access_denied", "state": state}
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = {
                    "redirect_uri": redirect_uri,
                    "challenge": query["code_challenge"],
                    "nonce": query.get("nonce"),
                    "user": dict(self.user),
                    "expires": time.time() + CODE_TTL_S,
                }
            answer = {"code": code, "state": state}
        return f"{redirect_uri}?{urllib.parse.urlencode(answer)}"

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        """The code exchange."""
        self.token_requests.append({k: v for k, v in form.items() if k != "client_secret"})
        scheme, _, encoded = authorization.partition(" ")
        try:
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            client_id, secret = "", ""
        if scheme.lower() != "basic" or (client_id, secret) != (
            self.client_id,
            self.client_secret,
        ):
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)
        if grant is None or grant["expires"] < time.time():
            return 400, {"error": "invalid_grant"}
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        if not verifier or not secrets.compare_digest(challenge, grant["challenge"]):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        user = grant["user"]
        access = {
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "exp": now + TOKEN_TTL_S,
            "jti": secrets.token_hex(8),
            **user,
        }
        identity = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": user["sub"],
            "iat": now,
            "exp": now + TOKEN_TTL_S,
            "nonce": self.id_token_nonce or grant["nonce"],
        }
        return 200, {
            "access_token": self._sign(access),
            "id_token": self._sign(identity),
            "token_type": "Bearer",
            "expires_in": TOKEN_TTL_S,
        }

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid})


class _Handler(QuietHandler):
    """Discovery, JWKS, authorize and token; `fake` is the FakeOIDC whose state answers."""

    fake: ClassVar[FakeOIDC]

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/.well-known/openid-configuration":
            self._send(200, self.fake.discovery())
        elif path == "/jwks":
            self._send(200, self.fake.jwks())
        elif path == "/authorize":
            self._authorize(dict(urllib.parse.parse_qsl(query)))
        else:
            self._send(404, {"error": "not_found"})

    def _authorize(self, params: dict[str, str]) -> None:
        location = self.fake.authorize(params)
        if location is None:
            self._send(400, {"error": "invalid_request"})
        else:
            self._send(302, {}, {"Location": location})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        if self.path != "/token":
            self._send(404, {"error": "not_found"})
            return
        self._send(*self.fake.token(form, self.headers.get("Authorization", "")))


def _make_handler(fake: FakeOIDC) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": fake})
