"""The seed's helper methods, on the service layer, against real PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import NotFound, UpstreamUnavailable, ValidationFailed
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.settings import service
from broker.settings.schemas import SETTINGS_GROUPS, STORED, SettingsView, default_group
from tests.support.tenants import new_tenant_id
from tests.support.tokens import bearer, token


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


# What a tenant-controlled DNS zone could answer for the URLs it puts in settings.
SETTINGS_DNS = {
    "cdn.example.com": ["93.184.216.34"],
    "hooks.example.com": ["93.184.216.34", "2606:4700:4700::1111"],
    "inward.example.com": ["10.20.30.40"],
    "meta.example.com": ["169.254.169.254"],
    "split.example.com": ["93.184.216.34", "127.0.0.1"],
    "mapped.example.com": ["::ffff:192.168.0.1"],
}


def settings_resolver(host: str, port: int) -> list[str]:
    try:
        return list(SETTINGS_DNS[host])
    except KeyError:
        raise OSError("NXDOMAIN") from None


def _patch(engine: Engine, tenant: str, patch: dict[str, object], egress: EgressClient) -> int:
    admin = Principal(
        subject="alice", kind="user", scopes=frozenset({"tenant:admin"}), tenant_id=tenant
    )
    with unit_of_work(engine) as session:
        row = service.patch_settings(
            session, principal=admin, tenant_id=tenant, patch=patch, if_match=None, egress=egress
        )
        return row.version


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"branding": {"logo_url": "https://inward.example.com/logo.png"}}, "branding.logo_url"),
        (
            {"compliance_settings": {"terms_url": "https://meta.example.com/terms"}},
            "compliance_settings.terms_url",
        ),
        (
            {
                "webhooks": {
                    "endpoints": [
                        {"url": "https://hooks.example.com/in", "events": ["order.created"]},
                        {"url": "https://split.example.com/in", "events": ["order.created"]},
                    ]
                }
            },
            "webhooks.endpoints.1.url",
        ),
        (
            {"compliance_settings": {"privacy_policy_url": "https://mapped.example.com/p"}},
            "compliance_settings.privacy_policy_url",
        ),
        ({"branding": {"logo_url": "https://nxdomain.example.com/l.png"}}, "branding.logo_url"),
    ],
)
def test_urls_that_resolve_to_non_public_addresses_are_refused(
    engine: Engine, tenant: str, patch: dict[str, object], field: str
) -> None:
    egress = EgressClient(EgressPolicy(), resolver=settings_resolver)
    with pytest.raises(ValidationFailed) as refused:
        _patch(engine, tenant, patch, egress)
    assert refused.value.extra["errors"][0]["field"] == field
    assert "example.com" not in str(refused.value) + str(refused.value.extra)
    with unit_of_work(engine) as session:
        assert service.get_settings(session, tenant_id=tenant).version == 1


def test_public_urls_are_stored_and_unchanged_ones_are_not_resolved_again(
    engine: Engine, tenant: str
) -> None:
    lookups: list[str] = []

    def counting_resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return settings_resolver(host, port)

    egress = EgressClient(EgressPolicy(), resolver=counting_resolver)
    hook = {"url": "https://hooks.example.com/in", "events": ["order.created"]}
    version = _patch(
        engine,
        tenant,
        {
            "branding": {"logo_url": "https://cdn.example.com/l.png"},
            "webhooks": {"endpoints": [hook]},
        },
        egress,
    )
    assert version == 2
    assert sorted(lookups) == ["cdn.example.com", "hooks.example.com"]
    # Another field of the same group: the stored logo URL is not judged again.
    assert _patch(engine, tenant, {"branding": {"business_name": "Acme"}}, egress) == 3
    assert len(lookups) == 2


def test_a_hung_resolver_is_a_503_within_the_egress_timeout(engine: Engine, tenant: str) -> None:
    released = threading.Event()

    def hung_resolver(host: str, port: int) -> list[str]:
        released.wait(10)
        return ["93.184.216.34"]

    egress = EgressClient(EgressPolicy(timeout_s=0.5), resolver=hung_resolver)
    try:
        with pytest.raises(UpstreamUnavailable):
            _patch(engine, tenant, {"branding": {"logo_url": "https://cdn.example.com/x"}}, egress)
    finally:
        released.set()


@pytest.mark.parametrize("updated_by", ["user:alice", None])
def test_the_body_put_together_group_by_group_is_the_views_json(updated_by: str | None) -> None:
    groups: dict[str, str | None] = {
        name: json.dumps(default_group(name)) for name in SETTINGS_GROUPS
    }
    # Stored before a rule tightened, a group never stored, an empty one, non-ASCII text.
    groups["branding"] = json.dumps(
        {"logo_url": "https://10.0.0.5/logo.png", "business_name": 'Caf\u00e9 "<x>"'}
    )
    groups["feature_flags"] = None
    groups["business_hours"] = "{}"
    at = datetime(2026, 11, 30, 18, 0, 1, 123456, tzinfo=UTC)
    row = ("shop", 7, at, updated_by, *groups.values())
    view = SettingsView.model_validate(
        {
            "tenant_id": "shop",
            "version": 7,
            "updated_at": at,
            "updated_by": updated_by,
            **{name: json.loads(text or "{}") for name, text in groups.items()},
        },
        context=STORED,
    )
    assert service._render(row) == view.model_dump_json().encode()
