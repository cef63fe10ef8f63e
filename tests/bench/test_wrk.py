"""bench/wrk.py drives wrk as the bench says: every target, its headers and bodies as given,
a fresh counter in every write, and figures read back from wrk itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from bench import process, wrk
from tests.support.loopback import Serving

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make test installs it)"
)


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str, str, bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append(
            (
                self.command,
                self.path,
                self.headers.get("Host", ""),
                self.headers.get("Authorization", ""),
                body,
            )
        )
        status = 404 if self.path == "/missing" else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    with Serving(_Recorder, join_handlers=False) as httpd:
        yield httpd.base_url


def test_every_target_is_sent_as_given_and_every_write_differs(server: str) -> None:
    tricky = 'Bearer a"b\\c\u00e9'
    result = wrk.measure(
        {
            "base_url": server,
            "concurrency": 2,
            "duration_s": 1,
            "warmup_s": 0,
            "targets": [
                {"method": "GET", "path": "/a?x=1", "headers": {"Authorization": tricky}},
                {"method": "PATCH", "path": "/b", "headers": {}, "body": '{"n": "w {n}"}'},
                {"method": "GET", "path": "/missing", "headers": {}, "body": None},
            ],
        },
        # The recorder serves from this process: its CPU is the server's.
        cpu={"server": lambda: process.tree_cpu_s(os.getpid())},
    )
    seen = _Recorder.seen
    assert result["cpu_ms_per_request"]["server"] > 0
    assert result["generator"] == "wrk"
    assert result["requests"] > 0
    assert result["rps"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["non_2xx_3xx"] > 0  # the /missing target's 404s are counted
    assert {(m, p) for m, p, *_ in seen} == {
        ("GET", "/a?x=1"),
        ("PATCH", "/b"),
        ("GET", "/missing"),
    }
    assert all(host == server.removeprefix("http://") for _, _, host, _, _ in seen)
    sent = {auth.encode("latin-1").decode() for m, p, _, auth, _ in seen if p == "/a?x=1"}
    assert sent == {tricky}  # the exact UTF-8 bytes given
    writes = [body for m, *_, body in seen if m == "PATCH"]
    assert len(writes) == len(set(writes)) > 1
    assert all(b.startswith(b'{"n": "w ') and b"{n}" not in b for b in writes)


def test_the_threads_start_spread_over_the_targets(server: str) -> None:
    paths = [f"/t{i}" for i in range(20_000)]
    wrk.measure(
        {
            "base_url": server,
            "concurrency": 2,
            "duration_s": 1,
            "warmup_s": 0,
            "targets": [{"method": "GET", "path": p, "headers": {}} for p in paths],
        }
    )
    seen = {int(path.removeprefix("/t")) for _, path, *_ in _Recorder.seen}
    # One thread from the start, the other from half-way: not one step behind the first.
    assert any(n < 100 for n in seen)
    assert any(10_000 <= n < 10_100 for n in seen)


def test_calls_in_series_add_up() -> None:
    a = {
        "concurrency": 1,
        "rps": 1000.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "non_2xx_3xx": 0,
        "errors": {},
        "loadgen_cpu": 0.1,
    }
    b = {**a, "rps": 500.0, "p50_ms": 2.0, "p99_ms": 3.0, "loadgen_cpu": 0.2}
    a["cpu_ms_per_request"] = {"vault": 0.25, "broker": 0.0}
    b["cpu_ms_per_request"] = {"vault": 0.5}
    both = wrk.in_series([a, b])
    # Only what every call measured adds up.
    assert both["cpu_ms_per_request"] == {"vault": 0.75}
    assert both["rps"] == pytest.approx(1 / (1 / 1000 + 1 / 500), abs=0.1)
    assert (both["p50_ms"], both["p99_ms"], both["loadgen_cpu"]) == (3.0, 5.0, 0.2)


def test_the_cpu_of_a_process_counts_its_live_descendants() -> None:
    """A `--workers N` supervisor serves nothing itself: its workers' CPU must count."""
    code = "import sys; sum(range(3_000_000)); print('done', flush=True); sys.stdin.read()"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "done"
        assert process.tree_cpu_s(child.pid) > 0
        assert child.pid in process.process_tree(os.getpid())
        child.communicate("")
