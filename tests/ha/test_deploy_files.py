"""The HA deployment files: raft node configs, Vault Helm values, the broker's Kubernetes manifests.

Parsed and checked for the properties production needs (TLS, retry_join, two audit devices,
performance_multiplier = 1, replicas, probes, disruption budget, requests, Vault credentials
from AppRole Secrets, egress limits). The OpenBao config is also run for real: three `bao`
processes started from deploy/openbao/raft-node.hcl (paths, ports and names mapped to a
temporary directory and 127.0.0.1) form one TLS cluster that the broker's gateway bootstraps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from broker.core.config import Settings
from broker.devstack.openbao import BaoProcess, free_port
from broker.vault.bootstrap import bootstrap
from broker.vault.gateway import VaultGateway

yaml = pytest.importorskip("yaml")
trustme = pytest.importorskip("trustme")

REPO_ROOT = Path(__file__).resolve().parents[2]
OPENBAO_NODE = REPO_ROOT / "deploy" / "openbao" / "raft-node.hcl"
VAULT_NODE = REPO_ROOT / "deploy" / "vault" / "raft-node.hcl"
HELM_VALUES = REPO_ROOT / "deploy" / "helm" / "vault-values.yaml"
K8S = REPO_ROOT / "deploy" / "k8s"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
BROKER_VAR = re.compile(r"^BROKER_[A-Z0-9_]+$")


# -- a parser for the HCL these files use ---------------------------------------------------
#
# Attributes (`key = "string" | number | true | false`) and blocks (`type "label"... { }`).
# Anything else (lists, heredocs, expressions) is a ValueError, so a config that outgrows
# this subset fails loudly here instead of being half-checked.

_TOKEN = re.compile(
    r'\s+|#[^\n]*|//[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<punct>[{}=])|(?P<word>[A-Za-z0-9_.+-]+)'
)


@dataclass
class Block:
    """One HCL block: its attributes and its nested blocks."""

    type: str = ""
    labels: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def all(self, type_: str) -> list[Block]:
        return [b for b in self.blocks if b.type == type_]

    def one(self, type_: str, *labels: str) -> Block:
        found = [b for b in self.all(type_) if b.labels[: len(labels)] == labels]
        assert len(found) == 1, f"expected one {type_} {labels}, found {len(found)}"
        return found[0]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unsupported HCL at {text[pos : pos + 30]!r}")
        pos = match.end()
        for kind in ("str", "punct", "word"):
            if match.group(kind) is not None:
                out.append((kind, match.group(kind)))
    return out


def _value(kind: str, raw: str) -> Any:
    if kind == "str":
        return bytes(raw[1:-1], "utf-8").decode("unicode_escape")
    if raw in ("true", "false"):
        return raw == "true"
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    raise ValueError(f"unsupported HCL value {raw!r}")


def parse_hcl(text: str) -> Block:
    tokens = _tokens(text)
    root = Block()
    stack = [root]
    i = 0
    while i < len(tokens):
        kind, raw = tokens[i]
        if (kind, raw) == ("punct", "}"):
            stack.pop()
            assert stack, "unbalanced }"
            i += 1
            continue
        if kind != "word":
            raise ValueError(f"unexpected {raw!r}")
        if tokens[i + 1] == ("punct", "="):
            value_kind, value_raw = tokens[i + 2]
            stack[-1].attrs[raw] = _value(value_kind, value_raw)
            i += 3
            continue
        labels = []
        j = i + 1
        while tokens[j][0] == "str":
            labels.append(_value(*tokens[j]))
            j += 1
        if tokens[j] != ("punct", "{"):
            raise ValueError(f"expected {{ after block {raw}")
        block = Block(type=raw, labels=tuple(labels))
        stack[-1].blocks.append(block)
        stack.append(block)
        i = j + 1
    assert len(stack) == 1, "unbalanced {"
    return root


def check_raft_node(config: Block, *, data_path: str) -> list[Block]:
    """The properties every production raft node shares (Vault and OpenBao alike)."""
    assert config.attrs.get("ui") is False
    storage = config.one("storage", "raft")
    assert storage.attrs["path"] == data_path
    assert storage.attrs["performance_multiplier"] == 1
    joins = storage.all("retry_join")
    assert len(joins) == 3, "retry_join should list all three nodes"
    addrs = [join.attrs["leader_api_addr"] for join in joins]
    assert len(set(addrs)) == 3
    for join in joins:
        assert join.attrs["leader_api_addr"].startswith("https://")
        assert join.attrs["leader_ca_cert_file"]
        host = urlparse(join.attrs["leader_api_addr"]).hostname
        assert join.attrs["leader_tls_servername"] == host
    listeners = config.all("listener")
    assert listeners, "no listener"
    for listener in listeners:
        assert listener.labels == ("tcp",)
        assert listener.attrs.get("tls_disable") in (False, 0, None), "a listener without TLS"
        assert listener.attrs["tls_cert_file"]
        assert listener.attrs["tls_key_file"]
        assert listener.attrs["tls_min_version"] in ("tls12", "tls13")
        assert listener.attrs["cluster_address"].endswith(":8201")
    return joins


# -- deploy/openbao/raft-node.hcl ----------------------------------------------------------


def test_openbao_node_config_has_tls_retry_join_and_two_audit_devices() -> None:
    config = parse_hcl(OPENBAO_NODE.read_text())
    joins = check_raft_node(config, data_path="/openbao/data")
    assert config.attrs["api_addr"].startswith("https://")
    assert config.attrs["cluster_addr"].startswith("https://")
    assert urlparse(config.attrs["api_addr"]).hostname in {
        urlparse(join.attrs["leader_api_addr"]).hostname for join in joins
    }
    # Reads only on the active node: no stale read right after a write, for any client.
    assert config.attrs["disable_standby_reads"] is True
    audits = config.all("audit")
    assert len(audits) == 2
    assert {a.labels[0] for a in audits} == {"file"}
    assert len({a.labels[1] for a in audits}) == 2
    paths = {a.one("options").attrs["file_path"] for a in audits}
    assert len(paths) == 2
    assert "stdout" in paths


@dataclass
class TlsNode:
    index: int
    port: int
    cluster_port: int
    dir: Path
    process: BaoProcess = field(init=False)

    def __post_init__(self) -> None:
        # The per-node values, from the environment as the file's header says.
        self.process = BaoProcess(
            self.dir,
            env={
                "BAO_RAFT_NODE_ID": f"openbao-{self.index}",
                "BAO_API_ADDR": self.addr,
                "BAO_CLUSTER_ADDR": f"https://127.0.0.1:{self.cluster_port}",
            },
        )

    @property
    def addr(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


def localise(config: str, node: TlsNode, nodes: list[TlsNode], tls_dir: Path) -> str:
    """deploy/openbao/raft-node.hcl with paths under tmp and every address on 127.0.0.1.

    Host names stay in leader_tls_servername: the certificate names them, so retry_join's
    TLS check is the production one. The audit path becomes relative (each node runs in its
    own directory), because audit declarations must be identical on every node.
    """
    text = config.replace("/openbao/tls/", f"{tls_dir}/")
    text = text.replace('"/openbao/data"', f'"{node.dir / "data"}"')
    text = text.replace('"/openbao/audit/audit.log"', '"audit/audit.log"')
    text = text.replace('"0.0.0.0:8200"', f'"127.0.0.1:{node.port}"')  # noqa: S104 - replaced
    text = text.replace('"0.0.0.0:8201"', f'"127.0.0.1:{node.cluster_port}"')  # noqa: S104
    for peer in nodes:
        text = text.replace(
            f'"https://openbao-{peer.index}.openbao-internal:8200"', f'"{peer.addr}"'
        )
    assert "0.0.0.0" not in text  # noqa: S104 - checks that nothing listens on all interfaces
    return text


def _certificates(tls_dir: Path) -> None:
    """A CA, and one certificate naming every node (and 127.0.0.1), as deployed."""
    tls_dir.mkdir()
    ca = trustme.CA()
    names = [f"openbao-{i}.openbao-internal" for i in range(3)]
    cert = ca.issue_cert(*names, "127.0.0.1")
    ca.cert_pem.write_to_path(str(tls_dir / "ca.crt"))
    cert.private_key_pem.write_to_path(str(tls_dir / "tls.key"))
    (tls_dir / "tls.crt").write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[list[TlsNode], Path]]:
    """Three OpenBao processes from the production config, TLS on 127.0.0.1, not yet init."""
    tls_dir = tmp_path / "tls"
    _certificates(tls_dir)
    ports = [free_port() for _ in range(6)]
    while len(set(ports)) < 6:
        ports = [free_port() for _ in range(6)]
    nodes = [TlsNode(i, ports[2 * i], ports[2 * i + 1], tmp_path / f"node-{i}") for i in range(3)]
    source = OPENBAO_NODE.read_text()
    try:
        for node in nodes:
            (node.dir / "data").mkdir(parents=True)
            (node.dir / "audit").mkdir()
            node.process.start(localise(source, node, nodes, tls_dir), label=node.addr)
        yield nodes, tls_dir / "ca.crt"
    finally:
        for node in nodes:
            node.process.stop(15)


@dataclass
class TlsCluster:
    """Talks to the three TLS nodes, failing with a node's log when it takes too long."""

    nodes: list[TlsNode]
    tls: ssl.SSLContext
    deadline: float = field(default_factory=lambda: time.monotonic() + 60)

    def health(self, node: TlsNode) -> int | None:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{node.addr}/v1/sys/health", verify=self.tls, timeout=2).status_code
        return None

    def wait_health(self, node: TlsNode, wanted: set[int]) -> None:
        while self.health(node) not in wanted:
            assert node.process.running, node.log()[-3000:]
            assert time.monotonic() < self.deadline, node.log()[-3000:]
            time.sleep(0.1)

    def initialise(self, first: TlsNode) -> tuple[str, str]:
        """Initialise and unseal the first node: (unseal key, root token)."""
        self.wait_health(first, {501})  # listening over TLS, not initialised
        init = httpx.put(
            f"{first.addr}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            verify=self.tls,
            timeout=30,
        )
        assert init.status_code == 200, init.text
        key, root = init.json()["keys_base64"][0], init.json()["root_token"]
        unsealed = httpx.put(
            f"{first.addr}/v1/sys/unseal", json={"key": key}, verify=self.tls, timeout=30
        )
        assert unsealed.status_code == 200
        self.wait_health(first, {200})
        return key, root

    def join(self, node: TlsNode, key: str) -> None:
        # retry_join (over TLS, checking leader_tls_servername) fetches the challenge; the
        # unseal key completes the join.
        while True:
            with contextlib.suppress(httpx.TimeoutException):
                answer = httpx.put(
                    f"{node.addr}/v1/sys/unseal", json={"key": key}, verify=self.tls, timeout=5
                )
                if answer.status_code == 200 and not answer.json()["sealed"]:
                    return
            assert time.monotonic() < self.deadline, node.log()[-3000:]
            time.sleep(0.2)

    def raft_node_ids(self, http: httpx.Client) -> list[str]:
        """The raft servers' node ids, once all three are listed."""
        while True:
            servers = http.get("/v1/sys/storage/raft/configuration").json()["data"]["config"]
            ids = sorted(server["node_id"] for server in servers["servers"])
            if len(ids) == 3:
                return ids
            assert time.monotonic() < self.deadline, ids
            time.sleep(0.2)


