"""The HTTP transport under hvac: keep-alive connections per node, audited headers, no redirects.

hvac builds the URLs, the request bodies and the error mapping; this module only
moves bytes, with the standard library's `http.client` (which parses HTTP/1.1,
chunked bodies included) over a small pool of kept-alive connections per node.

Why not hvac's default (`requests`), or urllib3 under it: on the credential-fetch
path the broker makes two Vault calls, and the client library cost about as
much as Vault did. Per call, on the bench machine (one KV read; wall / CPU in
the calling process): `requests` 1.8 / 0.82 ms, urllib3 1.4 / 0.41 ms,
`http.client` 1.2 / 0.23 ms. `requests` merges environment settings and looks
up proxies on every call; urllib3 normalises pool keys, builds Retry and
Timeout objects and wraps every response. None of that is needed to talk to a
fixed set of Vault addresses.

What the pool does, and does not:
- one connection per thread at a time; idle ones are kept (LIFO, up to
  `maxsize` per node) and checked before reuse: a connection the server closed
  while idle is readable (EOF), so it is dropped rather than written to;
- no retries of its own and no redirects: the gateway retries across nodes
  within its budget, and a 3xx (a standby pointing at a dead leader) comes back
  as `StandbyRedirect`;
- proxy environment variables (`HTTPS_PROXY`, `NO_PROXY`) are not consulted;
- TLS is verified against the configured CA file, or the system trust store;
- transport failures surface as `OSError` (refused, reset, timed out, TLS) or
  `http.client.HTTPException` (a malformed or truncated answer); see
  `broker.vault.errors` for which of them are retried;
- a header value HTTP cannot carry raises `InvalidHeader`, naming the header,
  never its value (it may be the token).
"""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import hvac.adapters

from broker.vault.errors import InvalidHeader, StandbyRedirect

JSON = "application/json"

# The socket timeout of the call being made, when the gateway has less time left in
# the request's budget than the configured timeout (see `attempt_timeout`).
_attempt_timeout: ContextVar[float | None] = ContextVar("vault_attempt_timeout", default=None)


@contextmanager
def attempt_timeout(seconds: float) -> Iterator[None]:
    """Calls made inside wait at most `seconds` for each socket operation."""
    token = _attempt_timeout.set(seconds)
    try:
        yield
    finally:
        _attempt_timeout.reset(token)


