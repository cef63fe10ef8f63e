"""A local Meta Graph API for WhatsApp Embedded Signup, on 127.0.0.1.

It follows /work/shared/research/oauth-providers.md (Meta section):

| path                                 | what                                                   |
| GET /{version}/oauth/access_token    | client_id, client_secret, code -> a business token      |
| GET /{version}/debug_token           | input_token; the app token (id|secret) as Bearer        |
| GET /{version}/me                    | Bearer business token -> the client business id        |
| GET /{version}/{waba_id}             | Bearer business token -> the WABA (the connection test) |

`signup(...)` stands for the browser part (FB.login and the WA_EMBEDDED_SIGNUP message):
it returns a code and the ids the platform's page would post. A code works once and for
30 s of the fake's clock; otherwise Graph's error envelope with code 100 and subcode
36009 (used) or 36007 (expired). A business token never expires, unless the signup asked
for 60 days; a revoked or expired token gets code 190. Nothing is logged.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.shopify_oauth import FakeClock
from tests.support.loopback import LoopbackServer, QuietHandler

CODE_TTL_S = 30
SIXTY_DAYS_S = 60 * 24 * 3600


@dataclass(frozen=True)
class Signup:
    """What the platform's page holds after Embedded Signup: the code and the three ids."""

    code: str
    waba_id: str
    phone_number_id: str
    business_id: str

    def body(self) -> dict[str, str]:
        """The JSON the page posts to the broker."""
        return {
            "code": self.code,
            "waba_id": self.waba_id,
            "phone_number_id": self.phone_number_id,
            "business_id": self.business_id,
        }


@dataclass
class _Code:
    signup: Signup
    issued_at: float
    expires_in: int | None
    used: bool = False


@dataclass
class _Token:
    signup: Signup
    expires_at: float | None
    revoked: bool = False


