"""Tests for the SSRF egress guard.

No test sends traffic anywhere but 127.0.0.1: hostile URLs are checked with the socket
layer booby-trapped, names are resolved by an in-memory resolver, and every server is a
thread on 127.0.0.1 that is shut down by its fixture.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from broker.integrations.egress import (
    EgressClient,
    EgressFailed,
    EgressPolicy,
    EgressRefused,
    EgressResponse,
    GuardedTransport,
    screen_url,
)
from tests.support.loopback import Serving

CAP = 1024
SECRET_BODY = "PROVIDER-INTERNAL-STACKTRACE-7f3a9c"

# ---------------------------------------------------------------- fake DNS

FAKE_DNS: dict[str, list[str]] = {
    "public.example.com": ["93.184.216.34"],
    "public6.example.com": ["2606:4700:4700::1111"],
    "xn--exmple-cua.com": ["93.184.216.34"],
    "metadata.google.internal": ["169.254.169.254"],
    "metadata.example.com": ["169.254.169.254"],
    "internal.example.com": ["192.168.1.10"],
    "ten.example.com": ["10.1.2.3"],
    "cgnat.example.com": ["100.64.0.1"],
    "mixed.example.com": ["93.184.216.34", "10.0.0.1"],
    "mixed6.example.com": ["2606:4700:4700::1111", "fd00::1"],
    "mapped.example.com": ["::ffff:169.254.169.254"],
    "nat64.example.com": ["64:ff9b::a9fe:a9fe"],
    "loop.example.com": ["127.0.0.1"],
    "loop6.example.com": ["::1"],
    "linklocal6.example.com": ["fe80::1"],
    "scoped.example.com": ["fe80::1%1"],
    "garbage.example.com": ["not-an-ip"],
    "empty.example.com": [],
    "localhost": ["127.0.0.1"],
}


def fake_resolver(host: str, port: int) -> list[str]:
    try:
        return list(FAKE_DNS[host])
    except KeyError:
        raise OSError("NXDOMAIN") from None


@dataclass
class NetworkSpy:
    """Records (and optionally forbids) every DNS lookup and socket connect."""

    lookups: list[str] = field(default_factory=list)
    connects: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> NetworkSpy:
    """Any DNS lookup or connect fails the test (and is recorded)."""
    spy = NetworkSpy()

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        spy.lookups.append(str(host))
        raise AssertionError(f"unexpected DNS lookup of {host!r}")

    def connect(self: socket.socket, address: Any) -> None:
        spy.connects.append(address)
        raise AssertionError(f"unexpected connect to {address!r}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return spy


@pytest.fixture
def spy_network(monkeypatch: pytest.MonkeyPatch) -> NetworkSpy:
    """Records DNS lookups and connects; lookups of anything but an IP literal fail."""
    spy = NetworkSpy()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        spy.lookups.append(str(host))
        if host not in ("127.0.0.1", "127.0.0.2"):
            # What a rebinding DNS server would answer on a second lookup.
            return real_getaddrinfo("10.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        spy.connects.append((address[0], address[1]))
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return spy


# ------------------------------------------------------------- hostile URLs

STRICT = EgressPolicy()
DEV = EgressPolicy(allow_http=True)
DEV_LOOPBACK = EgressPolicy(allow_http=True, allow_loopback=True)

HOSTILE: list[Any] = [
    # cloud metadata / link-local
    pytest.param("https://169.254.169.254/latest/meta-data/", STRICT, id="metadata-v4"),
    pytest.param("http://169.254.169.254/", DEV_LOOPBACK, id="metadata-v4-loopback-allowed"),
    pytest.param("https://metadata.google.internal/", STRICT, id="metadata-name"),
    pytest.param("http://metadata.google.internal/", DEV_LOOPBACK, id="metadata-name-loopback"),
    pytest.param("https://169.254.1.1/", STRICT, id="link-local-v4"),
    pytest.param("https://[fe80::1]/", STRICT, id="link-local-v6"),
    pytest.param("http://[fe80::1]/", DEV_LOOPBACK, id="link-local-v6-loopback"),
    pytest.param("https://[fe80::1%25eth0]/", STRICT, id="link-local-v6-zone"),
    pytest.param("https://linklocal6.example.com/", DEV_LOOPBACK, id="link-local-v6-name"),
    pytest.param("https://scoped.example.com/", DEV_LOOPBACK, id="scoped-v6-name"),
    # private
    pytest.param("https://10.0.0.1/", STRICT, id="10/8"),
    pytest.param("https://10.255.255.255:8443/", DEV_LOOPBACK, id="10/8-loopback"),
    pytest.param("https://172.16.0.1/", STRICT, id="172.16/12"),
    pytest.param("https://172.31.255.254/", STRICT, id="172.31"),
    pytest.param("https://192.168.0.1/", STRICT, id="192.168/16"),
    pytest.param("https://internal.example.com/", STRICT, id="name-to-192.168"),
    pytest.param("https://ten.example.com/", DEV_LOOPBACK, id="name-to-10/8-loopback"),
    pytest.param("https://100.64.0.1/", STRICT, id="shared-100.64/10"),
    pytest.param("https://100.127.255.254/", STRICT, id="shared-100.127"),
    pytest.param("https://cgnat.example.com/", STRICT, id="name-to-100.64"),
    pytest.param("https://[fc00::1]/", STRICT, id="ula-fc00"),
    pytest.param("https://[fd12:3456::1]/", DEV_LOOPBACK, id="ula-fd00-loopback"),
    pytest.param("https://[fec0::1]/", STRICT, id="site-local-v6"),
    # loopback without allow_loopback
    pytest.param("https://127.0.0.1/", STRICT, id="127.0.0.1"),
    pytest.param("http://127.0.0.1:8080/", DEV, id="127.0.0.1-http"),
    pytest.param("https://127.255.255.254/", STRICT, id="127/8-top"),
    pytest.param("https://[::1]/", STRICT, id="::1"),
    pytest.param("https://localhost/", STRICT, id="localhost"),
    pytest.param("https://localhost./", STRICT, id="localhost-dot"),
    pytest.param("https://LOCALHOST/", STRICT, id="LOCALHOST"),
    pytest.param("https://api.localhost/", STRICT, id="sub.localhost"),
    pytest.param("https://loop.example.com/", STRICT, id="name-to-127"),
    pytest.param("https://loop6.example.com/", STRICT, id="name-to-::1"),
    # IPv6 forms embedding a forbidden IPv4 (refused even with allow_loopback)
    pytest.param("https://[::ffff:127.0.0.1]/", DEV_LOOPBACK, id="v4-mapped-loopback"),
    pytest.param("https://[::ffff:10.0.0.1]/", STRICT, id="v4-mapped-10/8"),
    pytest.param("https://[::ffff:169.254.169.254]/", DEV_LOOPBACK, id="v4-mapped-metadata"),
    pytest.param("https://[::ffff:a9fe:a9fe]/", STRICT, id="v4-mapped-hex-metadata"),
    pytest.param("https://[::127.0.0.1]/", DEV_LOOPBACK, id="v4-compatible-loopback"),
    pytest.param("https://[::8.8.8.8]/", STRICT, id="v4-compatible-public"),
    pytest.param("https://[64:ff9b::a9fe:a9fe]/", DEV_LOOPBACK, id="nat64-metadata"),
    pytest.param("https://[64:ff9b::7f00:1]/", DEV_LOOPBACK, id="nat64-loopback"),
    pytest.param("https://[64:ff9b:1::a00:1]/", STRICT, id="nat64-local-use"),
    pytest.param("https://[2002:a9fe:a9fe::]/", DEV_LOOPBACK, id="6to4-metadata"),
    pytest.param("https://[2002:7f00:1::1]/", DEV_LOOPBACK, id="6to4-loopback"),
    pytest.param("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", STRICT, id="teredo"),
    pytest.param("https://mapped.example.com/", DEV_LOOPBACK, id="name-to-mapped-metadata"),
    pytest.param("https://nat64.example.com/", DEV_LOOPBACK, id="name-to-nat64-metadata"),
    # unspecified, broadcast, reserved, multicast, benchmark, documentation
    pytest.param("https://0.0.0.0/", DEV_LOOPBACK, id="0.0.0.0"),  # noqa: S104 - a refused URL
    pytest.param("https://0.1.2.3/", STRICT, id="0/8"),
    pytest.param("https://[::]/", DEV_LOOPBACK, id="::"),
    pytest.param("https://255.255.255.255/", STRICT, id="broadcast"),
    pytest.param("https://240.0.0.1/", STRICT, id="reserved-240/4"),
    pytest.param("https://224.0.0.1/", STRICT, id="multicast-v4"),
    pytest.param("https://239.255.255.250/", STRICT, id="multicast-ssdp"),
    pytest.param("https://[ff02::1]/", STRICT, id="multicast-v6"),
    pytest.param("https://198.18.0.1/", STRICT, id="benchmark-198.18/15"),
    pytest.param("https://198.19.255.1/", STRICT, id="benchmark-198.19"),
    pytest.param("https://[2001:2::1]/", STRICT, id="benchmark-v6"),
    pytest.param("https://192.0.2.1/", STRICT, id="doc-192.0.2"),
    pytest.param("https://198.51.100.7/", STRICT, id="doc-198.51.100"),
    pytest.param("https://203.0.113.9/", STRICT, id="doc-203.0.113"),
    pytest.param("https://[2001:db8::1]/", STRICT, id="doc-v6"),
    pytest.param("https://192.0.0.9/", STRICT, id="ietf-192.0.0/24"),
    pytest.param("https://192.88.99.1/", STRICT, id="6to4-relay-anycast"),
    # numeric host forms that getaddrinfo would turn into 127.0.0.1
    pytest.param("http://2130706433/", DEV_LOOPBACK, id="decimal-ip"),
    pytest.param("http://0x7f.0.0.1/", DEV_LOOPBACK, id="hex-octet-ip"),
    pytest.param("http://0x7f000001/", DEV_LOOPBACK, id="hex-ip"),
    pytest.param("http://017700000001/", DEV_LOOPBACK, id="octal-ip"),
    pytest.param("http://0177.0.0.1/", DEV_LOOPBACK, id="octal-octet-ip"),
    pytest.param("http://127.1/", DEV_LOOPBACK, id="short-ip"),
    pytest.param("http://127.0.0.01/", DEV_LOOPBACK, id="leading-zero-ip"),
    pytest.param("https://0/", STRICT, id="zero"),
    pytest.param("https://1.2.3.4.5/", STRICT, id="five-octets"),
    pytest.param("https://%31%32%37.0.0.1/", DEV_LOOPBACK, id="percent-encoded-host"),
    pytest.param("https://127\u30020\u30020\u30021/", DEV, id="ideographic-dots"),
    pytest.param("https://\uff11\uff12\uff17.0.0.1/", DEV, id="fullwidth-digits"),
    pytest.param(
        "https://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/",
        DEV,
        id="circled-localhost",
    ),
    pytest.param("https://[0:0:0:0:0:ffff:127.0.0.1]/", DEV_LOOPBACK, id="v4-mapped-long"),
    pytest.param("https://exa\u00admple.com/", STRICT, id="soft-hyphen"),
    # resolution results
    pytest.param("https://mixed.example.com/", STRICT, id="one-of-several-private"),
    pytest.param("https://mixed6.example.com/", STRICT, id="one-of-several-ula"),
    pytest.param("https://garbage.example.com/", STRICT, id="resolver-garbage"),
    pytest.param("https://empty.example.com/", STRICT, id="resolver-empty"),
    pytest.param("https://nxdomain.example.com/", STRICT, id="nxdomain"),
    # scheme
    pytest.param("http://public.example.com/", STRICT, id="http-not-allowed"),
    pytest.param("HTTP://public.example.com/", STRICT, id="HTTP-not-allowed"),
    pytest.param("file:///etc/passwd", DEV_LOOPBACK, id="file"),
    pytest.param("gopher://public.example.com:70/_x", DEV_LOOPBACK, id="gopher"),
    pytest.param("ftp://public.example.com/", DEV_LOOPBACK, id="ftp"),
    pytest.param("ws://public.example.com/", DEV_LOOPBACK, id="ws"),
    pytest.param("dict://public.example.com:11211/", DEV_LOOPBACK, id="dict"),
    pytest.param("//public.example.com/", STRICT, id="scheme-relative"),
    pytest.param("public.example.com/path", STRICT, id="no-scheme"),
    pytest.param("https:public.example.com", STRICT, id="no-slashes"),
    pytest.param("https:/public.example.com/", STRICT, id="one-slash"),
    # userinfo, @, backslashes, junk
    pytest.param("https://user:pass@public.example.com/", STRICT, id="userinfo"),
    pytest.param("https://user@public.example.com/", STRICT, id="user-only"),
    pytest.param("https://@public.example.com/", STRICT, id="empty-userinfo"),
    pytest.param("https://public.example.com@169.254.169.254/", STRICT, id="at-confusion"),
    pytest.param("https://a@b@public.example.com/", STRICT, id="double-at"),
    pytest.param("https://public.example.com\\@169.254.169.254/", STRICT, id="backslash-at"),
    pytest.param("https://public.example.com\\.evil/", STRICT, id="backslash"),
    pytest.param("https://", STRICT, id="empty-host"),
    pytest.param("https:///path", STRICT, id="empty-host-path"),
    pytest.param("https://:443/", STRICT, id="port-only"),
    pytest.param("", STRICT, id="empty-string"),
    pytest.param("https://public.example.com:0/", STRICT, id="port-0"),
    pytest.param("https://public.example.com:65536/", STRICT, id="port-65536"),
    pytest.param("https://public.example.com:443junk/", STRICT, id="port-junk"),
    pytest.param("https://public.example.com:-1/", STRICT, id="port-negative"),
    pytest.param("https://public.example.com./", STRICT, id="trailing-dot"),
    pytest.param("https://public.example.com%00.evil/", STRICT, id="percent-nul"),
    pytest.param("https://public.example.com\x00/", STRICT, id="nul"),
    pytest.param("https://public.example.com /", STRICT, id="space"),
    pytest.param(" https://public.example.com/", STRICT, id="leading-space"),
    pytest.param("https://public.example.com\t/", STRICT, id="tab"),
    pytest.param("https://public.example.com\r\nX-Injected: 1/", STRICT, id="crlf"),
    pytest.param("https://public.example.com\u200b/", STRICT, id="zero-width-space"),
    pytest.param("https://public.example.com\u3000/", STRICT, id="ideographic-space"),
    pytest.param("https://public..example.com/", STRICT, id="empty-label"),
    pytest.param("https://-public.example.com/", STRICT, id="leading-hyphen"),
    pytest.param("https://public_example/", STRICT, id="single-label"),
    pytest.param("https://" + "a" * 64 + ".example.com/", STRICT, id="label-too-long"),
    pytest.param("https://public.example.com/" + "a" * 5000, STRICT, id="url-too-long"),
]


@pytest.mark.parametrize(("url", "policy"), HOSTILE)
def test_hostile_url_is_refused_before_any_connection(
    url: str, policy: EgressPolicy, no_network: NetworkSpy
) -> None:
    client = EgressClient(policy, resolver=fake_resolver)
    with pytest.raises(EgressRefused) as refused:
        client.get(url)
    with pytest.raises(EgressRefused):
        client.check_url(url)
    assert no_network.lookups == []
    assert no_network.connects == []
    # Refusal messages never echo the URL (it may carry credentials).
    assert "pass" not in str(refused.value)
    assert "\n" not in str(refused.value)


def test_hostile_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://public.example.com/x?y=1", ["93.184.216.34"]),
        ("https://PUBLIC.example.com:8443/", ["93.184.216.34"]),
        ("https://public6.example.com/", ["2606:4700:4700::1111"]),
        ("https://exämple.com/", ["93.184.216.34"]),
        ("https://93.184.216.34/", ["93.184.216.34"]),
        ("https://[2606:4700:4700::1111]/", ["2606:4700:4700::1111"]),
        ("https://[64:ff9b::808:808]/", ["64:ff9b::808:808"]),
        ("https://[::ffff:8.8.8.8]/", ["::ffff:808:808"]),
    ],
)
def test_public_urls_pass_the_check_without_network(
    url: str, expected: list[str], no_network: NetworkSpy
) -> None:
    """Control for the corpus: the same resolver and policy accept public targets."""
    checked, addresses = EgressClient(STRICT, resolver=fake_resolver).check_url(url)
    assert checked.scheme == "https"
    assert addresses == expected
    assert no_network.connects == []


def test_credentials_in_url_are_not_echoed(no_network: NetworkSpy) -> None:
    client = EgressClient(STRICT, resolver=fake_resolver)
    with pytest.raises(EgressRefused) as refused:
        client.get("https://admin:hunter2@public.example.com/")
    assert "hunter2" not in str(refused.value)
    assert "admin" not in str(refused.value)


def test_loopback_allowed_only_with_the_flag(no_network: NetworkSpy) -> None:
    allowed = EgressClient(EgressPolicy(allow_loopback=True), resolver=fake_resolver)
    assert allowed.check_url("https://127.0.0.1:9/")[1] == ["127.0.0.1"]
    assert allowed.check_url("https://[::1]:9/")[1] == ["::1"]
    assert allowed.check_url("https://localhost:9/")[1] == ["127.0.0.1"]
    assert allowed.check_url("https://loop.example.com/")[1] == ["127.0.0.1"]
    with pytest.raises(EgressRefused):
        allowed.check_url("http://127.0.0.1:9/")  # allow_http is still off
    with pytest.raises(EgressRefused):
        EgressClient(EgressPolicy(), resolver=fake_resolver).check_url("https://127.0.0.1:9/")


def test_resolver_is_called_with_host_and_port(no_network: NetworkSpy) -> None:
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["93.184.216.34"]

    client = EgressClient(STRICT, resolver=resolver)
    client.check_url("https://shop.example.com/wp-json/")
    client.check_url("https://shop.example.com:8443/")
    client.check_url("https://93.184.216.34/")  # IP literal: no lookup
    assert calls == [("shop.example.com", 443), ("shop.example.com", 8443)]


def test_hung_resolver_hits_the_deadline(no_network: NetworkSpy) -> None:
    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["93.184.216.34"]

    client = EgressClient(EgressPolicy(timeout_s=0.3), resolver=resolver)
    try:
        started = time.monotonic()
        with pytest.raises(EgressFailed):
            client.get("https://slow-dns.example.com/")
        assert time.monotonic() - started < 5
    finally:
        release.set()


def test_default_resolver_uses_getaddrinfo() -> None:
    """The name localhost resolves from /etc/hosts (no network); addresses are checked."""
    client = EgressClient(EgressPolicy(allow_loopback=True))
    _, addresses = client.check_url("https://localhost:9/")
    assert addresses
    assert all(a in ("127.0.0.1", "::1") for a in addresses)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_s": 10.5},
        {"timeout_s": 0},
        {"timeout_s": -1},
        {"timeout_s": float("nan")},
        {"max_body_bytes": 0},
    ],
)
def test_policy_limits_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        EgressPolicy(**kwargs)


def test_ssl_context_must_verify() -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify"):
        EgressClient(STRICT, ssl_context=ctx)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example.com"},
        {"Transfer-Encoding": "chunked"},
        {"Content-Length": "5"},
        {"Accept-Encoding": "gzip"},
        {"X-Token": "abc\r\nX-Injected: 1"},
        {"X Bad": "1"},
    ],
)
def test_bad_headers_rejected_without_echoing_values(
    headers: dict[str, str], no_network: NetworkSpy
) -> None:
    client = EgressClient(STRICT, resolver=fake_resolver)
    with pytest.raises(ValueError, match="header") as excinfo:
        client.get("https://public.example.com/", headers=headers)
    for value in headers.values():
        assert value not in str(excinfo.value)
    assert no_network.connects == []


def test_response_repr_hides_headers_and_body() -> None:
    response = EgressResponse(
        status_code=200,
        headers=httpx.Headers({"Set-Cookie": "session=topsecret"}),
        body=b"secret-body",
    )
    assert "topsecret" not in repr(response)
    assert "secret-body" not in repr(response)


# -------------------------------------------------------------- local server


@dataclass
class ServerState:
    hits: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LocalServer:
    port: int
    state: ServerState
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _canned_answers() -> dict[str, tuple[int, bytes, dict[str, str]]]:
    """The local server's fixed answers by path: status, body, headers."""
    json_ok = (200, b'{"ok": true}', {"Content-Type": "application/json"})
    metadata = "http://169.254.169.254/latest/meta-data/"
    return {
        "/json": json_ok,
        "/target": json_ok,
        "/redirect": (302, b"", {"Location": "/target"}),
        "/redirect-external": (302, b"", {"Location": metadata}),
        "/big": (200, b"x" * (CAP + 1), {}),
        "/error": (500, SECRET_BODY.encode(), {"Content-Type": "text/plain"}),
        "/error-big": (500, (SECRET_BODY * 200).encode(), {}),
        "/gzip": (200, gzip.compress(b'{"zipped": 1}'), {"Content-Encoding": "gzip"}),
        "/gzip-bomb": (
            200,
            gzip.compress(b"\0" * (10 * 1024 * 1024)),
            {"Content-Encoding": "gzip"},
        ),
        "/brotli": (200, b"\x0b\x02\x80{}\x03", {"Content-Encoding": "br"}),
    }