def test_openbao_node_config_forms_a_three_node_tls_cluster(
    tls_cluster: tuple[list[TlsNode], Path],
) -> None:
    nodes, ca_file = tls_cluster
    cluster = TlsCluster(nodes, ssl.create_default_context(cafile=str(ca_file)))
    first = nodes[0]
    key, root = cluster.initialise(first)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda node: cluster.join(node, key), nodes[1:]))
    for node in nodes[1:]:
        cluster.wait_health(node, {429})  # unsealed standby

    with httpx.Client(
        base_url=first.addr, verify=cluster.tls, timeout=10, headers={"X-Vault-Token": root}
    ) as http:
        assert cluster.raft_node_ids(http) == ["openbao-0", "openbao-1", "openbao-2"]
        leader = http.get("/v1/sys/leader").json()
        assert leader["leader_address"] == first.addr  # from BAO_API_ADDR

    # The broker's gateway, over TLS with the CA, on all three addresses: it finds the
    # active node and bootstraps through it; both audit devices record the requests.
    gateway = VaultGateway(addrs=[n.addr for n in reversed(nodes)], token=root, verify=str(ca_file))
    try:
        bootstrap(gateway)
        assert gateway.address == first.addr
        path = "tenants/deploy-check/integrations/openai"
        assert gateway.kv.write(path, {"ciphertext": "x"}, cas=0) == 1
        entry = gateway.kv.read(path)
        assert entry is not None
        assert entry.version == 1
    finally:
        gateway.close()
    audit_file = first.dir / "audit" / "audit.log"
    assert "sys/mounts" in audit_file.read_text()
    stdout_entries = [line for line in first.log().splitlines() if line.startswith('{"')]
    assert any("sys/mounts" in line for line in stdout_entries)
    for node in nodes:
        log = node.log()
        assert "unknown or unsupported field" not in log, log[-2000:]
        assert "x509" not in log, log[-2000:]


