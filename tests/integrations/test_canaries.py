"""Canary secrets, planted through every write path, must surface nowhere in plaintext.

Not in app logs (at DEBUG, libraries included), not in any HTTP response, not in
a PostgreSQL dump, and not in the Vault audit log, where request values appear
only HMAC'd.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from broker.core.logging import configure_logging
from tests.fakes.providers import FakeProviders
from tests.support.apps import VaultEndpoint
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


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield stream
    root.handlers, root.level = saved[0], saved[1]


def _pg_dump(database_url: str) -> str:
    url = make_url(database_url)
    binary = shutil.which("pg_dump")
    try:
        import pgserver  # noqa: F401 - only to locate its bundled binaries

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
        binary = str(bundled) if bundled.exists() else binary
    except ImportError:
        pass
    assert binary, "pg_dump is needed to scan the database"
    env = dict(os.environ, PGPASSWORD=url.password or "")
    args = [binary, "--no-owner", "-d", url.database or "", "-U", url.username or "postgres"]
    host = url.query.get("host") or url.host
    if host:
        args += ["-h", str(host)]
    if url.port:
        args += ["-p", str(url.port)]
    return subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout


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
        "database": _pg_dump(database_url),
    }
    if vault_endpoint.audit_log is not None:
        haystacks["vault audit log"] = vault_endpoint.audit_log.read_text()
    for value in values:
        forms = {value, base64.b64encode(value.encode()).decode()}
        for where, text in haystacks.items():
            for form in forms:
                assert form not in text, f"a planted secret appears in the {where}"
    assert haystacks["logs"], "the scan must have seen some logs"
    assert tenant in haystacks["database"], "the dump must cover the tenant's rows"
