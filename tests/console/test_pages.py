"""The console's pages do what the API does, through the same services (real Vault, DB, fakes)."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.core.config import Settings
from broker.vault.gateway import VaultGateway
from tests.console.conftest import ORIGIN, post_form, sign_in
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.stripe import FakeStripe
from tests.support.tokens import bearer, token


def _api(client: TestClient, shop: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=shop))


def _version(html: str) -> str:
    found = re.search(r'name="version" value="(\d+)"', html)
    assert found
    return found.group(1)


def submit_group(admin: TestClient, group: str, fields: dict[str, Any]) -> Any:
    """Open a settings group's page and submit its form with the version it showed."""
    path = f"/console/settings/{group}"
    return post_form(admin, path, {"version": _version(admin.get(path).text), **fields}, page=path)


def stored_settings(client: TestClient, shop: str) -> Any:
    """The tenant's settings, as the API has them."""
    return client.get("/v1/tenants/settings", headers=_api(client, shop)).json()


def test_a_settings_group_is_saved_with_its_version(
    admin: TestClient, client: TestClient, shop: str
) -> None:
    saved = submit_group(
        admin,
        "compliance_settings",
        {
            "gdpr_enabled": "on",
            "data_retention_days": "90",
            "privacy_policy_url": "https://93.184.216.34/privacy",
            "terms_url": "",
        },
    )
    assert saved.status_code == 303
    assert saved.headers["location"] == "/console/settings/compliance_settings?saved=1"
    stored = stored_settings(client, shop)
    assert stored["compliance_settings"] == {
        "gdpr_enabled": True,
        "data_retention_days": 90,
        "consent_required": False,  # unchecked in the form
        "privacy_policy_url": "https://93.184.216.34/privacy",
        "terms_url": None,
    }
    assert stored["updated_by"] == "user:console-dev"


def test_the_services_validation_errors_are_shown_by_their_fields(
    admin: TestClient, client: TestClient, shop: str
) -> None:
    refused = submit_group(
        admin,
        "compliance_settings",
        {
            "data_retention_days": "0",
            "privacy_policy_url": "http://10.0.0.1/private",
        },
    )
    assert refused.status_code == 422
    html = refused.text
    assert 'id="f-data_retention_days-error"' in html
    assert 'aria-invalid="true" aria-describedby="f-data_retention_days-error"' in html
    assert "greater than or equal to 1" in html
    assert "Nothing was saved" in html
    # Refused: still version 1, the version the page shows again.
    unreadable = submit_group(admin, "compliance_settings", {"data_retention_days": "a year"})
    assert unreadable.status_code == 422
    assert "must be a whole number" in unreadable.text
    version = stored_settings(client, shop)["version"]
    assert version == 1


def test_a_concurrent_change_is_not_overwritten(
    admin: TestClient, client: TestClient, shop: str
) -> None:
    page = admin.get("/console/settings/branding").text
    meanwhile = client.patch(
        "/v1/tenants/settings",
        json={"branding": {"footer_text": "theirs"}},
        headers=_api(client, shop),
    )
    assert meanwhile.status_code == 200
    stale = post_form(
        admin,
        "/console/settings/branding",
        {"version": _version(page), "primary_color": "#112233", "footer_text": "mine"},
        page="/console/settings/branding",
    )
    assert stale.status_code == 412
    assert "changed by someone else" in stale.text
    stored = stored_settings(client, shop)
    assert stored["branding"]["footer_text"] == "theirs"


def test_lists_in_a_group_are_edited_item_by_item(
    admin: TestClient, client: TestClient, shop: str
) -> None:
    added = submit_group(
        admin,
        "webhooks",
        {
            "endpoints.0.present": "1",
            "endpoints.0.url": "https://93.184.216.34/orders",
            "endpoints.0.events": ["order.created", "payment.failed"],
            "endpoints.0.enabled": "on",
        },
    )
    assert added.status_code == 303, added.text
    stored = stored_settings(client, shop)
    assert stored["webhooks"]["endpoints"] == [
        {
            "url": "https://93.184.216.34/orders",
            "events": ["order.created", "payment.failed"],
            "enabled": True,
        }
    ]
    page = admin.get("/console/settings/webhooks").text
    assert "https://93.184.216.34/orders" in page
    removed = post_form(
        admin,
        "/console/settings/webhooks",
        {
            "version": _version(page),
            "endpoints.0.present": "1",
            "endpoints.0.url": "https://93.184.216.34/orders",
            "endpoints.0.events": "order.created",
            "endpoints.0.remove": "on",
            "endpoints.1.present": "1",
        },
        page="/console/settings/webhooks",
    )
    assert removed.status_code == 303
    stored = stored_settings(client, shop)
    assert stored["webhooks"]["endpoints"] == []


