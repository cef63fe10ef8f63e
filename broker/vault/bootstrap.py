"""Idempotent Vault bootstrap: mounts, policies, audited headers and the broker's AppRole.

Safe to run again and again against a live Vault: each step reads first and
changes only what differs, and the result lists what was changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hvac.exceptions

from broker.vault.gateway import AUDITED_HEADERS, VaultGateway

# Package data, so an installed broker (the production image) bootstraps without a checkout.
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parent / "policies"
BROKER_ROLE = "broker"


@dataclass
class BootstrapReport:
    """What bootstrap changed, and what it found already in place."""

    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def bootstrap(
    admin: VaultGateway,
    *,
    policies_dir: Path = DEFAULT_POLICIES_DIR,
    approle_mount: str = "approle",
    broker_token_ttl: str = "1h",  # noqa: S107 - a token lifetime, not a password
    audit_file_path: str | None = None,
) -> BootstrapReport:
    """Bring Vault to the layout the broker expects. Needs a privileged token.

    With `audit_file_path`, a file audit device is enabled through the API when
    fewer than two are enabled. HashiCorp Vault allows that; OpenBao only takes
    audit devices from its config file, so there the report says so instead.
    """
    report = BootstrapReport()
    client = admin._raw()
    _ensure_mounts(client, admin.kv.mount, admin.transit.mount, report)
    _ensure_policies(client, policies_dir, report)
    _ensure_audited_headers(client, report)
    _ensure_approle(client, approle_mount, broker_token_ttl, report)
    _ensure_audit_devices(client, audit_file_path, report)
    return report


def _ensure_mounts(client: hvac.Client, kv: str, transit: str, report: BootstrapReport) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    existing = mounts.get(f"{kv}/")
    if existing is None:
        client.sys.enable_secrets_engine("kv", path=kv, options={"version": "2"})
        report.changed.append(f"mounted KV v2 at {kv}/")
    elif existing.get("type") != "kv" or (existing.get("options") or {}).get("version") != "2":
        raise RuntimeError(f"{kv}/ is mounted but is not KV version 2")
    else:
        report.unchanged.append(f"KV v2 at {kv}/")
    if f"{transit}/" not in mounts:
        client.sys.enable_secrets_engine("transit", path=transit)
        report.changed.append(f"mounted Transit at {transit}/")
    else:
        report.unchanged.append(f"Transit at {transit}/")


def _ensure_policies(client: hvac.Client, policies_dir: Path, report: BootstrapReport) -> None:
    files = sorted(policies_dir.glob("*.hcl"))
    if not files:
        raise RuntimeError(f"no policies found in {policies_dir}")
    for path in files:
        name = path.stem
        wanted = path.read_text()
        try:
            current = client.sys.read_acl_policy(name)["data"]["policy"]
        except hvac.exceptions.InvalidPath:
            current = None
        if current == wanted:
            report.unchanged.append(f"policy {name}")
            continue
        client.sys.create_or_update_acl_policy(name=name, policy=wanted)
        report.changed.append(f"policy {name}")


def _ensure_audited_headers(client: hvac.Client, report: BootstrapReport) -> None:
    # hvac has no wrapper for this endpoint. Values are logged as-is (hmac=false):
    # they identify people and requests, not secrets, and the security team must
    # be able to read them without a hash lookup.
    response = client.adapter.get("/v1/sys/config/auditing/request-headers")
    data = response.get("data", response) if isinstance(response, dict) else {}
    configured = {name.lower() for name in (data.get("headers") or {})}
    for header in AUDITED_HEADERS:
        if header.lower() in configured:
            report.unchanged.append(f"audited header {header}")
            continue
        client.adapter.post(
            f"/v1/sys/config/auditing/request-headers/{header.lower()}", json={"hmac": False}
        )
        report.changed.append(f"audited header {header}")


def _ensure_approle(
    client: hvac.Client, mount: str, token_ttl: str, report: BootstrapReport
) -> None:
    auth_methods = client.sys.list_auth_methods()["data"]
    if f"{mount}/" not in auth_methods:
        client.sys.enable_auth_method("approle", path=mount)
        report.changed.append(f"enabled AppRole auth at {mount}/")
    policies, max_ttl = ["broker"], "24h"
    try:
        current = client.auth.approle.read_role(BROKER_ROLE, mount_point=mount)["data"]
        same = (
            current.get("token_policies") == policies
            and current.get("token_no_default_policy") is True
        )
    except hvac.exceptions.InvalidPath:
        same = False
    if same:
        report.unchanged.append(f"AppRole role {BROKER_ROLE}")
        return
    client.auth.approle.create_or_update_approle(
        BROKER_ROLE,
        token_policies=policies,
        # Only the broker policy, which lists the token's own paths it needs. Vault's
        # "default" policy holds templated paths (identity/entity/id/{{identity.entity.id}}),
        # and a templated policy is parsed again on every request of a token with an
        # entity: with it, about a quarter of OpenBao's CPU per broker call went on that.
        token_no_default_policy=True,
        token_ttl=token_ttl,
        token_max_ttl=max_ttl,
        mount_point=mount,
    )
    report.changed.append(f"AppRole role {BROKER_ROLE}")


def _ensure_audit_devices(
    client: hvac.Client, file_path: str | None, report: BootstrapReport
) -> None:
    devices = client.sys.list_enabled_audit_devices().get("data") or {}
    if file_path and len(devices) < 2 and "broker-file/" not in devices:
        try:
            client.sys.enable_audit_device(
                "file", path="broker-file", options={"file_path": file_path}
            )
            report.changed.append(f"enabled file audit device broker-file at {file_path}")
            devices = client.sys.list_enabled_audit_devices().get("data") or {}
        except hvac.exceptions.InvalidRequest:
            report.warnings.append(
                "this server refuses audit devices over the API (OpenBao): declare them in "
                "its config file, as deploy/openbao/server.hcl does"
            )
    if not devices:
        report.warnings.append(
            "no audit device is enabled: Vault will not record who read which secret"
        )
    elif len(devices) < 2:
        report.warnings.append(
            "only one audit device: if it cannot write, Vault blocks every request"
        )


def issue_broker_credentials(
    admin: VaultGateway, *, approle_mount: str = "approle"
) -> tuple[str, str]:
    """A role_id and a fresh secret_id for the broker's AppRole (dev and operators)."""
    client = admin._raw()
    role_id = client.auth.approle.read_role_id(BROKER_ROLE, mount_point=approle_mount)["data"][
        "role_id"
    ]
    secret_id = client.auth.approle.generate_secret_id(BROKER_ROLE, mount_point=approle_mount)[
        "data"
    ]["secret_id"]
    return str(role_id), str(secret_id)


def create_policy_token(admin: VaultGateway, policy: str, *, ttl: str = "24h") -> str:
    """A token holding exactly one policy (tests and dev use it)."""
    client = admin._raw()
    result = client.auth.token.create(policies=[policy], ttl=ttl, no_default_policy=True)
    return str(result["auth"]["client_token"])