def _stream_undeclared(handler: BaseHTTPRequestHandler, state: ServerState) -> None:
    """An HTTP/1.0 close-delimited body: no Content-Length to reject up front."""
    handler.send_response(200)
    handler.end_headers()
    for _ in range(64):
        if state.stop.is_set():
            break
        handler.wfile.write(b"y" * 1024)


def _drip(handler: BaseHTTPRequestHandler, state: ServerState) -> None:
    """Each byte arrives well within any per-read timeout; only an overall deadline stops
    this."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(1000):
        if state.stop.wait(0.05):
            break
        handler.wfile.write(b"z")
        handler.wfile.flush()


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    canned = _canned_answers()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with state.lock:
                state.hits[path] = state.hits.get(path, 0) + 1
                state.requests.append({k.lower(): v for k, v in self.headers.items()})
            special = {
                "/echo": self._echo,
                "/big-undeclared": self._big_undeclared,
                "/slow": self._slow,
                "/drip": self._drip,
            }.get(path)
            if special is not None:
                special()
            else:
                self._send(*canned.get(path, (404, b"", {})))

        def _echo(self) -> None:
            received = {k.lower(): v for k, v in self.headers.items()}
            self._send(200, json.dumps(received).encode(), {"X-Seen": "1"})

        def _big_undeclared(self) -> None:
            _stream_undeclared(self, state)

        def _slow(self) -> None:
            state.stop.wait(5)
            self._send(200, b"{}")

        def _drip(self) -> None:
            _drip(self, state)

    return Handler


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    state = ServerState()
    try:
        with Serving(_make_handler(state), join_handlers=False) as server:
            yield LocalServer(port=server.port, state=state)
    finally:
        state.stop.set()


def dev_client(**overrides: Any) -> EgressClient:
    options: dict[str, Any] = {
        "allow_http": True,
        "allow_loopback": True,
        "timeout_s": 3.0,
        "max_body_bytes": CAP,
    }
    options.update(overrides)
    return EgressClient(EgressPolicy(**options), resolver=fake_resolver)


def test_json_200(local_server: LocalServer) -> None:
    with dev_client() as client:
        response = client.get(local_server.url("/json"))
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert response.headers["content-type"] == "application/json"


def test_headers_and_basic_auth_are_sent(local_server: LocalServer) -> None:
    response = dev_client().get(
        local_server.url("/echo?consumer_key=ck"),
        headers={"X-Shopify-Access-Token": "shpat_abc"},
        auth=("ck_user", "cs_pass"),
    )
    seen = response.json()
    assert seen["host"] == f"127.0.0.1:{local_server.port}"
    assert seen["x-shopify-access-token"] == "shpat_abc"
    assert seen["authorization"] == "Basic Y2tfdXNlcjpjc19wYXNz"
    assert seen["accept-encoding"] == "identity"


def test_redirect_is_not_followed(local_server: LocalServer) -> None:
    client = dev_client()
    response = client.get(local_server.url("/redirect"))
    assert response.status_code == 302
    assert response.headers["location"] == "/target"
    external = client.get(local_server.url("/redirect-external"))
    assert external.status_code == 302
    assert local_server.state.hits.get("/target", 0) == 0


def test_body_over_cap_fails(local_server: LocalServer) -> None:
    with pytest.raises(EgressFailed, match="limit"):
        dev_client().get(local_server.url("/big"))


def test_undeclared_body_over_cap_fails_while_streaming(local_server: LocalServer) -> None:
    with pytest.raises(EgressFailed, match="limit"):
        dev_client().get(local_server.url("/big-undeclared"))


def test_body_at_cap_is_fine(local_server: LocalServer) -> None:
    response = dev_client(max_body_bytes=CAP + 1).get(local_server.url("/big"))
    assert len(response.body) == CAP + 1


def test_gzip_body_is_decoded(local_server: LocalServer) -> None:
    assert dev_client().get(local_server.url("/gzip")).json() == {"zipped": 1}


def test_gzip_bomb_is_capped(local_server: LocalServer) -> None:
    client = dev_client(max_body_bytes=64 * 1024)
    with pytest.raises(EgressFailed, match="limit"):
        client.get(local_server.url("/gzip-bomb"))


def test_unsupported_encoding_fails(local_server: LocalServer) -> None:
    with pytest.raises(EgressFailed, match="encoding"):
        dev_client().get(local_server.url("/brotli"))


def test_slow_server_times_out(local_server: LocalServer) -> None:
    started = time.monotonic()
    with pytest.raises(EgressFailed, match="timed out"):
        dev_client(timeout_s=0.5).get(local_server.url("/slow"))
    assert time.monotonic() - started < 4


def test_dripping_body_hits_the_overall_deadline(local_server: LocalServer) -> None:
    started = time.monotonic()
    with pytest.raises(EgressFailed, match="timed out"):
        dev_client(timeout_s=0.5).get(local_server.url("/drip"))
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("path", ["/error", "/error-big"])
def test_error_body_never_in_exception_messages(local_server: LocalServer, path: str) -> None:
    client = dev_client()
    try:
        response = client.get(local_server.url(path))
    except EgressFailed as exc:
        failure: Exception = exc
    else:
        assert response.status_code == 500
        assert SECRET_BODY not in repr(response)
        with pytest.raises(EgressFailed) as excinfo:
            response.json()
        failure = excinfo.value
    assert SECRET_BODY not in str(failure)
    assert SECRET_BODY not in repr(failure)
    assert failure.__cause__ is None
    assert failure.__context__ is None or failure.__suppress_context__


def test_connection_failure_message_is_safe() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(EgressFailed) as excinfo:
        dev_client().get(
            f"http://127.0.0.1:{port}/wp-json/wc/v3?consumer_secret=cs_topsecret",
            headers={"X-Api-Key": "key_topsecret"},
            auth=("ck_user", "pw_topsecret"),
        )
    message = str(excinfo.value)
    assert message == f"could not connect to http://127.0.0.1:{port}"
    assert "topsecret" not in message
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_metadata_refused_with_loopback_allowed(local_server: LocalServer) -> None:
    client = dev_client()
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        f"http://metadata.example.com:{local_server.port}/json",
        "http://[fe80::a9fe:a9fe]/",
        "http://[::ffff:169.254.169.254]/",
    ):
        with pytest.raises(EgressRefused):
            client.get(url)
    assert local_server.state.hits == {}


# --------------------------------------------------------------- DNS pinning


def test_dns_rebinding_is_defeated_by_pinning(
    local_server: LocalServer, spy_network: NetworkSpy
) -> None:
    """First answer 127.0.0.1 (allowed), any later answer 169.254.169.254.

    The system resolver is rigged too (see spy_network): if anything resolved the host
    name again it would get 10.0.0.1.  The request must still reach 127.0.0.1.
    """
    calls: list[str] = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["169.254.169.254"]

    client = EgressClient(
        EgressPolicy(allow_http=True, allow_loopback=True, timeout_s=3.0),
        resolver=rebinding_resolver,
    )
    response = client.get(f"http://rebind.example.com:{local_server.port}/echo")
    assert response.status_code == 200
    assert response.json()["host"] == f"rebind.example.com:{local_server.port}"
    assert calls == ["rebind.example.com"]
    assert "rebind.example.com" not in spy_network.lookups
    assert spy_network.connects == [("127.0.0.1", local_server.port)]

    # A later request resolves afresh and is refused on the new answer.
    with pytest.raises(EgressRefused):
        client.get(f"http://rebind.example.com:{local_server.port}/echo")
    assert local_server.state.hits == {"/echo": 1}


def test_pinned_addresses_are_tried_in_order(
    local_server: LocalServer, spy_network: NetworkSpy
) -> None:
    client = EgressClient(
        EgressPolicy(allow_http=True, allow_loopback=True, timeout_s=3.0),
        resolver=lambda host, port: ["127.0.0.2", "127.0.0.1"],
    )
    response = client.get(f"http://multi.example.com:{local_server.port}/json")
    assert response.status_code == 200
    assert spy_network.connects == [
        ("127.0.0.2", local_server.port),
        ("127.0.0.1", local_server.port),
    ]


# ---------------------------------------------------------------------- TLS


@dataclass
class TLSServer:
    server: LocalServer
    ca: Any
    sni: list[str | None]


@pytest.fixture
def tls_server() -> Iterator[TLSServer]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("api.example.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    sni: list[str | None] = []

    def on_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sni.append(name)

    context.sni_callback = on_sni
    state = ServerState()
    try:
        with Serving(_make_handler(state), join_handlers=False, ssl_context=context) as server:
            yield TLSServer(LocalServer(server.port, state, "https"), ca, sni)
    finally:
        state.stop.set()


def _tls_client(tls: TLSServer, resolver: Callable[[str, int], list[str]]) -> EgressClient:
    client_context = ssl.create_default_context()
    tls.ca.configure_trust(client_context)
    policy = EgressPolicy(allow_loopback=True, timeout_s=3.0)
    return EgressClient(policy, resolver=resolver, ssl_context=client_context)


def test_tls_uses_hostname_for_sni_and_verification(
    tls_server: TLSServer, spy_network: NetworkSpy
) -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["169.254.169.254"]

    client = _tls_client(tls_server, resolver)
    url = tls_server.server.url("/echo", host="api.example.test")
    response = client.get(url)
    assert response.status_code == 200
    assert response.json()["host"] == f"api.example.test:{tls_server.server.port}"
    assert tls_server.sni == ["api.example.test"]
    assert calls == ["api.example.test"]
    assert spy_network.connects == [("127.0.0.1", tls_server.server.port)]


def test_tls_certificate_for_another_name_fails(
    tls_server: TLSServer, spy_network: NetworkSpy
) -> None:
    client = _tls_client(tls_server, lambda host, port: ["127.0.0.1"])
    with pytest.raises(EgressFailed, match="TLS"):
        client.get(tls_server.server.url("/echo", host="other.example.test"))
    assert tls_server.server.state.hits == {}


# ------------------------------------------------------- DNS-free screening


@pytest.mark.parametrize(
    ("url", "policy"),
    [
        ("https://metadata.google.internal/computeMetadata/v1/", DEV_LOOPBACK),
        ("https://instance-data.ec2.internal/", STRICT),
        ("https://metadata.goog/", STRICT),
        ("https://printer.local/", STRICT),
        ("https://router.home.arpa/", STRICT),
        ("https://nas.lan/", STRICT),
        ("https://169.254.169.254/", DEV_LOOPBACK),
        ("https://2130706433/", DEV_LOOPBACK),
        ("https://0x7f000001/", DEV_LOOPBACK),
        ("https://[::ffff:127.0.0.1]/", DEV_LOOPBACK),
        ("https://[::1]/", STRICT),
        ("https://localhost/", STRICT),
        ("https://10.1.2.3/", DEV_LOOPBACK),
        ("http://public.example.com/", STRICT),
    ],
)
def test_screen_url_refuses_without_any_lookup(
    url: str, policy: EgressPolicy, no_network: NetworkSpy
) -> None:
    with pytest.raises(EgressRefused):
        screen_url(url, policy)
    assert no_network.lookups == []


def test_screen_url_leaves_public_names_to_the_resolver(no_network: NetworkSpy) -> None:
    assert str(screen_url("https://shop.example.com/wp", STRICT)) == "https://shop.example.com/wp"
    assert screen_url("http://127.0.0.1:9/", DEV_LOOPBACK).port == 9
    assert no_network.lookups == []


def test_private_host_names_are_refused_even_if_they_resolve_publicly(
    no_network: NetworkSpy,
) -> None:
    client = EgressClient(STRICT, resolver=lambda host, port: ["93.184.216.34"])
    for url in ("https://metadata.google.internal/", "https://db.corp/", "https://x.local/"):
        with pytest.raises(EgressRefused, match="private or metadata host name"):
            client.check_url(url)


# ------------------------------------------------------- guarded transport


def guarded(policy: EgressPolicy, resolver: Callable[[str, int], list[str]]) -> httpx.Client:
    return httpx.Client(transport=GuardedTransport(policy, resolver), timeout=3.0)


@pytest.mark.parametrize(
    ("url", "policy"),
    [
        ("https://169.254.169.254/latest/meta-data/", DEV_LOOPBACK),
        ("http://2130706433/", DEV_LOOPBACK),
        ("https://[::ffff:10.0.0.1]/", DEV_LOOPBACK),
        ("https://[::1]/", STRICT),
        ("https://127.0.0.1/", STRICT),
        ("https://metadata.google.internal/", DEV_LOOPBACK),
        ("https://internal.example.com/", DEV_LOOPBACK),
        ("https://mixed.example.com/", STRICT),
        ("https://nxdomain.example.com/", STRICT),
        ("http://public.example.com/", STRICT),
    ],
)
def test_guarded_transport_refuses_before_connecting(
    url: str, policy: EgressPolicy, no_network: NetworkSpy
) -> None:
    with guarded(policy, fake_resolver) as client, pytest.raises(EgressRefused):
        client.post(url, json={"secret": "never-sent"})
    assert no_network.connects == []


def test_guarded_transport_reaches_a_permitted_server(local_server: LocalServer) -> None:
    with guarded(DEV_LOOPBACK, fake_resolver) as client:
        assert client.get(local_server.url("/json")).json() == {"ok": True}
        assert client.get(local_server.url("/json", host="localhost")).status_code == 200
    assert local_server.state.hits == {"/json": 2}


def test_guarded_transport_pins_each_connection_to_the_checked_address(
    local_server: LocalServer, spy_network: NetworkSpy
) -> None:
    """Each new connection resolves once and dials what it checked; a rebind is refused."""
    answers = [["127.0.0.1"], ["10.0.0.1"]]
    calls: list[str] = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    url = f"http://rebind.example.com:{local_server.port}/echo"
    with guarded(DEV_LOOPBACK, rebinding_resolver) as client:
        response = client.get(url, headers={"Connection": "close"})
        assert response.json()["host"] == f"rebind.example.com:{local_server.port}"
        with pytest.raises(EgressRefused):
            client.get(url)
    assert calls == ["rebind.example.com", "rebind.example.com"]
    assert "rebind.example.com" not in spy_network.lookups
    assert spy_network.connects == [("127.0.0.1", local_server.port)]
    assert local_server.state.hits == {"/echo": 1}


def test_guarded_transport_ignores_proxy_settings(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy would connect on our behalf, past every check: the environment is ignored."""
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    with guarded(DEV_LOOPBACK, fake_resolver) as client:
        assert client.get(local_server.url("/json")).status_code == 200
