"""A local Shopify for OAuth: consent redirect, token endpoint and Admin API on 127.0.0.1.

It follows /work/shared/research/oauth-providers.md:

| path                                  | what                                                  |
| GET  /admin/oauth/authorize           | consent: 302 to redirect_uri with an HMAC-signed query |
| GET  /admin/login?shop=...            | a browser signs in to a shop's admin (a cookie)        |
| POST /admin/oauth/authorize           | the consent page's "Install app": the same 302         |
| POST /admin/oauth/access_token        | code exchange, refresh, token exchange (form or JSON) |
| GET  /admin/api/{version}/shop.json   | X-Shopify-Access-Token; 401 when unknown or expired   |

On Shopify the shop is the request's host (`{shop}.myshopify.com`). Here the consent page
reads it from the Host header; the broker reaches every shop at this one base URL, so
the token endpoint and the Admin API find the shop from the code or token instead. Time is the
fake's own `clock`, which tests move forward. With `expiring=1` an access token lasts
3600 s and comes with a rotating refresh token: using refresh token R returns a new pair
(A', R'); R stays usable until R' is used, after which R is `invalid_grant`. A new grant
for a shop (code exchange, token exchange) retires every older refresh token. Token
exchange revokes the pasted token it is given and, repeated with it within 7 days,
answers the same set until that set is refreshed. `lose_next_refresh_reply` and
`lose_next_exchange_reply` make the next such request take effect and then hang up;
`refresh_reply_delay_s`, or clearing `refresh_replies`, holds a refresh's answer after it
has rotated (`refresh_rotated` is set then), so a test can kill the process waiting for it.

Nothing is logged; tokens live in memory only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

from tests.support.loopback import LoopbackServer, QuietHandler

ACCESS_TTL_S = 3600
REFRESH_TTL_S = 90 * 24 * 3600
CODE_TTL_S = 600
EXCHANGE_REPLAY_S = 7 * 24 * 3600
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
OFFLINE_TOKEN_TYPE = "urn:shopify:params:oauth:token-type:offline-access-token"
# A browser signed in to a shop's admin (GET /admin/login?shop=...) carries this cookie; the
# consent page then shows that shop, and "Install app" redirects back with a signed query.
SHOP_COOKIE = "fake_shopify_shop"


class FakeClock:
    """Epoch seconds that a test moves forward; shared by the fake and the broker.

    With a `path`, every move is also written there (the offset in seconds), so broker
    processes started by a test follow the same time (tests/support/broker_process.py).
    """

    def __init__(self, path: Path | None = None) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()
        self._path = path
        if path is not None:
            path.write_text("0")

    @property
    def path(self) -> Path | None:
        """The file the offset is written to, if any."""
        return self._path

    def now(self) -> float:
        """The current fake time."""
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self._offset += seconds
            if self._path is not None:
                self._path.write_text(repr(self._offset))


def sign(params: dict[str, str], secret: str) -> str:
    """Shopify's callback HMAC: every param but `hmac`/`signature`, sorted, joined by `&`."""
    message = "&".join(
        f"{name}={value}"
        for name, value in sorted(params.items())
        if name not in ("hmac", "signature")
    )
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


@dataclass
class _Access:
    shop: str
    expires_at: float | None


@dataclass
class _Shop:
    # The newest refresh token, and the one it was obtained with (usable until the
    # newest is used).
    current: str | None = None
    parent: str | None = None
    refresh_expiry: dict[str, float] = field(default_factory=dict)
    scope: str = ""