def _woo(providers: FakeProviders, **changes: str) -> dict[str, str]:
    fields = dict(VALID["woocommerce"]) | {"store_url": providers.base_url} | changes
    return {f"field.{name}": value for name, value in fields.items()}


def test_pasted_credentials_are_tested_saved_and_never_shown_again(
    admin: TestClient, providers: FakeProviders
) -> None:
    page = "/console/integrations/woocommerce"
    secret = VALID["woocommerce"]["consumer_secret"]
    wrong = post_form(
        admin,
        f"{page}/credentials",
        {**_woo(providers, consumer_secret="cs_" + "0" * 40), "action": "test"},
        page=page,
    )
    assert wrong.status_code == 200
    assert "Connection test failed" in wrong.text
    assert "cs_" + "0" * 40 not in wrong.text
    assert providers.base_url in wrong.text  # the store URL is not a secret: kept in the form
    saved = post_form(
        admin,
        f"{page}/credentials",
        {**_woo(providers), "action": "save", "version": "0"},
        page=page,
    )
    assert saved.status_code == 303, saved.text
    shown = admin.get(saved.headers["location"]).text
    assert "Saved. The connection test passed." in shown
    assert secret not in shown
    assert VALID["woocommerce"]["consumer_key"] not in shown
    assert "cs_****" in shown or "****" in shown
    home = admin.get("/console/integrations").text
    assert "Working (last test passed)" in home
    assert secret not in home


def test_an_earlier_version_is_restored_and_a_disconnect_keeps_it(
    admin: TestClient, providers: FakeProviders
) -> None:
    page = "/console/integrations/woocommerce"
    other = {"consumer_key": "ck_" + "1" * 40, "consumer_secret": "cs_" + "2" * 40}
    providers.accept("woocommerce", **(dict(VALID["woocommerce"]) | other))
    for version, fields in (("0", {}), ("1", other)):
        saved = post_form(
            admin,
            f"{page}/credentials",
            {**_woo(providers, **fields), "action": "save", "version": version},
            page=page,
        )
        assert saved.status_code == 303, saved.text
    html = admin.get(page).text
    assert 'id="version">2<' in html
    assert "ck_****1111" in html
    restored = post_form(admin, f"{page}/versions/1/restore", {"version": "2"}, page=page)
    assert restored.status_code == 303, restored.text
    html = admin.get(restored.headers["location"]).text
    assert "Version restored." in html
    assert 'id="version">3<' in html
    assert "ck_****" + VALID["woocommerce"]["consumer_key"][-4:] in html
    stale = post_form(admin, f"{page}/disconnect", {"version": "2"}, page=page)
    assert stale.status_code == 412
    gone = post_form(admin, f"{page}/disconnect", {"version": "3"}, page=page)
    assert gone.status_code == 303
    html = admin.get(page).text
    assert "Not connected" in html
    assert "Restore version 3" in html


def test_cards_are_added_by_reference_made_default_and_removed(
    admin: TestClient, stripe_server: FakeStripe
) -> None:
    first, second = stripe_server.add_card(last4="4242"), stripe_server.add_card(last4="1881")
    for method in (first, second):
        added = post_form(
            admin,
            "/console/payments/cards",
            {"payment_method_id": method},
            page="/console/payments",
        )
        assert added.status_code == 303, added.text
    page = admin.get("/console/payments?done=added").text
    assert "Card added." in page
    assert "ending 4242" in page
    assert "ending 1881" in page
    made = post_form(
        admin, f"/console/payments/cards/{second}/default", {}, page="/console/payments"
    )
    assert made.status_code == 303
    page = admin.get("/console/payments").text
    default_row = re.search(rf'id="card-{second}".*?</li>', page, re.S)
    assert default_row
    assert "Default" in default_row.group(0)
    removed = post_form(
        admin, f"/console/payments/cards/{first}/remove", {}, page="/console/payments"
    )
    assert removed.status_code == 303
    assert "ending 4242" not in admin.get("/console/payments").text
    assert stripe_server.attached_to(first) is None
    not_a_card = post_form(
        admin,
        "/console/payments/cards",
        {"payment_method_id": "4242 4242 4242 4242"},
        page="/console/payments",
    )
    assert not_a_card.status_code == 422  # refused before any route: raw card data


