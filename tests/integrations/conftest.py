"""Fixtures the integration tests share."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from broker.core.logging import configure_logging
from tests.fakes.shopify_oauth import FakeClock


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The time both a module's fake provider and its broker judge expiry by."""
    return FakeClock()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the broker logs during the test, at DEBUG, to scan for leaks."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield stream
    root.handlers, root.level = saved[0], saved[1]