@dataclass(frozen=True)
class VaultResponse:
    """A Vault answer that is not a 200 with a JSON body (a 204, a 3xx, an error).

    The few attributes of `requests.Response` that hvac and the broker read.
    """

    status_code: int
    headers: http.client.HTTPMessage = field(repr=False)  # case-insensitive .get
    content: bytes = field(repr=False)

    @property
    def ok(self) -> bool:
        """As in requests: anything below 400."""
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Node:
    """Idle keep-alive connections to one `scheme://host:port`."""

    def __init__(
        self,
        *,
        scheme: str,
        netloc: str,
        tls: ssl.SSLContext | None,
        timeout_s: float,
        maxsize: int,
    ) -> None:
        parts = urlsplit(f"{scheme}://{netloc}")
        self._host = parts.hostname or ""
        # Always explicit: given none, http.client would read the last group of an
        # IPv6 literal ("fd00::1") as the port.
        self._port = parts.port or (443 if scheme == "https" else 80)
        self._tls = tls if scheme == "https" else None
        self._timeout_s = timeout_s
        self._maxsize = maxsize
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._lock = threading.Lock()

    def connect(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        """A new (not yet connected) connection; http.client connects on first use."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def acquire(self) -> http.client.HTTPConnection:
        """An idle connection that is still open, or a new one."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if _still_open(conn):
                return conn
            conn.close()
        return self.connect()

    def release(self, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose answer was read in full, unless enough are kept."""
        with self._lock:
            if not self._closed and len(self._idle) < self._maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections; a busy one is closed when its call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """False when the server closed the idle connection (or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return True  # never connected: it connects on first use
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        # poll, not select: select cannot watch descriptors numbered 1024 and up.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Answer:
    """Status, headers and the whole body of one HTTP response."""

    status: int
    headers: http.client.HTTPMessage = field(repr=False)
    data: bytes = field(repr=False)  # may hold secrets


class ConnectionPool:
    """Keep-alive connections to every Vault node, shared by the gateway's threads."""

    def __init__(self, *, verify: bool | str, timeout_s: float, maxsize: int) -> None:
        self._tls = _tls_context(verify)
        self._timeout_s = timeout_s
        self._maxsize = maxsize
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._lock = threading.Lock()
        # A gateway dropped without close() still closes its idle sockets.
        weakref.finalize(self, _close_nodes, self._nodes)

    @property
    def tls(self) -> ssl.SSLContext:
        """The TLS settings every connection to Vault uses (CA file, or the system store)."""
        return self._tls

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        """Send one request and read the whole answer. Never follows redirects.

        With `timeout_s` (health probes) the request goes over a fresh connection
        with that timeout, closed afterwards; otherwise over a pooled one.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("Vault addresses are http:// or https:// URLs")
        node = self._node(parts.scheme, parts.netloc)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if timeout_s is not None:
            conn = node.connect(timeout_s)
        else:
            conn = node.acquire()
            _set_timeout(conn, _attempt_timeout.get() or self._timeout_s)
        try:
            try:
                conn.request(method, target or "/", body=body, headers=dict(headers or {}))
            except (ValueError, UnicodeEncodeError) as exc:
                if isinstance(exc, OSError):  # a TLS failure is a ValueError as well
                    raise
                # http.client quotes the offending header value, which may be the
                # token: say which header, never what it held.
                raise InvalidHeader(_bad_header(headers or {})) from None
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            conn.close()  # in an unknown state: never reuse it
            raise
        if timeout_s is not None or response.will_close:
            conn.close()
        else:
            node.release(conn)
        return Answer(response.status, response.headers, data)

    def close(self) -> None:
        """Close every idle connection (busy ones close when their call ends)."""
        with self._lock:
            _close_nodes(self._nodes)

    def _node(self, scheme: str, netloc: str) -> _Node:
        key = (scheme, netloc)
        node = self._nodes.get(key)
        if node is None:
            with self._lock:
                node = self._nodes.setdefault(
                    key,
                    _Node(
                        scheme=scheme,
                        netloc=netloc,
                        tls=self._tls,
                        timeout_s=self._timeout_s,
                        maxsize=self._maxsize,
                    ),
                )
        return node


def _set_timeout(conn: http.client.HTTPConnection, seconds: float) -> None:
    """Apply `seconds` to a pooled connection, whether or not it is connected yet."""
    conn.timeout = seconds
    if conn.sock is not None:
        conn.sock.settimeout(seconds)


def _bad_header(headers: Mapping[str, str]) -> str:
    for name, value in headers.items():
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"header {name} is not Latin-1 text"
        if any(char in value for char in "\r\n\x00"):
            return f"header {name} has a line break"
    return "a request header is not valid HTTP"


def _close_nodes(nodes: dict[tuple[str, str], _Node]) -> None:
    for node in list(nodes.values()):
        node.close()


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """Verification against a CA file, the system store, or (verify=False) none."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class PooledAdapter(hvac.adapters.RawAdapter):
    """hvac's adapter contract over the shared pool, stamping audited headers.

    Like hvac's JSONAdapter, a 200 with a JSON body comes back as a dict; any
    other success as a `VaultResponse`; an error status raises the hvac
    exception for it, through hvac's own RawAdapter._raise_for_error (it reads
    only what `VaultResponse` has: status_code, headers, text, json()).
    `headers_for_call` supplies the audited headers of the request being served.
    """

    def __init__(
        self,
        *,
        pool: ConnectionPool,
        headers_for_call: Callable[[], dict[str, str]],
        **kwargs: Any,
    ) -> None:
        # hvac's base class builds a requests.Session when given none; hand it a
        # placeholder so it does not, since nothing here uses one.
        kwargs.pop("session", None)
        if kwargs.get("cert"):
            # hvac fills this from VAULT_CLIENT_CERT/VAULT_CLIENT_KEY; the pool's TLS
            # context has no client certificate, so say so rather than ignore it.
            raise ValueError("client certificates for Vault (VAULT_CLIENT_CERT) are not supported")
        super().__init__(session=_NO_SESSION, **kwargs)  # type: ignore[arg-type]
        self._pool = pool
        self._headers_for_call = headers_for_call

    def close(self) -> None:
        """The pool belongs to the gateway, which closes it."""

    def get_login_token(self, response: Any) -> str:
        return str(response["auth"]["client_token"])

    def request(  # type: ignore[no-untyped-def]  # hvac's signature
        self, method, url, headers=None, raise_exception=True, **kwargs
    ):
        while "//" in url:  # Vault reads a double slash as one; so does hvac
            url = url.replace("//", "/")
        url = self.urljoin(self.base_uri, url)
        sent = self._headers(headers, wrap_ttl=kwargs.pop("wrap_ttl", None))
        body = self._body(kwargs, sent)
        params = kwargs.pop("params", None)
        if kwargs:
            raise TypeError(f"unsupported request options: {sorted(kwargs)}")
        if params:
            url = f"{url}?{urlencode(params, doseq=True)}"
        answer = self._pool.request(method.upper(), url, body=body, headers=sent)
        return self._answer(method, url, answer, raise_exception=raise_exception)

    def _headers(self, extra: Mapping[str, str] | None, *, wrap_ttl: object) -> dict[str, str]:
        """The audited headers of the request being served, then Vault's own."""
        sent = self._headers_for_call()
        sent.update(extra or {})
        sent["X-Vault-Request"] = "true"
        if self.token:
            sent["X-Vault-Token"] = self.token
        if self.namespace:
            sent["X-Vault-Namespace"] = self.namespace
        if wrap_ttl:
            sent["X-Vault-Wrap-TTL"] = str(wrap_ttl)
        return sent

    def _answer(self, method: str, url: str, answer: Answer, *, raise_exception: bool) -> Any:
        """A 200's JSON as a dict; otherwise a `VaultResponse`, or the hvac error for it."""
        status = answer.status
        if status == 200:
            try:
                return json.loads(answer.data)
            except ValueError:
                pass
        response = VaultResponse(status, answer.headers, answer.data)
        if not raise_exception or self.ignore_exceptions:
            return response
        if 300 <= status < 400:
            # A standby pointing elsewhere; code expecting a dict must not get it.
            raise StandbyRedirect(
                f"Vault answered {status} (a standby redirecting)", method=method, url=url
            )
        if status >= 400:
            self._raise_for_error(method, url, response)  # type: ignore[attr-defined]  # not in the stubs
        return response

    @staticmethod
    def _body(kwargs: dict[str, Any], headers: dict[str, str]) -> bytes | None:
        if "json" in kwargs:
            payload = kwargs.pop("json")
            if payload is None:
                return None
            headers["Content-Type"] = JSON
            return json.dumps(payload).encode()
        data = kwargs.pop("data", None)
        if data is None or isinstance(data, bytes):
            return data
        return str(data).encode()


class _Placeholder:
    """What hvac's constructor reads off a session (verify, cert, proxies): nothing."""

    verify = None
    cert = None
    proxies = None


_NO_SESSION = _Placeholder()
