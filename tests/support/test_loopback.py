"""The loopback base: 127.0.0.1 only, a port of its own, and nothing left running after it."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.support.loopback import QuietHandler, Serving


class _Slow(QuietHandler):
    release = threading.Event()
    started = threading.Event()

    def do_GET(self) -> None:
        self.started.set()
        self.release.wait(5)
        self.answer(200, b"late", {"Content-Type": "text/plain"})


class _Hello(QuietHandler):
    def do_GET(self) -> None:
        self.answer(200, b"hello", {"Content-Type": "text/plain"})


def test_it_listens_on_loopback_only_and_stops_on_exit() -> None:
    with Serving(_Hello) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        answer = httpx.get(server.base_url)
        assert (answer.status_code, answer.text) == (200, "hello")
        url = server.base_url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_down_and_up_keep_the_port() -> None:
    with Serving(_Hello) as server:
        port = server.port
        server.unlisten()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.base_url, timeout=2)
        server.listen()
        assert server.port == port
        assert httpx.get(server.base_url).text == "hello"


def test_handler_threads_are_joined_when_it_stops() -> None:
    before = set(threading.enumerate())
    with Serving(_Slow) as server:
        caller = threading.Thread(
            target=lambda: httpx.get(server.base_url, timeout=10), daemon=True
        )
        caller.start()
        assert _Slow.started.wait(5)
        # Released only while the server is stopping, as a fake's `stopping` event does:
        # the exit must wait for the handler rather than leave it running.
        timer = threading.Timer(0.2, _Slow.release.set)
        timer.start()
    assert _Slow.release.is_set()
    caller.join(5)
    timer.join(5)
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and t is not caller]
    assert left == []