class FakeShopifyOAuth(LoopbackServer):
    """Shopify's OAuth and Admin API for any number of shops; a context manager."""

    thread_name = "fake-shopify-oauth"

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        clock: FakeClock,
        scopes: str = "read_products,read_orders",
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock
        self.granted_scopes = scopes
        self.allowed_redirect_uris: list[str] = []
        self.refresh_calls = 0
        self.exchange_calls = 0
        self.refresh_calls_by_shop: Counter[str] = Counter()
        # What `expires_in` says for new access tokens (Shopify: one hour).
        self.access_ttl_s = ACCESS_TTL_S
        self.lose_next_refresh_reply = False
        self.lose_next_exchange_reply = False
        # After a refresh has rotated, wait this long before answering (a slow Shopify,
        # or time for a test to kill the process waiting for the answer).
        self.refresh_reply_delay_s = 0.0
        self.refresh_rotated = threading.Event()
        # Cleared: refresh replies wait (after rotating) until it is set again, so a test
        # can hold refreshes in flight until something else has happened.
        self.refresh_replies = threading.Event()
        self.refresh_replies.set()
        self._exchanged: dict[str, tuple[str, dict[str, Any], float]] = {}
        self._lock = threading.Lock()
        self._codes: dict[str, tuple[str, float]] = {}
        self._used_codes: set[str] = set()
        self._access: dict[str, _Access] = {}
        self._issued: set[str] = set()
        self._shops: dict[str, _Shop] = {}

    # ------------------------------------------------------------- lifecycle

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """Shopify's OAuth endpoints and Admin API, answered from this fake's state."""
        return _make_handler(self)

    # ------------------------------------------------------------- test helpers

    def callback_query(
        self, *, shop: str, state: str, code: str | None = None, secret: str | None = None
    ) -> dict[str, str]:
        """What Shopify appends to the redirect_uri, signed (with `secret` to forge one)."""
        if code is None:
            code = self._new_code(shop)
        params = {
            "code": code,
            "host": _host_param(shop),
            "shop": shop,
            "state": state,
            "timestamp": str(int(self.clock.now())),
        }
        params["hmac"] = sign(params, secret or self.client_secret)
        return params

    def issue_offline_token(self, shop: str) -> str:
        """A non-expiring offline access token, as apps received before expiring tokens."""
        with self._lock:
            token = "shpat_" + secrets.token_hex(16)
            self._access[token] = _Access(shop, None)
            self._issued.add(token)
            return token

    def token_valid(self, token: str) -> bool:
        """Whether the Admin API would accept `token` now."""
        with self._lock:
            return self._access_ok(token)

    def refresh_token_valid(self, shop: str, token: str) -> bool:
        """Whether a refresh with `token` would be accepted now."""
        with self._lock:
            state = self._shops.get(shop)
            return state is not None and token in (state.current, state.parent)

    def issued_tokens(self) -> set[str]:
        """Every access and refresh token this fake has issued, for canary scans."""
        with self._lock:
            return set(self._issued)

    def revoke_grant(self, shop: str) -> None:
        """The merchant uninstalled the app: every refresh token of the shop dies."""
        with self._lock:
            self._shops[shop] = _Shop()

    # ------------------------------------------------------------- internals

    def _new_code(self, shop: str) -> str:
        code = secrets.token_hex(16)
        with self._lock:
            self._codes[code] = (shop, self.clock.now())
        return code

    def _access_ok(self, token: str) -> bool:
        found = self._access.get(token)
        if found is None:
            return False
        return found.expires_at is None or self.clock.now() < found.expires_at

    def _new_pair(self, shop: str, state: _Shop) -> dict[str, Any]:
        now = self.clock.now()
        access = "shpat_" + secrets.token_hex(16)
        refresh = "shprt_" + secrets.token_hex(16)
        self._access[access] = _Access(shop, now + self.access_ttl_s)
        state.refresh_expiry[refresh] = now + REFRESH_TTL_S
        self._issued.update((access, refresh))
        return {
            "access_token": access,
            "scope": state.scope or self.granted_scopes,
            "expires_in": self.access_ttl_s,
            "refresh_token": refresh,
            "refresh_token_expires_in": REFRESH_TTL_S,
        }

    def _grant(self, shop: str, expiring: bool) -> dict[str, Any]:
        """A new grant for a shop: older refresh tokens die at once."""
        state = _Shop(scope=self.granted_scopes)
        self._shops[shop] = state
        if not expiring:
            token = "shpat_" + secrets.token_hex(16)
            self._access[token] = _Access(shop, None)
            self._issued.add(token)
            return {"access_token": token, "scope": self.granted_scopes}
        pair = self._new_pair(shop, state)
        state.current = pair["refresh_token"]
        return pair

    def token_endpoint(self, form: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
        """Answer one token request: (status, body); body None means the reply is lost."""
        if form.get("client_id") != self.client_id or not hmac.compare_digest(
            form.get("client_secret", ""), self.client_secret
        ):
            return 401, {
                "error": "invalid_client",
                "error_description": "Client authentication failed",
            }
        grant = form.get("grant_type", "authorization_code")
        expiring = form.get("expiring") == "1"
        with self._lock:
            if grant == "refresh_token":
                return self._refresh(form.get("refresh_token", ""))
            if grant == TOKEN_EXCHANGE:
                return self._exchange(form, expiring)
            code = form.get("code", "")
            issued = self._codes.pop(code, None)
            if issued is None or code in self._used_codes:
                return 400, {
                    "error": "invalid_request",
                    "error_description": "The authorization code was not found or was already used",
                }
            self._used_codes.add(code)
            shop, at = issued
            if self.clock.now() - at > CODE_TTL_S:
                return 400, {
                    "error": "invalid_request",
                    "error_description": "The authorization code was not found or was already used",
                }
            return 200, self._grant(shop, expiring)

    def _refresh(self, token: str) -> tuple[int, dict[str, Any] | None]:
        self.refresh_calls += 1
        shop, state = next(
            ((name, s) for name, s in self._shops.items() if token in (s.current, s.parent)),
            ("", None),
        )
        if state is None or state.refresh_expiry.get(token, 0) <= self.clock.now():
            return 400, {
                "error": "invalid_grant",
                "error_description": "The refresh token is invalid or has been revoked",
            }
        self.refresh_calls_by_shop[shop] += 1
        pair = self._new_pair(shop, state)
        self.refresh_rotated.set()
        if token == state.current:
            # The replacement is used: the token before it is retired.
            state.parent, state.current = token, pair["refresh_token"]
        else:
            # The parent again (the replacement's reply was lost): a new replacement.
            state.current = pair["refresh_token"]
        if self.lose_next_refresh_reply:
            self.lose_next_refresh_reply = False
            return 200, None
        return 200, pair

    def _exchange(self, form: dict[str, str], expiring: bool) -> tuple[int, dict[str, Any] | None]:
        self.exchange_calls += 1
        subject = form.get("subject_token", "")
        if form.get("subject_token_type") != OFFLINE_TOKEN_TYPE or (
            form.get("requested_token_type") != OFFLINE_TOKEN_TYPE
        ):
            return 400, {"error": "invalid_request", "error_description": "Bad token types"}
        earlier = self._exchanged.get(subject)
        if earlier is not None:
            # Repeating with the revoked token within 7 days returns the same pair, until
            # that pair is refreshed or replaced.
            shop, pair, at = earlier
            state = self._shops.get(shop)
            if (
                self.clock.now() - at < EXCHANGE_REPLAY_S
                and state is not None
                and state.current == pair.get("refresh_token")
                and state.parent is None
            ):
                return 200, dict(pair)
        found = self._access.get(subject)
        if found is None or found.expires_at is not None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid subject token"}
        del self._access[subject]  # revoked on success, irreversibly
        pair = self._grant(found.shop, expiring)
        self._exchanged[subject] = (found.shop, dict(pair), self.clock.now())
        if self.lose_next_exchange_reply:
            self.lose_next_exchange_reply = False
            return 200, None
        return 200, pair

    def admin_api(self, token: str | None) -> tuple[int, dict[str, Any]]:
        """GET shop.json."""
        with self._lock:
            found = self._access.get(token or "")
            if token is None or found is None or not self._access_ok(token):
                return 401, {"errors": "[API] Invalid API key or access token (unrecognized login)"}
            return 200, {
                "shop": {"id": 548380009, "name": "Demo Shop", "myshopify_domain": found.shop}
            }

    def refuses(self, query: dict[str, str]) -> bool:
        """Whether Shopify would refuse this authorization request outright (a 400)."""
        if query.get("client_id") != self.client_id:
            return True
        redirect_uri = query.get("redirect_uri", "")
        if redirect_uri not in self.allowed_redirect_uris or not query.get("state"):
            return True
        return "grant_options[]" in query  # online tokens are not what the broker asks for

    def authorize(self, shop: str, query: dict[str, str]) -> tuple[int, dict[str, str]]:
        """The merchant approves at once: 302 to the redirect_uri with a signed query."""
        if self.refuses(query):
            return 400, {}
        params = self.callback_query(shop=shop, state=query["state"])
        return 302, {"Location": f"{query['redirect_uri']}?{urllib.parse.urlencode(params)}"}

    def consent_page(self, shop: str, query: dict[str, str]) -> str:
        """What a signed-in merchant's browser sees: the app, the shop, the scopes, Install."""
        fields = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in query.items()
        )
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            "<title>Install app</title></head><body>"
            f"<h1>Install this app on {html.escape(shop)}?</h1>"
            f"<p>It asks to: {html.escape(query.get('scope', ''))}</p>"
            f'<form method="post" action="/admin/oauth/authorize">{fields}'
            '<button type="submit" id="install">Install app</button></form></body></html>'
        )


