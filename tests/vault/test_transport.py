"""The gateway's HTTP transport (http.client under hvac): keep-alive, no proxies, no redirects.

The Vault behaviour is exercised against the real OpenBao elsewhere; here a tiny
local HTTP server stands in for a node that misbehaves at the HTTP level, which
a real Vault cannot be made to do on demand.
"""

from __future__ import annotations

import contextvars
import json
import os
import resource
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from broker.core import context
from broker.vault.errors import VaultMisconfigured, VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.transport import ConnectionPool, PooledAdapter, VaultResponse
from tests.support.loopback import LoopbackServer, QuietHandler


class _Node(LoopbackServer):
    """Answers every request with `status` (and `location`), counting connections."""

    # The gateway keeps its connections alive: they end with the process, not the node.
    join_handlers = False

    def __init__(self, status: int, location: str | None = None) -> None:
        super().__init__()
        self.status = status
        self.location = location
        self.drop_after_answer = False  # close the connection silently, as an idle timeout does
        self.stall_s = 0.0  # wait this long before answering
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def connections(self) -> int:
        return self.accepted

    def handler(self) -> type[BaseHTTPRequestHandler]:
        node = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Vault answers

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                node.requests.append((self.command, self.path, dict(self.headers)))
                if node.stall_s:
                    time.sleep(node.stall_s)
                body = json.dumps({"errors": []}).encode()
                self.send_response(node.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if node.location:
                    self.send_header("Location", node.location)
                self.end_headers()
                self.wfile.write(body)
                if node.drop_after_answer:
                    self.close_connection = True  # no "Connection: close": the client cannot know

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _answer

        return Handler


@pytest.fixture
def node() -> Iterator[_Node]:
    with _Node(404) as server:
        yield server


def _gateway(url: str) -> VaultGateway:
    return VaultGateway(addrs=[url], token="s.not-a-real-token", retry_budget_s=0.5)


def test_calls_reuse_one_keep_alive_connection(node: _Node) -> None:
    gateway = _gateway(node.url)
    try:
        for _ in range(20):
            assert gateway.kv.read("tenants/t1/integrations/shopify") is None  # 404: absent
    finally:
        gateway.close()
    assert len(node.requests) == 20
    assert node.connections == 1


def test_every_call_carries_the_token_and_the_audited_headers(node: _Node) -> None:
    gateway = _gateway(node.url)

    def serve_a_request() -> None:
        context.bind(context.RequestContext(request_id="req-transport-1", client_addr="10.0.0.9"))
        context.update(actor="service:billing", tenant_id="t1", action="credentials.fetch:shopify")
        gateway.kv.read("tenants/t1/integrations/shopify", version=3)

    try:
        contextvars.copy_context().run(serve_a_request)  # the request's context ends with it
    finally:
        gateway.close()
    method, path, headers = node.requests[0]
    assert (method, path) == ("GET", "/v1/secret/data/tenants/t1/integrations/shopify?version=3")
    assert headers["X-Vault-Token"] == "s.not-a-real-token"
    assert headers["X-Vault-Request"] == "true"
    assert headers["X-Request-Id"] == "req-transport-1"
    assert headers["X-Broker-Actor"] == "service:billing"
    assert headers["X-Broker-Tenant"] == "t1"
    assert headers["X-Broker-Action"] == "credentials.fetch:shopify"
    assert headers["X-Broker-Client-Addr"] == "10.0.0.9"


def test_proxy_environment_variables_are_not_consulted(
    monkeypatch: pytest.MonkeyPatch, broker_vault: VaultGateway
) -> None:
    # A proxy that does not exist: going through it would fail every call.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert broker_vault.kv.read("tenants/no-such-tenant/integrations/shopify") is None


def test_a_redirect_is_never_followed_and_becomes_unavailable(node: _Node) -> None:
    with _Node(200) as target:
        node.status, node.location = 307, f"{target.url}/v1/secret/data/elsewhere"
        gateway = _gateway(node.url)
        try:
            with pytest.raises(VaultUnavailable) as caught:
                gateway.kv.read("tenants/t1/integrations/shopify")
        finally:
            gateway.close()
    assert caught.value.retry_after == gateway.retry_after_s
    assert len(node.requests) >= 2  # retried within the budget, on the same node
    assert target.requests == []


def test_a_node_that_is_not_listening_is_unavailable() -> None:
    with _Node(200) as closed:
        url = closed.url
    gateway = _gateway(url)
    try:
        with pytest.raises(VaultUnavailable):
            gateway.kv.read("tenants/t1/integrations/shopify")
    finally:
        gateway.close()


def test_answers_without_a_json_body_come_back_as_responses(broker_vault: VaultGateway) -> None:
    # A KV v2 delete answers 204 No Content: a response, not a dict, and no error.
    path = "tenants/transport-204/integrations/shopify"
    broker_vault.kv.write(path, {"ciphertext": "x"}, cas=None)
    answer = broker_vault.call(
        "delete a secret",
        lambda client: client.secrets.kv.v2.delete_latest_version_of_secret(
            path=path, mount_point=broker_vault.kv.mount
        ),
    )
    assert isinstance(answer, VaultResponse)
    assert (answer.status_code, answer.ok, answer.content) == (204, True, b"")
    assert "x" not in repr(answer)


def test_tls_is_verified_against_the_configured_ca_only(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = _Node(404)
    server.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server.ssl_context)
    with server:
        url = server.base_url
        assert url.startswith("https://127.0.0.1:")
        trusting = VaultGateway(addrs=[url], token="s.x", verify=str(ca_file), retry_budget_s=0.3)
        default = VaultGateway(addrs=[url], token="s.x", retry_budget_s=0.3)
        try:
            assert trusting.kv.read("tenants/t1/integrations/shopify") is None
            # An unknown CA: refused, never trusted, and not retried as if Vault were down.
            with pytest.raises(VaultMisconfigured, match="certificate could not be verified"):
                default.kv.read("tenants/t1/integrations/shopify")
        finally:
            trusting.close()
            default.close()
    assert len(server.requests) == 1
    assert server.connections == 2  # one handshake each: the refusal was final


def test_a_connection_the_server_dropped_while_idle_is_not_reused(node: _Node) -> None:
    node.drop_after_answer = True
    gateway = _gateway(node.url)
    try:
        for _ in range(3):
            assert gateway.kv.read("tenants/t1/integrations/shopify") is None
            time.sleep(0.05)  # idle, as between two requests
    finally:
        gateway.close()
    assert len(node.requests) == 3  # each call reached the node exactly once
    assert node.connections == 3


def test_a_node_that_stops_answering_times_out_into_unavailable(node: _Node) -> None:
    node.stall_s = 2.0
    gateway = VaultGateway(addrs=[node.url], token="s.x", timeout_s=0.2, retry_budget_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(VaultUnavailable):
            gateway.kv.read("tenants/t1/integrations/shopify")
    finally:
        gateway.close()
    assert time.monotonic() - started < 1.9  # the timeout, not the stall, ended it


def test_idle_connections_kept_per_node_are_bounded(node: _Node) -> None:
    gateway = VaultGateway(addrs=[node.url], token="s.x", pool_size=2)

    def calls() -> None:
        for _ in range(10):
            gateway.kv.read("tenants/t1/integrations/shopify")

    threads = [threading.Thread(target=calls) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    idle = [len(n._idle) for n in gateway._pool._nodes.values()]
    gateway.close()
    assert len(node.requests) == 60
    assert idle == [2]  # six threads used the node; only two connections stay open


def test_keep_alive_works_for_descriptors_above_1024(node: _Node) -> None:
    # select() cannot watch descriptors numbered 1024 and up; a busy process has them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        gateway = _gateway(node.url)
        try:
            for _ in range(5):
                assert gateway.kv.read("tenants/t1/integrations/shopify") is None
        finally:
            gateway.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert node.connections == 1


def test_an_ipv6_address_without_a_port_gets_the_scheme_default() -> None:
    pool = ConnectionPool(verify=True, timeout_s=1, maxsize=1)
    https = pool._node("https", "[fd00::1]").connect()
    plain = pool._node("http", "[fd00::1]").connect()
    assert (https.host, https.port) == ("fd00::1", 443)
    assert (plain.host, plain.port) == ("fd00::1", 80)


def test_a_connection_released_after_close_is_closed(node: _Node) -> None:
    pool = ConnectionPool(verify=True, timeout_s=1, maxsize=4)
    assert pool.request("GET", f"{node.url}/v1/sys/health").status == 404
    target = pool._node("http", node.url.removeprefix("http://"))
    busy = target.acquire()  # the kept connection, as a call in flight would hold it
    pool.close()
    target.release(busy)  # the call ends after the gateway closed
    assert target._idle == []
    assert busy.sock is None


def test_a_token_with_a_line_break_is_refused_without_echoing_it(node: _Node) -> None:
    secret = "s.do-not-print-this-token"
    gateway = VaultGateway(addrs=[node.url], token=secret + "\n", retry_budget_s=0.3)
    try:
        with pytest.raises(VaultMisconfigured) as caught:
            gateway.kv.read("tenants/t1/integrations/shopify")
    finally:
        gateway.close()
    assert "X-Vault-Token" in str(caught.value)
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value.__cause__) + repr(caught.value.__context__)
    assert node.requests == []


def test_client_certificates_are_refused_rather_than_ignored() -> None:
    pool = ConnectionPool(verify=True, timeout_s=1, maxsize=1)
    with pytest.raises(ValueError, match="client certificates"):
        PooledAdapter(
            pool=pool,
            headers_for_call=dict,
            base_uri="https://vault:8200",
            cert=("client.pem", "client.key"),
        )