def test_the_add_card_page_needs_a_publishable_key(admin: TestClient) -> None:
    page = admin.get("/console/payments/cards/new")
    assert page.status_code == 501
    assert "BROKER_STRIPE_PUBLISHABLE_KEY" in page.text


def test_only_the_add_card_page_lets_stripe_js_in(
    settings: Settings,
    engine: Engine,
    broker_vault: VaultGateway,
    stripe_server: FakeStripe,
    shop: str,
) -> None:
    configured = settings.model_copy(
        update={
            "stripe_publishable_key": stripe_server.publishable_key,
            "stripe_js_url": stripe_server.js_url,
        }
    )
    web = TestClient(create_app(configured, engine=engine, vault=broker_vault), base_url=ORIGIN)
    sign_in(web, shop)
    page = web.get("/console/payments/cards/new")
    assert page.status_code == 200, page.text
    policy = page.headers["content-security-policy"]
    assert f"script-src 'self' {stripe_server.base_url};" in policy
    assert f"frame-src {stripe_server.base_url}" in policy
    assert "unsafe-inline" not in policy
    assert f'<script src="{stripe_server.js_url}"></script>' in page.text
    secret = re.search(r'data-client-secret="(seti_[A-Za-z0-9]+_secret_[A-Za-z0-9]+)"', page.text)
    assert secret
    intent = stripe_server.setup_intents[secret.group(1).split("_secret_")[0]]
    assert intent["customer"]  # the tenant's Stripe customer: the card lands there
    elsewhere = web.get("/console/payments").headers["content-security-policy"]
    assert stripe_server.base_url not in elsewhere


def test_payout_details_are_sealed_and_shown_masked(admin: TestClient) -> None:
    page = admin.get("/console/payments/payout")
    assert page.status_code == 200
    assert 'name="mobile_money.phone"' in page.text
    refused = post_form(
        admin,
        "/console/payments/payout",
        {"method": "bank_transfer", "bank_transfer.iban": "DE00 0000 0000 0000 0000 00"},
        page="/console/payments/payout",
    )
    assert refused.status_code == 422
    assert 'id="payout-bank_transfer-iban-error"' in refused.text
    assert "DE00" not in refused.text  # a rejected value is never repeated
    saved = post_form(
        admin,
        "/console/payments/payout",
        {"method": "paypal", "paypal.email": "owner.payouts@example.com"},
        page="/console/payments/payout",
    )
    assert saved.status_code == 303, saved.text
    shown = admin.get(saved.headers["location"]).text
    assert "Payout destination saved." in shown
    assert "o***@example.com" in shown
    assert "owner.payouts" not in shown


def test_secrets_pasted_into_the_console_surface_nowhere(
    admin: TestClient,
    providers: FakeProviders,
    engine: Engine,
    shop: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    page = "/console/integrations/woocommerce"
    canary = "cs_" + secrets.token_hex(20)
    key = "ck_" + secrets.token_hex(20)
    answers = []
    with caplog.at_level(logging.DEBUG):
        for action in ("test", "save"):
            answers.append(
                post_form(
                    admin,
                    f"{page}/credentials",
                    {**_woo(providers, consumer_key=key, consumer_secret=canary), "action": action},
                    page=page,
                )
            )
        # malformed: the service's validation error names the field, never the value
        answers.append(
            post_form(
                admin,
                f"{page}/credentials",
                {
                    **_woo(providers, consumer_key=key + " !", consumer_secret=canary + " !"),
                    "action": "save",
                },
                page=page,
            )
        )
        answers.append(admin.get(page))
        answers.append(admin.get("/console/integrations"))
    assert [a.status_code for a in answers[:3]] == [200, 422, 422]
    for answer in answers:
        assert canary not in answer.text
        assert key not in answer.text
    assert canary not in caplog.text
    assert key not in caplog.text
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT detail::text FROM audit_events WHERE tenant_id = :t"), {"t": shop}
        ).scalars()
        stored = " ".join(rows)
    assert canary not in stored
    assert key not in stored
