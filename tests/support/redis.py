"""A real redis-server on a free loopback port, for the shared rate-limit tests."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from broker.devstack.openbao import _die_with_parent_preexec, free_port

REDIS_MISSING = (
    "redis-server is not installed on this machine (`make test` installs it with apt "
    "when root); shared limits across processes are untested here"
)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start redis-server (skipping the test without one); yields the process and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(REDIS_MISSING)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent_preexec(),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM until continued
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
