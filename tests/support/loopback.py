"""The one base of the tests' local HTTP servers: 127.0.0.1, a thread of its own, stops by itself.

A fake (Stripe, the providers, Shopify's OAuth, an OIDC issuer, a webhook receiver)
subclasses `LoopbackServer`, gives its request handler in `handler()`, and is used
as a context manager: on exit it stops serving and joins its handler threads, so
nothing it started outlives it. Handlers that wait (delays, held requests) wait on
`stopping`, which is set first, so joining them is quick.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"


class _Http(ThreadingHTTPServer):
    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: LoopbackServer
    ) -> None:
        super().__init__(address, handler)
        self.owner = owner

    def get_request(self) -> tuple[socket.socket, Any]:
        self.owner.accepted += 1  # before a TLS handshake, which may fail
        return super().get_request()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose (timeouts, faults); nothing to report


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing: paths, queries and bodies carry codes and tokens."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def answer(self, status: int, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Send one whole response and close the connection; a client that left is no error."""
        self.close_connection = True
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test)


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port), serving on its own thread; a context manager."""

    thread_name = "loopback-http"
    # Handler threads are joined when the server stops, unless a fake's clients may
    # keep idle connections open past it (then they end with the process instead).
    join_handlers = True
    # Serve HTTPS with this context instead of plain HTTP (a test's own CA, say).
    ssl_context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.accepted = 0  # connections accepted, including those whose TLS handshake failed
        self._port = 0
        self._http: _Http | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class, bound to this fake's state."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.stopping.clear()
        self.listen()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: waiting handlers are released and every handler thread joined."""
        self.stopping.set()
        self.unlisten()

    def listen(self) -> None:
        """Listen (again on the same port, once it had one)."""
        http = _Http((HOST, self._port), self.handler(), self)
        http.daemon_threads = not self.join_handlers
        if self.ssl_context is not None:
            http.socket = self.ssl_context.wrap_socket(http.socket, server_side=True)
        self._port = http.server_address[1]
        thread = threading.Thread(
            target=http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.thread_name,
            daemon=True,
        )
        thread.start()
        self._http, self._thread = http, thread

    def unlisten(self) -> None:
        """Stop listening; the port is free again (connections are refused)."""
        http, thread = self._http, self._thread
        self._http = self._thread = None
        if http is None or thread is None:
            return
        http.shutdown()
        http.server_close()  # joins the handler threads when they are not daemonic
        thread.join(5)

    @property
    def listening(self) -> bool:
        """True while the server accepts connections."""
        return self._http is not None

    @property
    def port(self) -> int:
        """The port it listens (or last listened) on."""
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>` (`https://` with an SSL context)."""
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{HOST}:{self.port}"


class Serving(LoopbackServer):
    """A loopback server for a handler class a test defines itself.

    with Serving(Handler) as server:
        httpx.get(f"{server.base_url}/path")
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        join_handlers: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        self._handler = handler
        self.join_handlers = join_handlers
        self.ssl_context = ssl_context

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The test's own handler class."""
        return self._handler
