"""`broker serve` as operators run it: the real uvicorn in front of the app."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from broker.core.config import Settings
from broker.devstack.openbao import free_port
from broker.models import AuditEvent
from tests.support.tokens import TEST_SIGNING_KEY, bearer, token

STARTUP_DEADLINE_S = 60


@pytest.fixture
def served(settings: Settings, broker_vault_token: str, tmp_path: Path) -> Iterator[str]:
    """`broker serve` on a free loopback port, with no trusted proxies configured."""
    assert settings.database_url is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {
        "BROKER_ENV": "test",
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(port),
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_DATABASE_URL": settings.database_url.get_secret_value(),
        "BROKER_VAULT_ADDRS": ",".join(settings.vault_addrs),
        "BROKER_VAULT_TOKEN": broker_vault_token,
        "BROKER_JWT_HS256_SECRET": TEST_SIGNING_KEY,
        "BROKER_RATE_LIMIT_AUTH_FAILURES": "2/hour",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve"],
        env=env,
        cwd=tmp_path,  # no stray .env
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "broker serve never answered"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_forwarded_for_from_loopback_is_ignored_without_trusted_proxies(
    served: str, engine: Engine, tenant: str
) -> None:
    bad = bearer(
        token("tenant:admin", tenant_id=tenant, key="not-the-key-but-long-enough-for-hs256")
    )
    statuses = [
        httpx.get(
            f"{served}/v1/tenants/settings",
            headers=bad | {"X-Forwarded-For": f"203.0.113.{i}"},
        ).status_code
        for i in range(3)
    ]
    # A new forged address per request does not buy a new failure budget.
    assert statuses == [401, 401, 429]

    request_id = f"forged-{tenant}"
    denied = httpx.get(
        f"{served}/v1/tenants/settings",
        headers=bearer(token("finance:view", tenant_id=tenant))
        | {"X-Forwarded-For": "198.51.100.77", "X-Request-Id": request_id},
    )
    assert denied.status_code == 403
    with Session(engine) as session:
        row = session.exec(select(AuditEvent).where(AuditEvent.request_id == request_id)).one()
    # The trail names the real peer, not the address the caller claimed.
    assert row.client_addr == "127.0.0.1"
