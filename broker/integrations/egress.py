"""SSRF-guarded outbound HTTP for tenant-supplied URLs.

Tenants hand the broker URLs (a WooCommerce store, a Shopify shop domain) and the broker
calls them to test credentials.  Every such call must go through :class:`EgressClient`,
which:

* accepts only ``https`` (``http`` too when ``EgressPolicy.allow_http`` is set, for dev),
  rejects userinfo, backslashes, whitespace/control characters, percent-encoded or
  numeric-looking host names (``2130706433``, ``0x7f.0.0.1``, ``127.1``...), trailing
  dots, single-label names and port 0;
* resolves the host name *once*, refuses the URL if *any* resolved address is not a
  public unicast address (private, loopback, link-local/metadata, multicast, reserved,
  unspecified, shared 100.64/10, benchmarking, documentation, ... and IPv6 forms that
  embed such an IPv4 address: IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64);
* connects to exactly the addresses it checked (a custom ``httpcore`` network backend
  ignores the host name and dials the pinned IP), while the ``Host`` header, TLS SNI and
  certificate verification still use the original host name, so DNS rebinding cannot
  redirect the connection;
* never follows redirects (a 3xx is returned like any other response);
* enforces one deadline (``EgressPolicy.timeout_s``, at most 10 s) across name
  resolution, connect, TLS handshake, request and the whole body read, and caps the body
  at ``EgressPolicy.max_body_bytes`` (decoded size too, for gzip/deflate);
* raises :class:`EgressRefused` / :class:`EgressFailed` whose messages never contain the
  URL path or query, userinfo, request headers, credentials or the response body; the
  original exception is suppressed (``from None``).

Loopback (127/8, ::1) is reachable only when ``EgressPolicy.allow_loopback`` is set, for
tests and dev; every other forbidden range stays forbidden even then.

The same policy serves two other callers.  :func:`screen_url` runs every check that needs
no DNS (it also refuses private and metadata host names such as ``*.internal``), for
validation at write time.  :class:`GuardedTransport` puts every new connection of a
long-lived ``httpx.Client`` (the SDK's provider clients) through the same checks, pinned
to the checked addresses.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
import socket
import ssl
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

__all__ = [
    "MAX_TIMEOUT_S",
    "EgressClient",
    "EgressFailed",
    "EgressPolicy",
    "EgressRefused",
    "HostNotResolved",
    "EgressResponse",
    "GuardedBackend",
    "GuardedTransport",
    "Resolver",
    "default_resolver",
    "is_forbidden_address",
    "screen_url",
]

MAX_TIMEOUT_S = 10.0
"""Upper bound for :attr:`EgressPolicy.timeout_s`."""

Resolver = Callable[[str, int], list[str]]
"""``resolver(host, port) -> [ip, ...]``; must not return anything but IP address strings."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_URL_LENGTH = 4096
_MAX_ADDRESSES = 32
_DEFAULT_PORTS = {"http": 80, "https": 443}
_USER_AGENT = "broker-egress/1"

# Headers the caller may not set: they are computed here, and letting them through would
# allow request smuggling or defeat the body cap.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "accept-encoding",
        "proxy-authorization",
        "proxy-connection",
    }
)
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")

_SCHEME_AUTHORITY_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class EgressPolicy:
    """What outbound calls may do.  The defaults are the production settings."""

    allow_http: bool = False
    allow_loopback: bool = False
    timeout_s: float = MAX_TIMEOUT_S
    max_body_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        timeout = float(self.timeout_s)
        if math.isnan(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S}]")
        if isinstance(self.max_body_bytes, bool) or self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be a positive integer")


class EgressRefused(Exception):
    """The URL or the address it resolves to is not allowed.  The message is safe to show."""


class HostNotResolved(EgressRefused):
    """The host name has no address (NXDOMAIN, no records, an unusable answer).

    Still a refusal (nothing is called), but not an SSRF one: the name does not resolve.
    """


class EgressFailed(Exception):
    """Transport problem (timeout, connection, TLS, oversized body...).  Safe message."""


