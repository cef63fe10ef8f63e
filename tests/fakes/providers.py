"""Local stand-ins for the provider APIs the broker tests credentials against.

One ``ThreadingHTTPServer`` on 127.0.0.1 serves all five APIs at the same base URL and
checks authentication the way the real services do, answering with their JSON shapes:

| provider    | path                                  | auth                          |
| twilio      | /2010-04-01/Accounts/{sid}.json       | basic account_sid:auth_token  |
| woocommerce | [/prefix]/wp-json/wc/v3/products      | basic consumer_key:secret     |
| shopify     | /admin/api/{version}/shop.json        | X-Shopify-Access-Token        |
| whatsapp    | /v{major}.{minor}/{business_id}       | Authorization: Bearer         |
| openai      | /v1/models                            | Bearer (+ OpenAI-Organization)|

Twilio's Keys API and OpenAI's admin service accounts are served too, with keys minted
there authenticating until deleted (or expired): see tests/fakes/provider_keys.py.

Faults per provider: `fail_with` (a status, 429/503 with Retry-After), `delay` (slow),
`go_down` (the connection is closed without an answer).

Nothing is logged; requests are kept in memory only, and their repr hides credentials.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

from tests.fakes.provider_keys import (
    MAX_EXPIRES_IN_S,
    OPENAI_ADMIN,
    OPENAI_PROJECT,
    OPENAI_SERVICE_ACCOUNT,
    OPENAI_SERVICE_ACCOUNTS,
    TWILIO_AUTH_ERROR,
    TWILIO_KEY,
    TWILIO_KEYS,
    TWILIO_NOT_FOUND,
    KeyRegistry,
    openai_error,
)
from tests.support.loopback import LoopbackServer, QuietHandler

PROVIDER_NAMES = ("twilio", "woocommerce", "shopify", "whatsapp", "openai")

VALID: dict[str, dict[str, str]] = {
    "twilio": {
        "account_sid": "AC3f2b8c1d9e0a4b5c6d7e8f9012345678",
        "auth_token": "ac0aa73af0216cbb3ce55e63e84b756d",
        "webhook_secret": "twilio-webhook-7Hq2Lx9Pz4Kd",
    },
    "woocommerce": {
        # store_url is left out: tests point it at the fake's base_url.
        "consumer_key": "ck_ec265cbb59216f56004d1dd1e77a795348ed68ac",
        "consumer_secret": "cs_209f70c2c9406c25bd807fbfb62e53cec53cd4d2",
        "webhook_secret": "woo-webhook-Jx8#nB2$vQ5!",
    },
    "shopify": {
        "shop_domain": "demo-shop.myshopify.com",
        "access_token": "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",
        "webhook_secret": "shopify-webhook-3b2504b1883be262",
    },
    "whatsapp": {
        "business_id": "102290129340398",
        "access_token": "EAAGm0PX4ZCpsBAlBbuSe4B6vgQQMFMcidveMMqXzWBjruIFKirHedFC10xohA7Y98Jw",
    },
    "openai": {
        "api_key": "sk-proj-lBbuSe4B6vgQQMFMcidveMMqX-zWBjruIFKirHedFC10xohA7Y98Jw",
        "org_id": "org-Q1w2E3r4T5y6U7i8",
    },
}
"""One realistic, format-valid set of credentials per provider; the fake accepts them."""

UPSTREAM_DETAIL = "fake-upstream-internal-detail-5c1e"
"""Planted in every error body the fake sends, so tests can prove it never leaks."""

AUTH_ERROR_MESSAGES = (
    "Authenticate",
    "woocommerce_rest_authentication_error",
    "[API] Invalid API key or access token",
    "Incorrect API key provided",
    "Invalid OAuth access token.",
)
"""Distinctive text of the fake's 401 bodies (a reason shown to users must contain none)."""

_SENSITIVE_HEADERS = frozenset({"authorization", "x-shopify-access-token", "openai-organization"})

