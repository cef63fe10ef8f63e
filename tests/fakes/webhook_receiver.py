"""A webhook receiver on 127.0.0.1 that verifies Standard Webhooks signatures, like a real one.

It checks every delivery with the `standardwebhooks` library against the
endpoint's secret (once the test hands it over) and keeps what it received.
Its behaviour is switchable: answer 2xx, fail with a status (503, 410...),
hold a request until released (to kill a worker mid-delivery), or stop
listening altogether (`down()` / `up()` on the same port).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.loopback import LoopbackServer


@dataclass(frozen=True)
class Received:
    """One delivery as it arrived."""

    webhook_id: str
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    verified: bool
    payload: Any = field(default=None, repr=False)


class WebhookReceiver(LoopbackServer):
    """A receiver; use it as a context manager."""

    thread_name = "webhook-receiver"
    join_handlers = False

    def __init__(self) -> None:
        super().__init__()
        self.secret: str | None = None
        self.received: list[Received] = []
        self.status = 204
        self.retry_after: str | None = None
        self.hold = False
        self.held = threading.Event()
        self.held_ids: list[str] = []
        self._release = threading.Event()
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """Deliveries, verified and kept; answered as the test set."""
        return _handler(self)

    def close(self) -> None:
        """Release held requests, then stop."""
        self._release.set()
        super().close()

    def up(self) -> None:
        """Listen again, on the same port: deliveries arrive again."""
        self.listen()

    def down(self) -> None:
        """Stop listening: connections are refused until `up()`."""
        self.unlisten()

    @property
    def url(self) -> str:
        return f"{self.base_url}/hooks"

    def release(self) -> None:
        """Let held requests finish (and stop holding new ones)."""
        self.hold = False
        self._release.set()

    # -- what arrived ---------------------------------------------------------------

    def verified(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.verified]

    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id for r in self.received]

    def _record(self, headers: dict[str, str], body: bytes) -> None:
        verified, payload = False, None
        if self.secret is not None:
            try:
                payload = Webhook(self.secret).verify(body, headers)
                verified = True
            except (WebhookVerificationError, ValueError):
                verified = False
        with self._lock:
            self.received.append(
                Received(headers.get("webhook-id", ""), headers, body, verified, payload)
            )


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if receiver.hold:
                receiver.held_ids.append(headers.get("webhook-id", ""))
                receiver.held.set()
                receiver._release.wait(60)
                # A held request is the one a killed worker sent: it counts as lost.
                self.close_connection = True
                return
            receiver._record(headers, body)
            self.send_response(receiver.status)
            if receiver.retry_after is not None:
                self.send_header("Retry-After", receiver.retry_after)
            answer = json.dumps({"ok": receiver.status < 300}).encode()
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    return Handler