@dataclass(frozen=True)
class EgressResponse:
    """A completed response.  ``body`` is capped and content-decoded (gzip/deflate)."""

    status_code: int
    # Neither the headers (Set-Cookie, tokens) nor the body belong in a repr/log line.
    headers: httpx.Headers = field(repr=False)
    body: bytes = field(repr=False)

    def json(self) -> Any:
        """Decode the body as JSON; :class:`EgressFailed` (without the body text) if invalid."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            raise EgressFailed("response body is not valid JSON") from None


# ------------------------------------------------------------------- address policy

_FORBIDDEN_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", includes the unspecified address
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.31.196.0/24",  # AS112-v4
        "192.52.193.0/24",  # AMT
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # private
        "192.175.48.0/24",  # AS112 direct delegation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes 255.255.255.255
    )
)
_FORBIDDEN_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/96",  # unspecified, loopback, deprecated IPv4-compatible ::a.b.c.d
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, includes Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def _forbidden_v4(ip: ipaddress.IPv4Address, *, allow_loopback: bool) -> bool:
    if allow_loopback and ip in _LOOPBACK_V4:
        return False
    return (
        any(ip in net for net in _FORBIDDEN_V4)
        or not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 address routes to."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def is_forbidden_address(ip: IPAddress, *, allow_loopback: bool = False) -> bool:
    """True unless ``ip`` is a public unicast address (or loopback when allowed).

    IPv6 addresses that embed an IPv4 address (mapped, NAT64, 6to4) are judged by that
    IPv4 address, and never get the loopback exemption.  IPv4-compatible and Teredo
    addresses are refused outright (their whole ranges are in the forbidden list).
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _forbidden_v4(ip, allow_loopback=allow_loopback)
    if ip.scope_id:
        return True
    if allow_loopback and ip == _LOOPBACK_V6:
        return False
    embedded = _embedded_v4(ip)
    if embedded is not None:
        return _forbidden_v4(embedded, allow_loopback=False)
    return (
        any(ip in net for net in _FORBIDDEN_V6)
        or ip.teredo is not None
        or not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_site_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def default_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver (``socket.getaddrinfo``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


# ----------------------------------------------------------------- pinned transport


def _clamp(deadline: float, timeout: float | None, exc_type: type[Exception]) -> float:
    """The smaller of ``timeout`` and the time left before ``deadline``; raise if none."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise exc_type("deadline exceeded")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """Wraps a stream so that no single I/O operation can outlive the request deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name: SNI and certificate checks use it, not
        # the pinned IP.
        tls = self._inner.start_tls(
            ssl_context,
            server_hostname,
            _clamp(self._deadline, timeout, httpcore.ConnectTimeout),
        )
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _dial(
    inner: httpcore.NetworkBackend,
    addresses: list[str],
    port: int,
    timeout: Callable[[], float | None],
    *,
    local_address: str | None,
    socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
) -> httpcore.NetworkStream:
    """Connect to the first of ``addresses`` that answers, and to nothing else."""
    last_error: Exception = httpcore.ConnectError("no address to connect to")
    for address in addresses:
        try:
            # A numeric address: socket.create_connection performs no DNS lookup.
            stream = inner.connect_tcp(
                address,
                port,
                timeout=timeout(),
                local_address=local_address,
                socket_options=socket_options,
            )
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            last_error = exc
            continue
        peer = stream.get_extra_info("server_addr")
        if ipaddress.ip_address(peer[0]) != ipaddress.ip_address(address):
            stream.close()
            raise httpcore.ConnectError("connected to an unexpected address")
        return stream
    raise last_error


class _TcpOnly(httpcore.NetworkBackend):
    """What both egress backends share: TCP to checked addresses, never a unix socket."""

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")


class _PinnedBackend(_TcpOnly):
    """Network backend that dials only the pre-validated addresses of one origin.

    httpcore asks it to connect to ``(host name, port)``; instead of resolving the name
    again it tries each checked address in order.  Anything else is refused.
    """

    def __init__(self, host: str, port: int, addresses: list[str], deadline: float) -> None:
        self._host = host
        self._port = port
        self._addresses = addresses
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if host != self._host or port != self._port:
            raise httpcore.ConnectError("unexpected origin")
        stream = _dial(
            self._inner,
            self._addresses,
            port,
            lambda: _clamp(self._deadline, timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _DeadlineStream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self._deadline - time.monotonic())))


class GuardedBackend(_TcpOnly):
    """Network backend for long-lived clients: vets every host before each new connection.

    httpcore hands it the URL's host; it applies the same checks as
    :meth:`EgressClient.check_url` (literal addresses, names, one resolution, every
    address public) and dials only the addresses it checked, so a DNS answer that
    changes between the check and the connect cannot redirect it.  TLS still verifies
    the original host name.  :class:`EgressRefused` propagates unchanged.
    """

    def __init__(self, policy: EgressPolicy, resolver: Resolver | None = None) -> None:
        self._policy = policy
        self._resolver: Resolver = resolver if resolver is not None else default_resolver
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        deadline = time.monotonic() + (timeout or self._policy.timeout_s)
        literal = _screen_host(host, self._policy)
        if literal is not None:
            addresses = [str(literal)]
        else:
            addresses = _resolve_public(host, port, self._policy, self._resolver, deadline)
        return _dial(
            self._inner,
            addresses,
            port,
            lambda: _clamp(deadline, timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes through a :class:`GuardedBackend`.

    Scheme checks happen per request (plain http only when the policy allows it);
    environment proxies are never used, since a proxy would connect on our behalf.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(trust_env=False)
        self._policy = policy
        # httpx offers no public way to choose the network backend; the pool it built
        # above is replaced before it has opened anything.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            http1=True,
            http2=False,
            retries=0,
            network_backend=GuardedBackend(policy, resolver),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _check_scheme(request.url.scheme, self._policy)
        return super().handle_request(request)


# ------------------------------------------------------------------------- helpers


def _effective_port(url: httpx.URL) -> int:
    # Not ``url.port or default``: an explicit port 0 must stay 0 (and be refused).
    return url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme, 0)


def _origin_label(url: httpx.URL) -> str:
    """``scheme://host:port`` — the only part of a URL that goes into messages."""
    port = _effective_port(url)
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{port}"


def _has_forbidden_chars(text: str) -> bool:
    # Separators (Z*) and control/format/surrogate/private/unassigned (C*) code points.
    return any(char == "\\" or unicodedata.category(char)[0] in "CZ" for char in text)


def _valid_hostname(host: str) -> bool:
    """LDH host name (as IDNA-encoded by httpx), at least two labels, alphabetic TLD."""
    if not host or len(host) > 253 or host.endswith("."):
        return False
    labels = host.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return False
    # A final label starting with a digit is an IP address in disguise ("127.1",
    # "2130706433", "0x7f.0.0.1", "017700000001"): no real TLD looks like that.
    return labels[-1][0].isalpha()


def _decode_body(body: bytes, encoding: str, cap: int, origin: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        # RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate.
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
        decoder = zlib.decompressobj(wbits)
    else:
        raise EgressFailed(f"response from {origin} has an unsupported content encoding")
    try:
        decoded = decoder.decompress(body, cap + 1)
    except zlib.error:
        raise EgressFailed(f"response from {origin} could not be decoded") from None
    if len(decoded) > cap or decoder.unconsumed_tail:
        raise EgressFailed(f"response from {origin} exceeds the {cap}-byte limit")
    if not decoder.eof:
        raise EgressFailed(f"response from {origin} could not be decoded")
    return decoded


# ------------------------------------------------------------------------ screening

# Names that only ever mean something inside a private network or a cloud instance
# (RFC 6762 .local, RFC 8375 home.arpa, ICANN's reserved .internal, and suffixes that
# will never be delegated): refused without asking DNS, so a check with no resolver
# still catches metadata.google.internal and friends.
_PRIVATE_SUFFIXES = (
    "internal",
    "local",
    "localdomain",
    "home.arpa",
    "lan",
    "home",
    "corp",
    "intranet",
)
# Public names that cloud providers resolve to their instance metadata service.
_METADATA_HOSTS = frozenset({"metadata.goog", "metadata.tencentyun.com"})


def _check_scheme(scheme: str, policy: EgressPolicy) -> None:
    if scheme == "https" or (scheme == "http" and policy.allow_http):
        return
    allowed = "http and https" if policy.allow_http else "https"
    raise EgressRefused(f"only {allowed} URLs are allowed")


def _parse(url: str, policy: EgressPolicy) -> httpx.URL:
    if not isinstance(url, str) or not url:
        raise EgressRefused("URL must be a non-empty string")
    if len(url) > _MAX_URL_LENGTH:
        raise EgressRefused("URL is too long")
    if _has_forbidden_chars(url):
        raise EgressRefused("URL contains whitespace, control characters or backslashes")
    match = _SCHEME_AUTHORITY_RE.match(url)
    if match is None:
        raise EgressRefused("URL must be absolute (scheme://host/...)")
    scheme, authority = match.group(1).lower(), match.group(2)
    _check_scheme(scheme, policy)
    if "@" in authority:
        raise EgressRefused("URL must not contain credentials (userinfo)")
    if "%" in authority:
        raise EgressRefused("URL host must not be percent-encoded")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise EgressRefused("URL is malformed") from None
    if parsed.scheme != scheme or parsed.userinfo:
        raise EgressRefused("URL is malformed")
    return parsed


def _screen_host(host: str, policy: EgressPolicy) -> IPAddress | None:
    """The DNS-free verdict on a host: its address if it is a literal, None for a name."""
    if not host:
        raise EgressRefused("URL has no host")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if is_forbidden_address(literal, allow_loopback=policy.allow_loopback):
            raise EgressRefused("URL points to a non-public address")
        return literal
    if not _valid_hostname(host):
        raise EgressRefused("URL host is not a valid public host name")
    if host == "localhost" or host.endswith(".localhost"):
        if not policy.allow_loopback:
            raise EgressRefused("URL points to a non-public address")
    elif "." not in host:
        # Single-label names get expanded with the resolver's search domains.
        raise EgressRefused("URL host is not a valid public host name")
    elif host in _METADATA_HOSTS or any(
        host == suffix or host.endswith("." + suffix) for suffix in _PRIVATE_SUFFIXES
    ):
        raise EgressRefused("URL host is a private or metadata host name")
    return None


def _screen(url: str, policy: EgressPolicy) -> tuple[httpx.URL, str, int, IPAddress | None]:
    parsed = _parse(url, policy)
    port = _effective_port(parsed)
    if not 1 <= port <= 65535:
        raise EgressRefused("URL port must be between 1 and 65535")
    host = parsed.raw_host.decode("ascii")
    return parsed, host, port, _screen_host(host, policy)


def screen_url(url: str, policy: EgressPolicy) -> httpx.URL:
    """Every check of :meth:`EgressClient.check_url` that needs no DNS lookup.

    Refuses (:class:`EgressRefused`) what no resolver could make acceptable: a bad
    scheme or shape, a non-public literal address in any spelling, and private or
    metadata host names.  A host name that passes still has to be resolved and checked
    before anything connects to it.
    """
    return _screen(url, policy)[0]


def _resolve_public(
    host: str, port: int, policy: EgressPolicy, resolver: Resolver, deadline: float
) -> list[str]:
    """Resolve ``host`` once and return its addresses, refusing if any is not public."""
    addresses = _resolve(resolver, host, port, deadline)
    if any(is_forbidden_address(ip, allow_loopback=policy.allow_loopback) for ip in addresses):
        raise EgressRefused("URL host resolves to a non-public address")
    return [str(ip) for ip in addresses]


def _resolve(resolver: Resolver, host: str, port: int, deadline: float) -> list[IPAddress]:
    """Call the resolver once, bounded by the deadline, and parse its answer."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(resolver(host, port))
        except Exception:
            outcome.append(None)

    # A daemon thread so that a hung getaddrinfo cannot hold the caller (or the
    # interpreter at exit) past the deadline.
    worker = threading.Thread(target=run, name="egress-resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive() or not outcome:
        raise EgressFailed("timed out resolving the URL host")
    answer = outcome[0]
    if not isinstance(answer, list | tuple) or not answer:
        raise HostNotResolved("URL host could not be resolved")

    addresses: list[IPAddress] = []
    for item in answer:
        if not isinstance(item, str):
            raise HostNotResolved("URL host could not be resolved")
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise HostNotResolved("URL host could not be resolved") from None
        if ip not in addresses:
            addresses.append(ip)
    if len(addresses) > _MAX_ADDRESSES:
        raise EgressRefused("URL host resolves to too many addresses")
    return addresses


# -------------------------------------------------------------------------- client


class EgressClient:
    """Performs SSRF-guarded GET (and POST) requests according to an :class:`EgressPolicy`.

    ``resolver(host, port)`` returns the IP addresses for a host name; it defaults to
    :func:`default_resolver` and is called exactly once per request (never for IP
    literals).  ``ssl_context`` lets tests or private deployments supply their own CA
    bundle; it must verify certificates and host names.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ssl_context is None:
            ssl_context = httpx.create_ssl_context(trust_env=False)
        elif ssl_context.verify_mode != ssl.CERT_REQUIRED or not ssl_context.check_hostname:
            raise ValueError("ssl_context must verify certificates and host names")
        self._policy = policy
        self._resolver: Resolver = resolver if resolver is not None else default_resolver
        self._ssl_context = ssl_context
        self._closed = False

    @property
    def policy(self) -> EgressPolicy:
        return self._policy

    def __enter__(self) -> EgressClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release resources.  Connections are never reused, so there is little to free."""
        self._closed = True

    # ---------------------------------------------------------------- validation

    def check_url(self, url: str) -> tuple[httpx.URL, list[str]]:
        """Validate ``url`` and resolve its host.

        Returns the parsed URL and the addresses a request would be pinned to.  Raises
        :class:`EgressRefused` if the URL or any resolved address is not allowed (and
        :class:`EgressFailed` if name resolution does not finish within the timeout).
        """
        return self._check(url, time.monotonic() + self._policy.timeout_s)

    def _check(self, url: str, deadline: float) -> tuple[httpx.URL, list[str]]:
        parsed, host, port, literal = _screen(url, self._policy)
        if literal is not None:
            return parsed, [str(literal)]
        return parsed, _resolve_public(host, port, self._policy, self._resolver, deadline)

    # ------------------------------------------------------------------- request

    @staticmethod
    def _build_headers(
        headers: Mapping[str, str] | None,
        auth: tuple[str, str] | None,
    ) -> list[tuple[bytes, bytes]]:
        """Request headers except Host.  Raises ValueError (never echoing a value)."""
        merged: dict[str, tuple[str, str]] = {
            "accept": ("Accept", "application/json"),
            "user-agent": ("User-Agent", _USER_AGENT),
        }
        for name, value in (headers or {}).items():
            if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
                raise ValueError("invalid header name")
            lowered = name.lower()
            if lowered in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} cannot be set by the caller")
            # Never echo the value: it may be a token.
            if not isinstance(value, str) or not _HEADER_VALUE_RE.fullmatch(value):
                raise ValueError(f"header {name!r} has an invalid value")
            if lowered == "authorization" and auth is not None:
                raise ValueError("pass either auth or an Authorization header, not both")
            merged[lowered] = (name, value)
        if auth is not None:
            username, password = auth
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            merged["authorization"] = ("Authorization", f"Basic {token}")

        raw = [(b"Accept-Encoding", b"identity")]
        raw.extend((key.encode("ascii"), val.encode("latin-1")) for key, val in merged.values())
        return raw

    def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> EgressResponse:
        """GET ``url`` under the policy.  Redirects are returned, not followed.

        Raises :class:`EgressRefused` for a disallowed URL (before any connection),
        :class:`EgressFailed` for transport problems, and ``ValueError`` for invalid or
        reserved ``headers`` (programming errors).
        """
        return self._request(b"GET", url, headers=headers, auth=auth, content=None)

    def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> EgressResponse:
        """POST ``content`` to ``url`` under the same policy and checks as :meth:`get`.

        For webhook deliveries: the address is checked when the connection is made,
        so a name that resolved to a public address at registration and resolves
        inside now is refused.
        """
        return self._request(b"POST", url, headers=headers, auth=None, content=content)

    def _request(
        self,
        method: bytes,
        url: str,
        *,
        headers: Mapping[str, str] | None,
        auth: tuple[str, str] | None,
        content: bytes | None,
    ) -> EgressResponse:
        if self._closed:
            raise RuntimeError("EgressClient is closed")
        deadline = time.monotonic() + self._policy.timeout_s
        extra_headers = self._build_headers(headers, auth)
        if content is not None:
            extra_headers.append((b"Content-Length", str(len(content)).encode("ascii")))
        parsed, addresses = self._check(url, deadline)
        origin = _origin_label(parsed)
        host = parsed.raw_host.decode("ascii")
        port = _effective_port(parsed)

        backend = _PinnedBackend(host, port, addresses, deadline)
        pool = httpcore.ConnectionPool(
            ssl_context=self._ssl_context,
            max_connections=1,
            http1=True,
            http2=False,
            retries=0,
            network_backend=backend,
        )
        remaining = _remaining_or_fail(deadline, origin)
        request = _request_for(method, parsed, port, extra_headers, content, remaining)
        try:
            with pool:
                response = pool.handle_request(request)
                try:
                    body = self._read_body(response, origin)
                finally:
                    response.close()
        except (EgressFailed, EgressRefused):
            raise
        except httpcore.TimeoutException:
            raise EgressFailed(f"request to {origin} timed out") from None
        except httpcore.ConnectError as exc:
            # httpcore wraps the ssl.SSLError; depending on the path it ends up as the
            # cause or only as the context.
            if isinstance(exc.__cause__ or exc.__context__, ssl.SSLError):
                raise EgressFailed(f"TLS handshake with {origin} failed") from None
            raise EgressFailed(f"could not connect to {origin}") from None
        except Exception:
            raise EgressFailed(f"request to {origin} failed") from None

        response_headers = httpx.Headers(response.headers)
        body = _decode_body(
            body,
            response_headers.get("content-encoding", ""),
            self._policy.max_body_bytes,
            origin,
        )
        return EgressResponse(status_code=response.status, headers=response_headers, body=body)

    def _read_body(self, response: httpcore.Response, origin: str) -> bytes:
        cap = self._policy.max_body_bytes
        too_large = f"response from {origin} exceeds the {cap}-byte limit"
        for name, value in response.headers:
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > cap:
                    raise EgressFailed(too_large)
        body = bytearray()
        for chunk in response.iter_stream():
            body += chunk
            if len(body) > cap:
                raise EgressFailed(too_large)
        return bytes(body)


def _request_for(
    method: bytes,
    parsed: httpx.URL,
    port: int,
    headers: list[tuple[bytes, bytes]],
    content: bytes | None,
    remaining: float,
) -> httpcore.Request:
    """The request to send on a pinned connection, every phase bounded by what is left."""
    return httpcore.Request(
        method,
        httpcore.URL(
            scheme=parsed.raw_scheme,
            host=parsed.raw_host,
            port=port,
            target=parsed.raw_path,
        ),
        headers=[(b"Host", parsed.netloc), *headers],
        content=content,
        extensions={
            "timeout": {
                "connect": remaining,
                "read": remaining,
                "write": remaining,
                "pool": remaining,
            }
        },
    )


def _remaining_or_fail(deadline: float, origin: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise EgressFailed(f"request to {origin} timed out")
    return remaining