_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("twilio_keys", TWILIO_KEYS),
    ("twilio_key", TWILIO_KEY),
    ("openai_service_accounts", OPENAI_SERVICE_ACCOUNTS),
    ("openai_service_account", OPENAI_SERVICE_ACCOUNT),
    ("openai_project", OPENAI_PROJECT),
    ("twilio", re.compile(r"/2010-04-01/Accounts/([^/]+)\.json")),
    ("woocommerce", re.compile(r"(?:/.*)?/wp-json/wc/v3/products")),
    ("shopify", re.compile(r"/admin/api/[0-9]{4}-[0-9]{2}/shop\.json")),
    ("whatsapp", re.compile(r"/v[0-9]+\.[0-9]+/([^/]+)")),
    ("openai", re.compile(r"/v1/models")),
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received.  Header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    provider: str

    def __repr__(self) -> str:
        shown = {
            name: ("<redacted>" if name in _SENSITIVE_HEADERS else value)
            for name, value in self.headers.items()
        }
        return (
            f"RecordedRequest(method={self.method!r}, path={self.path!r}, "
            f"provider={self.provider!r}, headers={shown!r})"
        )


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


_GRAPH_CODE_EXCHANGE = re.compile(r"/v[0-9]+\.[0-9]+/oauth/access_token")
_GRAPH_BAD_CODE = {
    "error": {
        "message": "Invalid verification code format.",
        "type": "OAuthException",
        "code": 100,
        "fbtrace_id": "AbCdEfGhIjK",
    }
}


def _basic(headers: dict[str, str]) -> tuple[str, str] | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _error_body(provider: str, status: int) -> Any:
    """What each API sends for a non-auth failure (rate limit, outage...)."""
    detail = f"Internal error {UPSTREAM_DETAIL}"
    if provider == "twilio":
        return {"code": 20500, "message": detail, "more_info": "", "status": status}
    if provider == "woocommerce":
        return {"code": "internal_server_error", "message": detail, "data": {"status": status}}
    if provider == "shopify":
        return {"errors": detail}
    if provider == "whatsapp":
        return {"error": {"message": detail, "type": "OAuthException", "code": 2}}
    return {"error": {"message": detail, "type": "server_error", "code": None}}