# -- deploy/vault/raft-node.hcl ------------------------------------------------------------


def test_vault_node_config_has_tls_retry_join_and_documents_two_audit_devices() -> None:
    text = VAULT_NODE.read_text()
    config = parse_hcl(text)
    check_raft_node(config, data_path="/vault/data")
    assert config.attrs["api_addr"].startswith("https://")
    assert config.attrs["cluster_addr"].startswith("https://")
    assert config.attrs["disable_mlock"] is True
    # Vault has no audit stanza: devices are enabled through the API, as the header says.
    assert not config.all("audit")
    commands = re.findall(r"^#\s+vault audit enable (.+)$", text, re.MULTILINE)
    assert len(commands) == 2
    paths = {re.search(r"-path=(\S+)", c).group(1) for c in commands}  # type: ignore[union-attr]
    files = {re.search(r"file_path=(\S+)", c).group(1) for c in commands}  # type: ignore[union-attr]
    assert len(paths) == 2
    assert len(files) == 2
    assert "stdout" in files


# -- deploy/helm/vault-values.yaml -----------------------------------------------------------


@pytest.fixture(scope="module")
def helm_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(HELM_VALUES.read_text())
    return values


def test_vault_helm_values_run_three_raft_voters_with_tls(helm_values: dict[str, Any]) -> None:
    assert set(helm_values) <= {"global", "injector", "server", "ui", "csi", "serverTelemetry"}
    assert helm_values["global"]["tlsDisable"] is False
    server = helm_values["server"]
    assert server["standalone"]["enabled"] is False
    assert not server.get("dev", {}).get("enabled", False)
    ha = server["ha"]
    assert ha["enabled"] is True
    assert ha["replicas"] == 3
    assert ha["raft"]["enabled"] is True
    assert ha["raft"]["setNodeId"] is True
    assert ha["disruptionBudget"]["enabled"] is True
    assert ha["disruptionBudget"]["maxUnavailable"] == 1
    assert ha["apiAddr"].startswith("https://")
    assert server["resources"]["requests"]["cpu"]
    assert server["resources"]["requests"]["memory"]
    assert server["dataStorage"]["enabled"] is True
    assert server["auditStorage"]["enabled"] is True

    config = parse_hcl(ha["raft"]["config"])
    joins = check_raft_node(config, data_path="/vault/data")
    assert config.one("service_registration", "kubernetes") is not None
    # The hosts retry_join names are the StatefulSet's pods behind the headless service.
    hosts = sorted(urlparse(j.attrs["leader_api_addr"]).hostname or "" for j in joins)
    assert hosts == [f"vault-{i}.vault-internal" for i in range(3)]
    # Every file the config names is on the mounted TLS secret.
    mounts = [m["mountPath"] for m in server["volumeMounts"]]
    files = [config.one("listener").attrs[k] for k in ("tls_cert_file", "tls_key_file")]
    files += [j.attrs["leader_ca_cert_file"] for j in joins]
    for path in files:
        assert any(path.startswith(mount + "/") for mount in mounts), path
    volumes = {v["name"]: v for v in server["volumes"]}
    for mount in server["volumeMounts"]:
        assert volumes[mount["name"]]["secret"]["secretName"]

    assert helm_values["injector"]["enabled"] is True
    assert helm_values["ui"]["enabled"] is False


