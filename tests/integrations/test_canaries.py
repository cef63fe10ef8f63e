"""Canary secrets, planted through every write path, must surface nowhere in plaintext.

Not in app logs (at DEBUG, libraries included), not in any HTTP response, not in
a PostgreSQL dump, and not in the Vault audit log, where request values appear
only HMAC'd.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.fakes.providers import FakeProviders
from tests.support.apps import VaultEndpoint
from tests.support.leaks import assert_absent, pg_dump, with_vault_audit_log
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token


def _canaries() -> dict[str, dict[str, str]]:
    hexa = secrets.token_hex  # random, so unmistakable in a scan
    return {
        "twilio": {
            "account_sid": "AC" + hexa(16),
            "auth_token": hexa(16),
            "webhook_secret": "whsec-canary-" + hexa(8),
        },
        "woocommerce": {
            "consumer_key": "ck_" + hexa(20),
            "consumer_secret": "cs_" + hexa(20),
            "webhook_secret": "woo-canary-" + hexa(8),
        },
        "shopify": {
            "shop_domain": "canary-shop.myshopify.com",
            "access_token": "shpat_" + hexa(16),
            "webhook_secret": "shopify-canary-" + hexa(8),
        },
        "whatsapp": {
            "business_id": "1" + str(secrets.randbelow(10**12)).zfill(12),
            "access_token": "EAAcanary" + hexa(16),
        },
        "openai": {"api_key": "sk-canary" + hexa(16), "org_id": "org-canary" + hexa(6)},
    }


def _random_pan() -> str:
    """A Luhn-valid 16-digit Visa-range number, new each run."""
    digits = [4] + [secrets.randbelow(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        doubled = d * 2 if i % 2 == 0 else d
        total += doubled - 9 if doubled > 9 else doubled
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


Call = Callable[[str, str, Any], None]


def _plant_credentials(call: Call, planted: dict[str, dict[str, str]], store_url: str) -> None:
    """Every provider's canaries through every credential write path."""
    base = "/v1/tenants/settings/integrations"
    for provider, fields in planted.items():
        body = dict(fields)
        if provider == "woocommerce":
            body["store_url"] = store_url
        # 1. stored (live test skipped: the fake does not know these values)
        call("PUT", f"{base}/{provider}", {"fields": body, "skip_connection_test": True})
        # 2. a failed connection test on write, and an explicit test with the body
        call("PUT", f"{base}/{provider}", {"fields": body})
        call("POST", f"{base}/{provider}/test", {"fields": body})
        # 3. the stored ones, tested
        call("POST", f"{base}/{provider}/test", None)
        # 4. failed validation: every field malformed around the canary
        call("PUT", f"{base}/{provider}", {"fields": {k: v + " !" for k, v in body.items()}})
        call(
            "PUT", f"{base}/{provider}", {"fields": {**body, "unexpected": body[next(iter(body))]}}
        )


def _plant_cards(call: Call, responses: list[Any]) -> list[str]:
    """Raw card numbers, in several encodings, on several routes: refused unseen."""
    base = "/v1/tenants/settings/integrations"
    pan = _random_pan()
    spaced = " ".join(pan[i : i + 4] for i in range(0, 16, 4))
    dashed = spaced.replace(" ", "-")
    call("PATCH", "/v1/tenants/settings", {"branding": {"footer_text": spaced}})
    call("POST", "/v1/tenants/settings/payment-methods", {"payment_method_id": dashed})
    call("PUT", f"{base}/openai", {"fields": {"api_key": pan}})
    call("PUT", "/v1/tenants/settings/payout", {"method": "paypal", "details": {"pan": int(pan)}})
    assert [r.status_code for r in responses[-4:]] == [422] * 4
    return [pan, spaced, dashed]


def test_canaries_never_leak(
    client: TestClient,
    providers: FakeProviders,
    vault_endpoint: VaultEndpoint,
    database_url: str,
    captured_logs: io.StringIO,
) -> None:
    tenant = make_tenant(client)
    admin = bearer(token("tenant:admin", tenant_id=tenant))
    planted = _canaries()
    values = [
        v
        for fields in planted.values()
        for name, v in fields.items()
        if name not in ("shop_domain",)
    ]
    responses: list[Any] = []

    def call(method: str, path: str, body: Any) -> None:
        responses.append(client.request(method, path, json=body, headers=admin))

    base = "/v1/tenants/settings/integrations"
    _plant_credentials(call, planted, providers.base_url)
    values += _plant_cards(call, responses)
    # 6. settings writes that fail validation with the canary as the value
    some = values[0]
    call("PATCH", "/v1/tenants/settings", {"branding": {"primary_color": some}})
    call("PATCH", "/v1/tenants/settings", {"branding": {"logo_url": f"http://cdn.example/{some}"}})
    call("GET", base, None)
    call("GET", "/v1/tenants/settings", None)

    assert [r.status_code for r in responses if r.status_code >= 500] == []
    assert any(r.status_code == 200 for r in responses)
    assert any(r.status_code == 422 for r in responses)

    haystacks = {
        "responses": "\n".join(f"{r.headers}\n{r.text}" for r in responses),
        "logs": captured_logs.getvalue(),
        "database": pg_dump(database_url),
    }
    haystacks = with_vault_audit_log(haystacks, vault_endpoint)
    assert_absent(haystacks, values)
    assert haystacks["logs"], "the scan must have seen some logs"
    assert tenant in haystacks["database"], "the dump must cover the tenant's rows"
