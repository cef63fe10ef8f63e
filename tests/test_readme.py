"""The README tells an operator what exists: every setting is in its configuration table."""

from __future__ import annotations

import re
from pathlib import Path

from broker.core.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def _configuration_table() -> list[str]:
    """The first cells of the rows of the README's "Configuration" table."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [row.split(" | ", 1)[0] for row in rows]


def _documented_variables() -> set[str]:
    # Whole names only: an abbreviation such as `_RETRY_S` makes the reader guess the
    # prefix, and a wrong guess is a setting silently ignored (extra="ignore").
    return {name for cell in _configuration_table() for name in re.findall(r"`([A-Z0-9_]+)`", cell)}


def test_every_setting_is_in_the_configuration_table() -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    variables = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    undocumented = sorted(variables - _documented_variables())
    assert not undocumented, f"add to the README's configuration table: {undocumented}"


def test_the_configuration_table_names_no_setting_that_does_not_exist() -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    variables = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    assert sorted(_documented_variables() - variables) == []
