"""Running the `broker` CLI in-process: a clean BROKER_* environment, and an invoke that
leaves the root logger as it found it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from broker.core.config import get_settings
from tests.support.apps import VaultEndpoint

# The fakes listen on http://127.0.0.1: the broker's egress guard must let it through.
LOOPBACK_EGRESS = {"EGRESS_ALLOW_HTTP": "true", "EGRESS_ALLOW_LOOPBACK": "true"}


def session_services(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str
) -> dict[str, str]:
    """The BROKER_* settings (without the prefix) for the session's PostgreSQL and Vault."""
    return {
        "ENV": "test",
        "DATABASE_URL": database_url,
        "VAULT_ADDRS": vault_endpoint.addr,
        "VAULT_TOKEN": broker_vault_token,
    }


@contextmanager
def broker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> Iterator[None]:
    """Only `values` as BROKER_* variables, run from `tmp_path` (no stray .env), with the
    cached settings dropped on the way in and out."""
    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for name, value in values.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def invoke(app: typer.Typer, args: Sequence[str]) -> Result:
    """`app ARGS`, captured."""
    # The CLI points the root logger at its (captured, then closed) stderr: put it back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        root.handlers, root.level = handlers, level
