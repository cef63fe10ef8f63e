"""OAuth connections announce their lifecycle: connected, rotated, refresh failed, reconnect."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.events import outbox
from tests.events.test_outbox import events_of
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth
from tests.integrations.conftest import clock  # noqa: F401 - fixture
from tests.integrations.test_oauth import (  # noqa: F401 - fixtures
    _shop,
    app_client,
    connected,
    shopify,
)
from tests.support.oauth import service


def lifecycle(engine: Engine, tenant: str) -> list[tuple[str, str | None]]:
    return [(e.type, e.actor) for e in events_of(engine, tenant)]


def test_a_refresh_is_a_rotation_and_a_lost_one_is_a_failed_refresh(
    app_client: TestClient,  # noqa: F811
    shopify: FakeShopifyOAuth,  # noqa: F811
    clock: FakeClock,  # noqa: F811
    engine: Engine,
) -> None:
    tenant = connected(app_client, _shop())
    clock.advance(3600)
    shopify.lose_next_refresh_reply = True
    fetch = f"/v1/credentials/{tenant}/shopify"
    assert app_client.get(fetch, headers=service(tenant)).status_code == 503
    assert app_client.get(fetch, headers=service(tenant)).status_code == 200
    assert lifecycle(engine, tenant) == [
        (outbox.CREDENTIAL_SAVED, "user:alice"),
        (outbox.REFRESH_FAILED, "service:sync"),
        (outbox.CREDENTIAL_ROTATED, "service:sync"),
    ]
    saved, failed, rotated = events_of(engine, tenant)
    assert saved.detail["kind"] == "oauth"
    assert failed.detail["reason"] == "provider_unavailable"
    assert rotated.version == saved.version + 1  # type: ignore[operator]


def test_a_revoked_grant_announces_one_reconnect(
    app_client: TestClient,  # noqa: F811
    shopify: FakeShopifyOAuth,  # noqa: F811
    clock: FakeClock,  # noqa: F811
    engine: Engine,
) -> None:
    shop = _shop()
    tenant = connected(app_client, shop)
    shopify.revoke_grant(shop)
    clock.advance(3600)
    fetch = f"/v1/credentials/{tenant}/shopify"
    assert app_client.get(fetch, headers=service(tenant)).status_code == 409
    assert app_client.get(fetch, headers=service(tenant)).status_code == 409
    reconnects = [e for e in events_of(engine, tenant) if e.type == outbox.RECONNECT_NEEDED]
    assert [(e.provider, e.state, e.detail["reason"]) for e in reconnects] == [
        ("shopify", "needs_reconnect", "invalid_grant")
    ]