class FakeProviders(LoopbackServer):
    """All five provider APIs on one local server; use it as a context manager."""

    thread_name = "fake-providers"

    def __init__(self) -> None:
        super().__init__()
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[RecordedRequest] = []
        self.on_request: Callable[[str], None] | None = None
        self.hook_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._accepted: dict[str, list[dict[str, str]]] = {}
        self._failures: dict[str, int] = {}
        self._delays: dict[str, float] = {}
        self._redirects: dict[str, str] = {}
        self._down: set[str] = set()
        self._retry_after = "30"
        self.keys = KeyRegistry()
        self.reset()

    # ------------------------------------------------------------- lifecycle

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The five providers' APIs, answered from this fake's state."""
        return _make_handler(self)

    # ------------------------------------------------------------- behaviour

    def accept(self, provider: str, **fields: str) -> None:
        """Accept another set of credentials for ``provider``."""
        self._check_provider(provider)
        with self._lock:
            self._accepted[provider].append(dict(fields))

    def revoke(self, provider: str, **fields: str) -> None:
        """Stop accepting credentials that match ``fields`` (a key revoked at the provider)."""
        self._check_provider(provider)
        with self._lock:
            self._accepted[provider] = [
                accepted
                for accepted in self._accepted[provider]
                if any(accepted.get(name) != value for name, value in fields.items())
            ]

    def fail_with(self, provider: str, status: int, *, retry_after: str = "30") -> None:
        """Answer every request for ``provider`` with ``status`` (500, 503, 429...).

        429 and 503 carry ``Retry-After: retry_after``.
        """
        self._check_provider(provider)
        with self._lock:
            self._failures[provider] = status
            self._retry_after = retry_after

    def go_down(self, provider: str) -> None:
        """Close every connection for ``provider`` without answering (until reset)."""
        self._check_provider(provider)
        with self._lock:
            self._down.add(provider)

    def come_back(self, provider: str) -> None:
        """Undo ``go_down`` and ``fail_with`` for ``provider``."""
        with self._lock:
            self._down.discard(provider)
            self._failures.pop(provider, None)
            self._delays.pop(provider, None)

    def delay(self, provider: str, seconds: float) -> None:
        """Sleep ``seconds`` before answering (cut short when the fake stops)."""
        self._check_provider(provider)
        with self._lock:
            self._delays[provider] = seconds

    def redirect(self, provider: str, location: str) -> None:
        """Answer with a 302 to ``location``."""
        self._check_provider(provider)
        with self._lock:
            self._redirects[provider] = location

    def reset(self) -> None:
        """Back to the initial state: only VALID accepted, no failures, nothing recorded."""
        with self._lock:
            self._accepted = {name: [dict(VALID[name])] for name in PROVIDER_NAMES}
            self._failures.clear()
            self._delays.clear()
            self._redirects.clear()
            self._down.clear()
            self._retry_after = "30"
            self.hits.clear()
            self.requests.clear()
            self.hook_errors.clear()
            self.on_request = None
        self.keys.reset()

    @staticmethod
    def _check_provider(provider: str) -> None:
        if provider not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {provider!r}")

    # ------------------------------------------------------------- answering

    def _answer(
        self, path: str, headers: dict[str, str], method: str = "GET", body: bytes = b""
    ) -> _Answer | None:
        """The response for one request, or None to hang up without answering."""
        route = path.split("?", 1)[0]
        provider, handler, match = _route(route, method)
        with self._lock:
            self.hits[provider] += 1
            self.requests.append(RecordedRequest(method, path, headers, provider))
        if match is None and _GRAPH_CODE_EXCHANGE.fullmatch(route):
            # No code is ever issued here: Graph's answer to one it does not know.
            return _Answer(400, _GRAPH_BAD_CODE)
        if match is None:
            return _Answer(404, {"message": "Not Found"})
        failed = self._hook_failed(provider)
        if failed is not None:
            return failed
        return self._behave(provider, handler, match, method, headers, body)

    def _hook_failed(self, provider: str) -> _Answer | None:
        """Run the test's `on_request` hook; its exception is kept and answered with a 500."""
        hook = self.on_request
        if hook is None:
            return None
        try:
            hook(provider)
        except Exception as exc:  # surfaced to the test through hook_errors
            with self._lock:
                self.hook_errors.append(exc)
            return _Answer(500, _error_body(provider, 500))
        return None

    def _behave(
        self,
        provider: str,
        handler: str,
        match: re.Match[str],
        method: str,
        headers: dict[str, str],
        body: bytes,
    ) -> _Answer | None:
        """The fault the test set for `provider` (down, slow, redirect, failure), or its API."""
        with self._lock:
            delay = self._delays.get(provider)
            location = self._redirects.get(provider)
            failure = self._failures.get(provider)
            down = provider in self._down
            retry_after = self._retry_after
            accepted = [dict(item) for item in self._accepted[provider]]
        if down or (delay is not None and self.stopping.wait(delay)):
            return None
        if location is not None:
            return _Answer(302, {}, {"Location": location})
        if failure is not None:
            extra = {"Retry-After": retry_after} if failure in (429, 503) else {}
            return _Answer(failure, _error_body(provider, failure), extra)
        if handler != provider:
            keyed: _Answer = getattr(self, f"_{handler}")(method, match, headers, body, accepted)
            return keyed
        answer: _Answer = getattr(self, f"_{provider}")(match, headers, accepted)
        return answer

    # ------------------------------------------------------- minted keys

    def _twilio_minter(self, account_sid: str, headers: dict[str, str], accepted: Any) -> bool:
        """The Keys API takes the account's auth token or a Main key; Standard keys never."""
        auth = _basic(headers)
        if auth is None:
            return False
        if auth[0] == account_sid:
            return any(
                (item.get("account_sid"), item.get("auth_token")) == auth for item in accepted
            )
        return self.keys.is_main_key(account_sid, auth[0], auth[1])

    def _twilio_keys(
        self, method: str, match: re.Match[str], headers: dict[str, str], body: bytes, accepted: Any
    ) -> _Answer:
        account_sid = match.group(1)
        if not self._twilio_minter(account_sid, headers, accepted):
            return _Answer(401, TWILIO_AUTH_ERROR)
        if method == "GET":
            keys = [
                self.keys.twilio_key_json(k, with_secret=False)
                for k in self.keys.twilio_keys(account_sid)
            ]
            return _Answer(200, {"keys": keys, "page": 0, "page_size": 1000, "next_page_uri": None})
        if method != "POST":
            return _Answer(405, {"code": 20004, "message": "Method not allowed", "status": 405})
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        name = (form.get("FriendlyName") or [""])[0]
        if len(name) > 64:
            return _Answer(
                400, {"code": 21200, "message": "FriendlyName is too long", "status": 400}
            )
        key = self.keys.create_twilio_key(account_sid, name)
        return _Answer(201, self.keys.twilio_key_json(key, with_secret=True))

    def _twilio_key(
        self, method: str, match: re.Match[str], headers: dict[str, str], body: bytes, accepted: Any
    ) -> _Answer:
        account_sid, sid = match.group(1), match.group(2)
        if not self._twilio_minter(account_sid, headers, accepted):
            return _Answer(401, TWILIO_AUTH_ERROR)
        if method == "DELETE":
            if self.keys.delete_twilio_key(account_sid, sid):
                return _Answer(204, None)
            return _Answer(404, TWILIO_NOT_FOUND)
        found = next((k for k in self.keys.twilio_keys(account_sid) if k.sid == sid), None)
        if method != "GET" or found is None:
            return _Answer(404, TWILIO_NOT_FOUND)
        return _Answer(200, self.keys.twilio_key_json(found, with_secret=False))

    def _openai_admin(self, headers: dict[str, str], project_id: str) -> _Answer | None:
        """None when the admin key is right for the project, else OpenAI's refusal."""
        if _bearer(headers) != OPENAI_ADMIN["api_key"]:
            return _Answer(401, openai_error("Invalid admin API key provided.", "invalid_api_key"))
        if project_id != OPENAI_ADMIN["project_id"]:
            return _Answer(
                404, openai_error(f"No such project: {project_id}", "not_found", "not_found_error")
            )
        return None

    def _openai_project(
        self, method: str, match: re.Match[str], headers: dict[str, str], body: bytes, accepted: Any
    ) -> _Answer:
        refused = self._openai_admin(headers, match.group(1))
        if refused is not None:
            return refused
        return _Answer(
            200,
            {
                "object": "organization.project",
                "id": match.group(1),
                "name": "Demo project",
                "created_at": 1711471533,
                "archived_at": None,
                "status": "active",
            },
        )

    def _openai_service_accounts(
        self, method: str, match: re.Match[str], headers: dict[str, str], body: bytes, accepted: Any
    ) -> _Answer:
        project_id = match.group(1)
        refused = self._openai_admin(headers, project_id)
        if refused is not None:
            return refused
        if method == "GET":
            data = [
                self.keys.service_account_json(a, with_key=False)
                for a in self.keys.service_accounts_of(project_id)
            ]
            return _Answer(
                200,
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": False,
                },
            )
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = None
        name = request.get("name") if isinstance(request, dict) else None
        expires = request.get("expires_in_seconds") if isinstance(request, dict) else None
        if not isinstance(name, str) or not name:
            return _Answer(400, openai_error("'name' is a required property", "invalid_value"))
        if expires is not None and (
            not isinstance(expires, int)
            or isinstance(expires, bool)
            or not 1 <= expires <= MAX_EXPIRES_IN_S
        ):
            return _Answer(
                400,
                openai_error(
                    f"expires_in_seconds must be between 1 and {MAX_EXPIRES_IN_S}", "invalid_value"
                ),
            )
        account = self.keys.create_service_account(project_id, name, expires)
        return _Answer(200, self.keys.service_account_json(account, with_key=True))

    def _openai_service_account(
        self, method: str, match: re.Match[str], headers: dict[str, str], body: bytes, accepted: Any
    ) -> _Answer:
        project_id, account_id = match.group(1), match.group(2)
        refused = self._openai_admin(headers, project_id)
        if refused is not None:
            return refused
        if method == "DELETE" and self.keys.delete_service_account(project_id, account_id):
            return _Answer(
                200,
                {
                    "object": "organization.project.service_account.deleted",
                    "id": account_id,
                    "deleted": True,
                },
            )
        return _Answer(
            404,
            openai_error(f"No such service account: {account_id}", "not_found", "not_found_error"),
        )

    def _twilio(self, match: re.Match[str], headers: dict[str, str], accepted: Any) -> _Answer:
        auth = _basic(headers)
        if (
            auth is not None
            and auth[0].startswith("SK")
            and self.keys.twilio_key_valid(match.group(1), auth[0], auth[1])
        ):
            # An API key authenticates for the account in the path (twilio-python
            # sends the AC sid in the URL and SK:secret as Basic auth).
            auth = (match.group(1), "")
            accepted = [{"account_sid": match.group(1), "auth_token": ""}]
        if auth is None or not any(
            (item.get("account_sid"), item.get("auth_token")) == auth for item in accepted
        ):
            return _Answer(
                401,
                {
                    "code": 20003,
                    "detail": "Your AccountSid or AuthToken was incorrect.",
                    "message": "Authenticate",
                    "more_info": "https://www.twilio.com/docs/errors/20003",
                    "status": 401,
                },
            )
        sid = match.group(1)
        if sid != auth[0]:
            return _Answer(
                404,
                {
                    "code": 20404,
                    "message": "The requested resource was not found",
                    "more_info": "https://www.twilio.com/docs/errors/20404",
                    "status": 404,
                },
            )
        return _Answer(
            200,
            {
                "sid": sid,
                "friendly_name": "Demo account",
                "status": "active",
                "type": "Full",
                "uri": f"/2010-04-01/Accounts/{sid}.json",
            },
        )

    def _woocommerce(self, match: re.Match[str], headers: dict[str, str], accepted: Any) -> _Answer:
        auth = _basic(headers)
        if auth is None:
            return _Answer(
                401,
                {
                    "code": "woocommerce_rest_cannot_view",
                    "message": "Sorry, you cannot list resources.",
                    "data": {"status": 401},
                },
            )
        keys = [item for item in accepted if item.get("consumer_key") == auth[0]]
        if not keys or not any(item.get("consumer_secret") == auth[1] for item in keys):
            message = "Consumer secret is invalid." if keys else "Consumer key is invalid."
            return _Answer(
                401,
                {
                    "code": "woocommerce_rest_authentication_error",
                    "message": message,
                    "data": {"status": 401},
                },
            )
        return _Answer(
            200,
            [
                {
                    "id": 794,
                    "name": "Premium Quality",
                    "slug": "premium-quality",
                    "status": "publish",
                    "price": "21.99",
                    "stock_status": "instock",
                }
            ],
            {"X-WP-Total": "1", "X-WP-TotalPages": "1"},
        )

    def _shopify(self, match: re.Match[str], headers: dict[str, str], accepted: Any) -> _Answer:
        token = headers.get("x-shopify-access-token")
        found = next((item for item in accepted if item.get("access_token") == token), None)
        if token is None or found is None:
            return _Answer(
                401,
                {
                    "errors": (
                        "[API] Invalid API key or access token "
                        "(unrecognized login or wrong password)"
                    )
                },
            )
        domain = found.get("shop_domain", "demo-shop.myshopify.com")
        return _Answer(
            200,
            {
                "shop": {
                    "id": 548380009,
                    "name": "Demo Shop",
                    "myshopify_domain": domain,
                    "domain": domain,
                    "plan_name": "basic",
                    "currency": "USD",
                }
            },
        )

    def _whatsapp(self, match: re.Match[str], headers: dict[str, str], accepted: Any) -> _Answer:
        token = _bearer(headers)
        owned = [
            item for item in accepted if token is not None and item.get("access_token") == token
        ]
        if not owned:
            return _Answer(
                401,
                {
                    "error": {
                        "message": "Invalid OAuth access token.",
                        "type": "OAuthException",
                        "code": 190,
                        "fbtrace_id": "AbCdEfGhIjK",
                    }
                },
            )
        business_id = match.group(1)
        if not any(item.get("business_id") == business_id for item in owned):
            # What Graph answers for an id that does not exist or the token cannot see.
            return _Answer(
                400,
                {
                    "error": {
                        "message": (
                            f"Unsupported get request. Object with ID '{business_id}' does "
                            "not exist, cannot be loaded due to missing permissions, or does "
                            "not support this operation."
                        ),
                        "type": "GraphMethodException",
                        "code": 100,
                        "error_subcode": 33,
                        "fbtrace_id": "AbCdEfGhIjK",
                    }
                },
            )
        return _Answer(
            200,
            {
                "id": business_id,
                "name": "Demo Business",
                "currency": "USD",
                "timezone_id": "1",
                "message_template_namespace": "demo_namespace",
            },
        )

    def _openai(self, match: re.Match[str], headers: dict[str, str], accepted: Any) -> _Answer:
        token = _bearer(headers)
        found = next((item for item in accepted if token and item.get("api_key") == token), None)
        minted = self.keys.openai_key(token) if token else None
        if minted is not None:
            found = {"api_key": token}
        if found is None:
            shown = f"{token[:3]}****{token[-4:]}" if token and len(token) > 8 else ""
            return _Answer(
                401,
                {
                    "error": {
                        "message": (
                            f"Incorrect API key provided: {shown}. You can find your API key "
                            "at https://platform.openai.com/account/api-keys."
                        ),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        org = headers.get("openai-organization")
        if org is not None and org != found.get("org_id"):
            return _Answer(
                401,
                {
                    "error": {
                        "message": (
                            "OpenAI-Organization header should match organization for API key"
                        ),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "mismatched_organization",
                    }
                },
            )
        return _Answer(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": "gpt-4o-mini",
                        "object": "model",
                        "created": 1721172741,
                        "owned_by": "system",
                    }
                ],
            },
        )


