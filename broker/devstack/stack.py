"""The embedded default stack behind `broker dev`: OpenBao, PostgreSQL, bootstrap, demo data."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.auth.tokens import mint_token
from broker.core.config import Settings
from broker.core.db import make_engine, unit_of_work, upgrade
from broker.devstack.datadir import dev_signing_key, remove_env_file, write_env_file
from broker.devstack.openbao import OpenBaoServer
from broker.devstack.postgres import EmbeddedPostgres
from broker.models import Tenant
from broker.tenants import service as tenants
from broker.tenants.keys import backfill_keys
from broker.vault.bootstrap import bootstrap, issue_broker_credentials
from broker.vault.gateway import VaultGateway

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
SYSTEM = Principal(subject="broker-dev", kind="user", scopes=frozenset({Scope.PLATFORM_ADMIN}))


@dataclass(frozen=True)
class DevTokens:
    """Ready-to-use bearer tokens for each kind of user, for the demo tenant."""

    tenant_admin: str
    finance: str
    service: str
    security_auditor: str
    platform_admin: str


def mint_dev_tokens(settings: Settings, key: str, *, ttl_s: int = 12 * 3600) -> DevTokens:
    """One token per kind of user, signed with the dev key."""

    def mint(subject: str, scopes: list[str], **claims: object) -> str:
        return mint_token(
            key,
            subject=subject,
            scopes=scopes,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_s=ttl_s,
            **claims,  # type: ignore[arg-type]
        )

    return DevTokens(
        tenant_admin=mint("demo-admin", [Scope.TENANT_ADMIN], tenant_id=DEMO_TENANT),
        finance=mint(
            "demo-finance", [Scope.FINANCE_VIEW, Scope.FINANCE_MANAGE], tenant_id=DEMO_TENANT
        ),
        service=mint(
            "messaging-worker", [Scope.CREDENTIALS_READ], kind="service", tenants=[DEMO_TENANT]
        ),
        security_auditor=mint("security-team", [Scope.AUDIT_READ]),
        platform_admin=mint("platform-operator", [Scope.PLATFORM_ADMIN]),
    )


def start_dev_stack(stack: ExitStack, data_dir: Path, base: Settings) -> Settings:
    """Start (or restart) everything `broker dev` needs and return the settings to serve with.

    Every process started here is registered on `stack`, so closing it (Ctrl-C)
    stops them all. The data dir keeps Vault's raft storage, PostgreSQL's data
    and the dev signing key, so a restart finds the same tenants and secrets.
    """
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    bao = stack.enter_context(OpenBaoServer(data_dir, ephemeral=False))
    log.info("openbao is up", extra={"fields": {"addr": bao.addr}})

    if base.database_url is not None:
        database_url = base.database_url.get_secret_value()
    else:
        database_url = stack.enter_context(EmbeddedPostgres(data_dir / "postgres")).url

    admin = VaultGateway(addrs=[bao.addr], token=bao.root_token)
    try:
        report = bootstrap(admin)
        role_id, secret_id = issue_broker_credentials(admin)
    finally:
        admin.close()
    for change in report.changed:
        log.info("bootstrap changed", extra={"fields": {"change": change}})

    upgrade(database_url)
    settings = base.model_copy(
        update={
            "data_dir": data_dir,
            "database_url": SecretStr(database_url),
            "vault_addrs": [bao.addr],
            "vault_token": None,
            "vault_role_id": SecretStr(role_id),
            "vault_secret_id": SecretStr(secret_id),
            "jwt_hs256_secret": SecretStr(dev_signing_key(data_dir)),
            "jwt_jwks_url": None,
            "jwt_public_key": None,
        }
    )
    ensure_demo_tenant(settings)
    # For `broker` commands and `bao` run beside this stack; its addresses change on
    # every start, so the file goes when the stack stops.
    stack.callback(remove_env_file, data_dir)
    write_env_file(data_dir, dev_env(settings, root_token=bao.root_token))
    return settings


def dev_env(settings: Settings, *, root_token: str) -> dict[str, str]:
    """What operator commands need to reach this stack: a privileged token, not the AppRole."""
    addr = settings.vault_addrs[0]
    return {
        "BROKER_DATA_DIR": str(settings.data_dir),
        "BROKER_DATABASE_URL": _database_url(settings),
        "BROKER_VAULT_ADDRS": addr,
        "BROKER_VAULT_TOKEN": root_token,
        "BAO_ADDR": addr,
        "BAO_TOKEN": root_token,
        "VAULT_ADDR": addr,
        "VAULT_TOKEN": root_token,
    }


def ensure_demo_tenant(settings: Settings) -> None:
    """Create the demo tenant on first start, and any missing tenant keys."""
    engine = make_engine(_database_url(settings))
    vault = VaultGateway.from_settings(settings)
    try:
        with unit_of_work(engine) as session:
            if session.get(Tenant, DEMO_TENANT) is None:
                tenants.create_tenant(
                    session, vault, principal=SYSTEM, tenant_id=DEMO_TENANT, name="Demo Shop"
                )
        backfill_keys(engine, vault)
    finally:
        vault.close()
        engine.dispose()


def _database_url(settings: Settings) -> str:
    """The stack's database URL, which `start_dev_stack` always sets."""
    if settings.database_url is None:
        raise RuntimeError("the dev stack's settings name no database")
    return settings.database_url.get_secret_value()