def _host_param(shop: str) -> str:
    return base64.b64encode(f"{shop}/admin".encode()).decode().rstrip("=")


class _Handler(QuietHandler):
    """Shopify's endpoints; `fake` is the FakeShopifyOAuth whose state answers."""

    protocol_version = "HTTP/1.1"
    timeout = 5
    fake: ClassVar[FakeShopifyOAuth]

    def _shop(self) -> str:
        return (self.headers.get("Host") or "").split(":", 1)[0].lower()

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.answer(
            status, data, {"Content-Type": "application/json; charset=utf-8"} | (headers or {})
        )

    def _page(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self.answer(
            status, text.encode(), {"Content-Type": "text/html; charset=utf-8"} | (headers or {})
        )

    def _signed_in_shop(self) -> str | None:
        """The shop whose admin this browser is signed in to (a cookie, as on Shopify)."""
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SHOP_COOKIE and value.endswith(".myshopify.com"):
                return value
        return None

    def _body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode()

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        if path == "/admin/login":
            self._sign_in(params.get("shop", ""))
        elif path == "/admin/oauth/authorize":
            self._authorize_page(params)
        elif path.startswith("/admin/api/") and path.endswith("/shop.json"):
            self._send(*self.fake.admin_api(self.headers.get("X-Shopify-Access-Token")))
        else:
            self._send(404, {"errors": "Not Found"})

    def _sign_in(self, shop: str) -> None:
        # A browser signs in to a shop's admin; the consent page then knows the shop
        # (on Shopify the host tells it, here every shop shares one address).
        cookie = f"{SHOP_COOKIE}={shop}; Path=/; HttpOnly; SameSite=Lax"
        self._page(200, f"<p>Signed in to {html.escape(shop)}</p>", {"Set-Cookie": cookie})

    def _authorize_page(self, params: dict[str, str]) -> None:
        if self._shop().endswith(".myshopify.com"):
            status, headers = self.fake.authorize(self._shop(), params)
            self._send(status, {}, headers)
            return
        shop = self._signed_in_shop()
        if shop is None or self.fake.refuses(params):
            self._page(400, "<p>Log in to your store first, or a bad request.</p>")
        else:
            self._page(200, self.fake.consent_page(shop, params))

    def do_POST(self) -> None:
        if self.path == "/admin/oauth/authorize":
            self._install()
        elif self.path == "/admin/oauth/access_token":
            self._token()
        else:
            self._send(404, {"errors": "Not Found"})

    def _install(self) -> None:
        """The merchant clicked Install on the consent page."""
        form = dict(urllib.parse.parse_qsl(self._body()))
        shop = self._signed_in_shop()
        if shop is None:
            self._page(400, "<p>Log in to your store first.</p>")
            return
        status, headers = self.fake.authorize(shop, form)
        self._send(status, {}, headers)

    def _token(self) -> None:
        raw = self._body()
        if (self.headers.get("Content-Type") or "").startswith("application/json"):
            form = {str(k): str(v) for k, v in json.loads(raw or "{}").items()}
        else:
            form = dict(urllib.parse.parse_qsl(raw))
        status, body = self.fake.token_endpoint(form)
        if form.get("grant_type") == "refresh_token" and not self._refresh_reply_may_go():
            return
        if body is None:
            # The refresh happened; its answer never arrives.
            self.close_connection = True
            return
        self._send(status, body)

    def _refresh_reply_may_go(self) -> bool:
        """Hold a refresh's answer as the test set (delay, or until released); False if stopped."""
        fake = self.fake
        if fake.refresh_reply_delay_s and fake.stopping.wait(fake.refresh_reply_delay_s):
            return False
        while not fake.refresh_replies.wait(0.05):
            if fake.stopping.is_set():
                return False
        return True


def _make_handler(fake: FakeShopifyOAuth) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": fake})