class _Handler(QuietHandler):
    """The five providers' paths; `fake` is the FakeProviders whose state answers."""

    protocol_version = "HTTP/1.1"
    timeout = 5  # a client that never sends its request cannot pin the thread
    fake: ClassVar[FakeProviders]

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _reply(
        self,
        status: int,
        body: Any,
        headers: Mapping[str, str] | None = None,
        *,
        none_is_empty: bool = True,
    ) -> None:
        """Answer JSON (no body for None, unless told) and close; a client that gave up is fine."""
        data = b"" if body is None and none_is_empty else json.dumps(body).encode()
        sent = {"Content-Type": "application/json; charset=utf-8"} if data else {}
        self.answer(status, data, sent | dict(headers or {}))

    def do_GET(self) -> None:
        answer = self.fake._answer(self.path, self._headers())
        self.close_connection = True
        if answer is not None:
            self._reply(answer.status, answer.body, answer.headers, none_is_empty=False)

    def _keyed(self) -> bool:
        """Twilio's Keys API and OpenAI's admin API; False for any other path."""
        route = self.path.split("?", 1)[0]
        if not (route.startswith("/2010-04-01/") or route.startswith("/v1/organization/")):
            return False
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.fake._answer(self.path, self._headers(), self.command, body)
        self.close_connection = True
        if answer is not None:
            self._reply(answer.status, answer.body, answer.headers)
        return True

    def do_DELETE(self) -> None:
        if not self._keyed():
            self.send_error(404)

    def do_POST(self) -> None:
        if self._keyed():
            return
        # Shopify's token endpoint, which knows no app here: OAuth flows are tested
        # against tests/fakes/shopify_oauth.py; this answers as Shopify would a stranger.
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/admin/oauth/access_token":
            self._reply(401, {"error": "invalid_client", "error_description": "unknown app"})
        else:
            self._reply(404, {"errors": "Not Found"})


def _route(route: str, method: str) -> tuple[str, str, re.Match[str] | None]:
    """The provider, its handler's name and the path's match (None: no API answers it)."""
    for name, pattern in _ROUTES:
        match = pattern.fullmatch(route)
        if match is not None:
            provider = name.split("_", 1)[0]
            # Twilio's and OpenAI's read paths only read; their keys APIs have own routes.
            if method != "GET" and name in ("twilio", "openai"):
                return provider, name, None
            return provider, name, match
    return "unknown", "unknown", None


def _make_handler(fake: FakeProviders) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": fake})