# -- deploy/k8s/ ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> manifest, for every document under deploy/k8s/."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in found, f"two {doc['kind']} manifests"
                found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (broker,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = broker
    return result


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_manifest_lives_in_the_broker_namespace(
    manifests: dict[str, dict[str, Any]],
) -> None:
    for kind, doc in manifests.items():
        if kind in ("Kustomization", "Namespace"):
            continue
        assert doc["metadata"]["namespace"] == manifests["Namespace"]["metadata"]["name"], kind


def test_deployment_runs_replicas_with_probes_and_requests(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def probe_path(name: str) -> str:
        probe = container[name]["httpGet"]
        assert probe["port"] in ports or probe["port"] in ports.values()
        return str(probe["path"])

    assert probe_path("livenessProbe") == "/healthz"
    assert probe_path("readinessProbe") == "/readyz"
    assert probe_path("startupProbe") == "/healthz"
    requests = container["resources"]["requests"]
    assert requests["cpu"]
    assert requests["memory"]
    assert container["resources"]["limits"]["memory"]


def test_deployment_runs_unprivileged_as_the_image_user(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    uid = re.search(r"useradd\b.*--uid (\d+)", DOCKERFILE.read_text())
    assert uid is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid.group(1)
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def test_deployment_gets_vault_credentials_from_approle_secrets(container: dict[str, Any]) -> None:
    env = _env(container)
    assert "BROKER_VAULT_TOKEN" not in env, "a static token in a manifest"
    for name in ("BROKER_VAULT_ROLE_ID", "BROKER_VAULT_SECRET_ID", "BROKER_DATABASE_URL"):
        assert "value" not in env[name], f"{name} must come from a Secret"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"]
        assert ref["key"]
    assert (
        env["BROKER_VAULT_ROLE_ID"]["valueFrom"]["secretKeyRef"]["name"]
        == (env["BROKER_VAULT_SECRET_ID"]["valueFrom"]["secretKeyRef"]["name"])
    )


def test_deployment_environment_is_a_valid_production_configuration(
    container: dict[str, Any], helm_values: dict[str, Any]
) -> None:
    env = _env(container)
    fields = set(Settings.model_fields)
    for name in env:
        assert BROKER_VAR.match(name), name
        assert name.removeprefix("BROKER_").lower() in fields, f"{name} is not a broker setting"
    values = {
        name.removeprefix("BROKER_").lower(): item.get("value", f"from-a-secret-{name.lower()}")
        for name, item in env.items()
    }
    values["database_url"] = "postgresql+psycopg://broker:secret@postgres.database.svc/broker"
    settings = Settings(_env_file=None, **values)  # refuses unsafe production settings
    assert settings.env == "production"
    # All three Vault nodes, over TLS, by the names the Helm values' raft peers use.
    assert len(settings.vault_addrs) == 3
    hosts = sorted(urlparse(addr).hostname or "" for addr in settings.vault_addrs)
    assert hosts == [f"vault-{i}.vault-internal.vault.svc" for i in range(3)]
    joins = (
        parse_hcl(helm_values["server"]["ha"]["raft"]["config"]).one("storage").all("retry_join")
    )
    peers = sorted(urlparse(j.attrs["leader_api_addr"]).hostname or "" for j in joins)
    assert [h.removesuffix(".vault.svc") for h in hosts] == peers
    # The CA file is mounted where the setting points.
    assert settings.vault_ca_cert is not None
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert str(settings.vault_ca_cert.parent) in mounts


def test_disruption_budget_keeps_a_replica_up(manifests: dict[str, dict[str, Any]]) -> None:
    budget = manifests["PodDisruptionBudget"]["spec"]
    deployment = manifests["Deployment"]["spec"]
    assert budget["selector"] == deployment["selector"]
    replicas = deployment["replicas"]
    if "maxUnavailable" in budget:
        assert 1 <= budget["maxUnavailable"] < replicas
    else:
        assert 1 <= budget["minAvailable"] < replicas


def test_service_reaches_the_broker_port(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    service = manifests["Service"]["spec"]
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in names for p in service["ports"])


def test_network_policy_limits_egress(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    policy = manifests["NetworkPolicy"]["spec"]
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    allowed: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["egress"]:
        # No rule may open every destination or every port.
        assert rule.get("to"), f"egress to anywhere: {rule}"
        assert rule.get("ports"), f"egress on every port: {rule}"
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["to"])
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block is None:
                continue
            excluded = [ipaddress.ip_network(net) for net in block.get("except", [])]
            for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"):
                network = ipaddress.ip_network(private)
                if network.subnet_of(ipaddress.ip_network(block["cidr"])):  # type: ignore[arg-type]
                    assert any(network.subnet_of(e) for e in excluded), (block, private)  # type: ignore[arg-type]
    assert set(allowed) == {53, 443, 5432, 6379, 8200}
    vault_peers = allowed[8200]
    assert all("ipBlock" not in peer for peer in vault_peers)
    assert vault_peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "vault"
    # Redis is used only if the deployment names it.
    assert "redis" in _env(container)["BROKER_RATE_LIMIT_STORAGE"]["value"]
