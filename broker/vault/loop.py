"""HTTP/1.1 to Vault on the event loop: keep-alive connections of one running loop.

The credential fetch makes two Vault calls (a KV read, a Transit decrypt). Made
through hvac in a worker thread, the hop to the thread and back, hvac, and
`http.client` (whose header parsing goes through the `email` package) cost the
broker more CPU than Vault spent answering. This client sends the request from
the loop itself and parses the answer with httptools (the parser uvicorn uses).

It is deliberately small, and does not decide anything: it sends one request to
one address and returns the status and body, or raises. Which node, which token,
the time budget, retries, failover and the meaning of an error all stay with
the gateway (`VaultGateway.call_on_loop`), which hands anything but a definite
answer to its ordinary, threaded `call`.

Connections belong to the loop that opened them: the app's lifespan opens a
`LoopClient` on its serving loop and closes it on the way out. Idle connections
are kept (up to `maxsize` per address); one the server closed while idle is seen
closed by the loop (EOF) and dropped. A call that fails or is cancelled half way
(a timeout) closes its connection rather than reuse it in an unknown state.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from broker.vault.errors import InvalidHeader


@dataclass(frozen=True)
class LoopAnswer:
    """Status and whole body of one answer (the body may hold secrets)."""

    status: int
    data: bytes = field(repr=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed by httptools."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[LoopAnswer] | None = None
        self._body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.close()  # nothing was asked: the connection is out of step
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(http.client.BadStatusLine("Vault's answer could not be parsed"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or http.client.RemoteDisconnected("Vault closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None and not self._answer.done():
            self.keep_alive = self._parser.should_keep_alive()
            status = self._parser.get_status_code()
            self._answer.set_result(LoopAnswer(status, b"".join(self._body)))

    async def exchange(self, request: bytes) -> LoopAnswer:
        """Send `request`; the whole answer. Closes the connection on any failure."""
        if self.transport is None:
            raise ConnectionError("not connected")
        self._answer = asyncio.get_running_loop().create_future()
        self._body = []
        try:
            self.transport.write(request)
            return await self._answer
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drop the connection now: no TLS close_notify exchange left pending on the loop."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)


# What would end a header line early (or a C string): a value holding one cannot be sent.
_LINE_BREAK = re.compile("[\r\n\x00]")


def _request_bytes(
    method: str, target: str, netloc: str, headers: dict[str, str], body: bytes | None
) -> bytes:
    """The request head and body; a header HTTP cannot carry raises `InvalidHeader`."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
    for name, value in headers.items():
        if _LINE_BREAK.search(value):
            raise InvalidHeader(f"header {name} has a line break")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidHeader("a request header is not Latin-1 text") from None
    return head + (body or b"")


class LoopClient:
    """Keep-alive connections to Vault addresses, for the loop it was opened on."""

    def __init__(self, *, tls: ssl.SSLContext, maxsize: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._tls = tls
        self._maxsize = maxsize
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    async def request(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None = None
    ) -> LoopAnswer:
        """Send one request to `url` (http or https) and read the whole answer.

        Raises `OSError` (refused, reset, TLS), `http.client.HTTPException` (closed or
        malformed answer) or `InvalidHeader`; the caller bounds the time it waits.
        """
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = _request_bytes(method, target, parts.netloc, headers, body)
        conn = self._idle_connection(origin) or await self._connect(
            parts.scheme, parts.hostname or "", parts.port
        )
        answer = await conn.exchange(request)
        self._release(origin, conn)
        return answer

    async def close(self) -> None:
        """Close the idle connections, on the client's loop, and let their sockets go."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        await asyncio.sleep(0)  # the loop closes an aborted transport's socket on its next turn

    def _idle_connection(self, origin: str) -> _Connection | None:
        conns = self._idle.get(origin) or []
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, scheme: str, host: str, port: int | None) -> _Connection:
        tls = self._tls if scheme == "https" else None
        # The port always explicit, as in the threaded transport.
        _, conn = await self.loop.create_connection(
            _Connection,
            host,
            port or (443 if scheme == "https" else 80),
            ssl=tls,
            server_hostname=host if tls else None,
        )
        return conn

    def _release(self, origin: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or not conn.keep_alive or conn.closed or len(idle) >= self._maxsize:
            conn.close()
        else:
            idle.append(conn)