class FakeMetaGraph(LoopbackServer):
    """Graph's code exchange, debug_token, /me and WABA read; a context manager."""

    thread_name = "fake-meta-graph"
    join_handlers = False

    def __init__(
        self, *, app_id: str, app_secret: str, clock: FakeClock, version: str = "v21.0"
    ) -> None:
        super().__init__()
        self.app_id = app_id
        self.app_secret = app_secret
        self.clock = clock
        self.version = version
        # When False, the exchange answers only the token (as the ES page shows), and
        # the expiry is only in debug_token.
        self.exchange_says_expiry = True
        self.calls: Counter[str] = Counter()
        self._codes: dict[str, _Code] = {}
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """Graph's endpoints, answered from this fake's state."""
        return _make_handler(self)

    # -- what tests do ----------------------------------------------------------------------

    def signup(self, *, sixty_days: bool = False) -> Signup:
        """A customer finishing Embedded Signup: a fresh code and new WABA/phone/business ids."""
        # Graph ids start with 1 (102290129340398); a random 15-digit run starting with
        # 3-6 would pass Luhn one time in ten, and the card-data guard would refuse it.
        ids = [str(10**14 + secrets.randbelow(10**14)) for _ in range(3)]
        done = Signup("AQ" + secrets.token_urlsafe(48), *ids)
        with self._lock:
            self._codes[done.code] = _Code(
                done, self.clock.now(), SIXTY_DAYS_S if sixty_days else None
            )
        return done

    def token_valid(self, token: str) -> bool:
        """Whether Graph would accept the business token now."""
        with self._lock:
            return self._alive(self._tokens.get(token))

    def revoke(self, token: str) -> None:
        """The customer removed the app, or Meta invalidated the token."""
        with self._lock:
            self._tokens[token].revoked = True

    # -- the endpoints ----------------------------------------------------------------------

    def _alive(self, token: _Token | None) -> bool:
        if token is None or token.revoked:
            return False
        return token.expires_at is None or token.expires_at > self.clock.now()

    def exchange(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """GET /oauth/access_token: client_id, client_secret and code, no redirect_uri."""
        self.calls["exchange"] += 1
        if query.get("client_id") != self.app_id or query.get("client_secret") != self.app_secret:
            return _error(400, "Error validating client secret.", "OAuthException", 1)
        if "redirect_uri" in query:
            return _error(400, "Error validating verification code.", "OAuthException", 100, 36008)
        with self._lock:
            code = self._codes.get(query.get("code") or "")
            if code is None:
                return _error(400, "Invalid verification code format.", "OAuthException", 100)
            if code.used:
                return _error(
                    400, "This authorization code has been used.", "OAuthException", 100, 36009
                )
            code.used = True
            if self.clock.now() - code.issued_at > CODE_TTL_S:
                return _error(
                    400, "This authorization code has expired.", "OAuthException", 100, 36007
                )
            token = "EAAG" + secrets.token_urlsafe(64).replace("-", "x").replace("_", "y")
            expires_at = self.clock.now() + code.expires_in if code.expires_in else None
            self._tokens[token] = _Token(code.signup, expires_at)
        body: dict[str, Any] = {"access_token": token, "token_type": "bearer"}
        if self.exchange_says_expiry and code.expires_in:
            body["expires_in"] = code.expires_in
        return 200, body

    def debug_token(self, query: dict[str, str], bearer: str | None) -> tuple[int, dict[str, Any]]:
        """GET /debug_token: about `input_token`, asked with the app token."""
        self.calls["debug_token"] += 1
        if bearer != f"{self.app_id}|{self.app_secret}":
            return _error(400, "Invalid OAuth access token.", "OAuthException", 190)
        with self._lock:
            token = self._tokens.get(query.get("input_token") or "")
            if token is None:
                return _error(400, "Invalid OAuth access token.", "OAuthException", 190)
            waba = token.signup.waba_id
            data = {
                "app_id": self.app_id,
                "type": "SYSTEM_USER",
                "application": "Platform",
                "expires_at": int(token.expires_at) if token.expires_at else 0,
                "data_access_expires_at": 0,
                "is_valid": self._alive(token),
                "scopes": ["whatsapp_business_management", "whatsapp_business_messaging"],
                "granular_scopes": [
                    {"scope": "whatsapp_business_management", "target_ids": [waba]},
                    {"scope": "whatsapp_business_messaging", "target_ids": [waba]},
                ],
            }
        return 200, {"data": data}

    def read(self, path: str, bearer: str | None) -> tuple[int, dict[str, Any]]:
        """GET /me or /{waba_id} with the business token."""
        self.calls["read"] += 1
        with self._lock:
            token = self._tokens.get(bearer or "")
            if not self._alive(token):
                message = "Error validating access token: Session has expired."
                return _error(400, message, "OAuthException", 190)
            assert token is not None
            if path == "me":
                business = token.signup.business_id
                return 200, {"id": "1" + token.signup.waba_id, "client_business_id": business}
            if path == token.signup.waba_id:
                return 200, {"id": path, "name": "Customer WABA"}
        return _error(400, "Unsupported get request.", "GraphMethodException", 100, 33)


def _error(
    status: int, message: str, kind: str, code: int, subcode: int | None = None
) -> tuple[int, dict[str, Any]]:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "A" + secrets.token_hex(10)
    return status, {"error": error}


def _make_handler(fake: FakeMetaGraph) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # queries carry codes, tokens and the app secret

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.answer(status, data, {"Content-Type": "application/json; charset=UTF-8"})

        def do_GET(self) -> None:
            path, _, raw = self.path.partition("?")
            query = dict(urllib.parse.parse_qsl(raw))
            auth = self.headers.get("Authorization") or ""
            bearer = auth[7:] if auth.startswith("Bearer ") else query.get("access_token")
            prefix = f"/{fake.version}/"
            if not path.startswith(prefix):
                self._send(*_error(404, "Unknown path components", "OAuthException", 2500))
                return
            rest = path[len(prefix) :]
            if rest == "oauth/access_token":
                self._send(*fake.exchange(query))
            elif rest == "debug_token":
                self._send(*fake.debug_token(query, bearer))
            else:
                self._send(*fake.read(rest, bearer))

    return Handler
