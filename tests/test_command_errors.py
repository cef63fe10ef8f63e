"""Every `broker` command run without the services it needs says what is missing in one line.

Run as a newcomer would: in a directory with no `broker dev` stack and no BROKER_* set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [
    ["serve"],
    ["worker"],
    ["bootstrap"],
    ["db", "upgrade"],
    ["keys", "rotate", "--all"],
    ["audit", "report", "--since", "1h"],
    ["migrate", "legacy", "--source-dsn", "postgresql://legacy@127.0.0.1:1/legacy"],
    ["shopify", "migrate-expiring"],
    ["leases", "list"],
    ["credentials", "report"],
]


def _fails_in_one_clear_line(command: list[str], cwd: Path, **settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "BAO_", "VAULT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", *command],
        cwd=cwd,
        env={**env, **settings},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    # A failure the CLI did not foresee says "unexpected ... (a bug ...)": these are foreseen.
    assert "unexpected" not in line, line
    # Whole variable names, so the fix can be pasted.
    assert not [word for word in line.split() if word.startswith("_")], line
    return line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_command_without_its_services_fails_in_one_clear_line(
    command: list[str], tmp_path: Path
) -> None:
    _fails_in_one_clear_line(command, tmp_path)


def test_serve_without_a_token_key_names_the_settings_to_set(tmp_path: Path) -> None:
    line = _fails_in_one_clear_line(
        ["serve"],
        tmp_path,
        BROKER_DATABASE_URL="postgresql+psycopg://broker@127.0.0.1:1/broker",
        BROKER_VAULT_TOKEN="not-a-real-token",  # noqa: S106 - never sent anywhere
    )
    assert "BROKER_JWT_JWKS_URL" in line
    assert "BROKER_JWT_PUBLIC_KEY" in line
