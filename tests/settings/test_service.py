"""The seed's helper methods, on the service layer, against real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.core.db import unit_of_work
from broker.core.errors import NotFound
from broker.settings import service
from tests.conftest import bearer, new_tenant_id, token


@pytest.fixture
def nairobi_shop(client: TestClient, tenant: str) -> str:
    response = client.patch(
        "/v1/tenants/settings",
        json={
            "business_hours": {
                "timezone": "Africa/Nairobi",
                "saturday": {"open": "10:00", "close": "14:00", "closed": False},
            },
            "notification_settings": {
                "sms": {"payment_failed": False},
                "quiet_hours": {
                    "enabled": True,
                    "start": "22:00",
                    "end": "08:00",
                    "timezone": "Africa/Nairobi",
                },
            },
            "feature_flags": {"abandoned_cart_recovery": True},
        },
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert response.status_code == 200, response.text
    return tenant


def test_notification_and_feature_helpers(engine: Engine, nairobi_shop: str) -> None:
    with unit_of_work(engine) as session:
        check = service.is_notification_enabled
        assert check(session, tenant_id=nairobi_shop, channel="email", event="order_received")
        assert not check(session, tenant_id=nairobi_shop, channel="sms", event="payment_failed")
        assert not check(session, tenant_id=nairobi_shop, channel="pigeon", event="order_received")
        flag = service.is_feature_enabled
        assert flag(session, tenant_id=nairobi_shop, feature="abandoned_cart_recovery")
        assert not flag(session, tenant_id=nairobi_shop, feature="auto_handoff_enabled")
        assert not flag(session, tenant_id=nairobi_shop, feature="no_such_flag")


@pytest.mark.parametrize(
    ("utc", "open_"),
    [
        (datetime(2026, 11, 23, 5, 59, tzinfo=UTC), False),  # Monday 08:59 in Nairobi
        (datetime(2026, 11, 23, 6, 0, tzinfo=UTC), True),  # Monday 09:00
        (datetime(2026, 11, 23, 13, 59, tzinfo=UTC), True),  # Monday 16:59
        (datetime(2026, 11, 23, 14, 0, tzinfo=UTC), False),  # Monday 17:00
        (datetime(2026, 11, 28, 8, 0, tzinfo=UTC), True),  # Saturday 11:00
        (datetime(2026, 11, 29, 8, 0, tzinfo=UTC), False),  # Sunday
    ],
)
def test_open_at_this_moment_in_the_tenants_time_zone(
    engine: Engine, nairobi_shop: str, utc: datetime, open_: bool
) -> None:
    with unit_of_work(engine) as session:
        assert service.is_open_at(session, tenant_id=nairobi_shop, at=utc) is open_


@pytest.mark.parametrize(
    ("utc", "quiet"),
    [
        (datetime(2026, 11, 23, 18, 59, tzinfo=UTC), False),  # 21:59 Nairobi
        (datetime(2026, 11, 23, 19, 0, tzinfo=UTC), True),  # 22:00
        (datetime(2026, 11, 23, 23, 30, tzinfo=UTC), True),  # 02:30 next day
        (datetime(2026, 11, 24, 4, 59, tzinfo=UTC), True),  # 07:59
        (datetime(2026, 11, 24, 5, 0, tzinfo=UTC), False),  # 08:00
    ],
)
def test_quiet_hours_wrap_midnight(
    engine: Engine, nairobi_shop: str, utc: datetime, quiet: bool
) -> None:
    with unit_of_work(engine) as session:
        assert service.in_quiet_hours(session, tenant_id=nairobi_shop, at=utc) is quiet


def test_helpers_for_a_missing_tenant_raise_not_found(engine: Engine) -> None:
    with unit_of_work(engine) as session, pytest.raises(NotFound):
        service.is_feature_enabled(session, tenant_id=new_tenant_id(), feature="x")
