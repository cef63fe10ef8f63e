"""OpenBaoServer against the real bundled ``bao`` binary (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.devstack.openbao import OpenBaoServer, free_port
from tests.support import processes
from tests.support.processes import alive

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_dead(pid: int, timeout: float = 15.0) -> bool:
    return processes.wait_dead(pid, timeout)


def api(bao: OpenBaoServer) -> httpx.Client:
    return httpx.Client(
        base_url=f"{bao.addr}/v1", headers={"X-Vault-Token": bao.root_token}, timeout=10.0
    )


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with OpenBaoServer(tmp_path_factory.mktemp("bao"), ephemeral=True) as server:
        yield server


@pytest.fixture(scope="module")
def initialised_raft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped persistent server's data dir holding secret/data/probe = {"v": "kept"}."""
    data_dir = tmp_path_factory.mktemp("bao-persistent")
    with OpenBaoServer(data_dir, ephemeral=False) as server, api(server) as root:
        mount = root.post("/sys/mounts/secret", json={"type": "kv", "options": {"version": "2"}})
        assert mount.status_code == 204, mount.text
        write = root.post("/secret/data/probe", json={"data": {"v": "kept"}})
        assert write.status_code == 200, write.text
    return data_dir


def test_ephemeral_server_is_initialised_unsealed_and_active(bao: OpenBaoServer) -> None:
    assert bao.addr.startswith("http://127.0.0.1:")
    health = httpx.get(f"{bao.addr}/v1/sys/health")
    assert health.status_code == 200
    body = health.json()
    assert (body["initialized"], body["sealed"], body["standby"]) == (True, False, False)
    with api(bao) as root:
        assert root.get("/auth/token/lookup-self").json()["data"]["policies"] == ["root"]
        # Unlike `bao server -dev`, nothing is pre-mounted: the caller mounts what it needs.
        assert "secret/" not in root.get("/sys/mounts").json()["data"]


def test_server_listens_on_loopback_only(bao: OpenBaoServer) -> None:
    config = (bao.audit_log_path.parent / "config.hcl").read_text()
    assert "0.0.0.0" not in config  # noqa: S104 - checks nothing listens on all interfaces
    assert f'address = "127.0.0.1:{bao.port}"' in config


def test_audit_log_records_requests_without_secrets(bao: OpenBaoServer) -> None:
    with api(bao) as root:
        assert root.get("/auth/token/lookup-self").status_code == 200
    entries = [json.loads(line) for line in bao.audit_log_path.read_text().splitlines()]
    paths = [e["request"]["path"] for e in entries if e["type"] == "response"]
    assert "auth/token/lookup-self" in paths
    # The audit device HMACs tokens; neither log ever holds the root token in clear text.
    assert bao.root_token not in bao.audit_log_path.read_text()
    assert bao.root_token not in (bao.audit_log_path.parent / "server.log").read_text()
    assert bao.root_token not in repr(bao)


def test_seal_and_unseal(bao: OpenBaoServer) -> None:
    bao.seal()
    try:
        assert httpx.get(f"{bao.addr}/v1/sys/health").status_code == 503
    finally:
        bao.unseal()
    assert httpx.get(f"{bao.addr}/v1/sys/health").status_code == 200


def test_stop_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    server = OpenBaoServer(tmp_path).start()
    pid = server.pid
    assert pid is not None
    assert alive(pid)
    server.stop()
    assert not alive(pid)
    assert server.pid is None
    server.stop()  # second stop is a no-op
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.addr}/v1/sys/health")


def test_kill_leaves_no_process(tmp_path: Path) -> None:
    server = OpenBaoServer(tmp_path).start()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not alive(pid)
    assert server.pid is None


def test_persistent_server_keeps_data_across_restart(initialised_raft_dir: Path) -> None:
    vault_dir = initialised_raft_dir / "vault"
    assert stat.S_IMODE(vault_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((vault_dir / "init.json").stat().st_mode) == 0o600
    init = json.loads((vault_dir / "init.json").read_text())

    # A new object, as a new process would have: everything comes from the data dir.
    with OpenBaoServer(initialised_raft_dir, ephemeral=False) as server, api(server) as root:
        assert server.root_token == init["root_token"]
        read = root.get("/secret/data/probe")
        assert read.status_code == 200, read.text
        assert read.json()["data"]["data"] == {"v": "kept"}
    assert "unseal_keys_b64" in init
    assert init["unseal_keys_b64"][0] not in (vault_dir / "server.log").read_text()


def test_persistent_start_without_init_json_fails_clearly(
    initialised_raft_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(initialised_raft_dir, copy)
    (copy / "vault" / "init.json").unlink()
    server = OpenBaoServer(copy, ephemeral=False, start_timeout=15)
    with pytest.raises(RuntimeError, match=r"init\.json is missing or unreadable") as excinfo:
        server.start()
    assert "Last lines of" in str(excinfo.value)
    assert server.pid is None


def test_second_server_on_same_data_dir_fails_clearly(initialised_raft_dir: Path) -> None:
    with OpenBaoServer(initialised_raft_dir, ephemeral=False) as first:
        second = OpenBaoServer(initialised_raft_dir, ephemeral=False, start_timeout=15)
        with pytest.raises(RuntimeError, match="exited early") as excinfo:
            second.start()
        assert "failed to open bolt file" in str(excinfo.value)
        assert second.pid is None
        assert httpx.get(f"{first.addr}/v1/sys/health").status_code == 200


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    # Someone else holds the port: bao exits at once and its own error must reach the caller.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = OpenBaoServer(tmp_path, port=port, start_timeout=15)
        with pytest.raises(RuntimeError, match="exited early") as excinfo:
            server.start()
    assert "address already in use" in str(excinfo.value)
    assert str(tmp_path / "vault" / "server.log") in str(excinfo.value)
    assert server.pid is None


def test_root_token_unavailable_before_start(tmp_path: Path) -> None:
    server = OpenBaoServer(tmp_path, port=free_port())
    assert server.pid is None
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.root_token


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_parent_process(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from broker.devstack.openbao import OpenBaoServer\n"
        "server = OpenBaoServer(Path(sys.argv[1])).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    bao_pid = None
    try:
        assert parent.stdout is not None
        bao_pid = int(parent.stdout.readline())
        assert alive(bao_pid)
        parent.send_signal(signal.SIGKILL)  # no chance to run stop() or atexit handlers
        parent.wait()
        assert wait_dead(bao_pid), "bao outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if bao_pid is not None and alive(bao_pid):
            os.kill(bao_pid, signal.SIGKILL)
