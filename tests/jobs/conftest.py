"""Worker processes for the job queue tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from broker.core.config import Settings
from tests.support.workers import Workers


@pytest.fixture
def workers(settings: Settings, engine: Engine, tmp_path: Path) -> Iterator[Workers]:
    """Start real worker processes; any still running at the end is killed."""
    with Workers(settings, engine, tmp_path) as started:
        yield started
