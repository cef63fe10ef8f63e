"""A loopback TCP proxy in front of Vault that holds chosen requests back.

Real faults, not mocks: the broker talks to a real OpenBao through this proxy,
and a rule delays every request whose first bytes match, before Vault sees it.
A KV write delayed past the broker's timeout reaches Vault, and lands, after
the broker has given up on it: the "ambiguous write" of a slow raft commit or
a paused process. A rule with an empty prefix delays everything: a hung Vault.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

_CHUNK = 65536


class SlowProxy:
    """Forward 127.0.0.1:<port> to `upstream` ("http://127.0.0.1:8200"), with delays."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.addr = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._rules: list[tuple[bytes, float, bool]] = []  # (prefix, seconds, once)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="slowproxy", daemon=True)

    def __enter__(self) -> SlowProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def delay(self, prefix: bytes, seconds: float, *, once: bool = False) -> None:
        """Hold back every request starting with `prefix` (b"" for all) by `seconds`;
        with `once`, only the first such request."""
        with self._lock:
            self._rules.append((prefix, seconds, once))

    def clear(self) -> None:
        """Forward everything at once again (requests already held still wait)."""
        with self._lock:
            self._rules.clear()

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _held_for(self, chunk: bytes) -> float:
        with self._lock:
            matching = [rule for rule in self._rules if chunk.startswith(rule[0])]
            # A rule for one request only is spent on the first it holds.
            self._rules = [rule for rule in self._rules if not (rule[2] and rule in matching)]
            return max((seconds for _, seconds, _ in matching), default=0.0)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, target, requests in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, target, requests), daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while not self._stopping.is_set():
                chunk = source.recv(_CHUNK)
                if not chunk:
                    break
                if requests:
                    held = self._held_for(chunk)
                    if held:
                        # Holds this connection's later bytes too, so order is kept.
                        time.sleep(held)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            # A client that gave up is not passed on to Vault as a closed connection
            # (which could cancel the request): the held request still reaches Vault
            # whole, and the connection ends once Vault's answer finds nobody there.
            if not requests:
                for sock in (source, target):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
