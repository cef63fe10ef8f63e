"""The API explains itself: provider schemas, scopes, offline docs and plain error messages."""

from __future__ import annotations

import re
import socket
from typing import Any

from fastapi.testclient import TestClient

from broker.app import ROUTERS
from broker.auth.scopes import KNOWN_SCOPES
from broker.core.openapi import OAUTH2, route_scopes
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import PROVIDERS, ProviderEndpoints, get_provider
from tests.fakes.providers import VALID
from tests.support.tokens import bearer, token

INTEGRATIONS = "/v1/tenants/settings/integrations"


def admin(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def test_provider_is_an_enum_on_every_operation(app: Any) -> None:
    document = app.openapi()
    seen = 0
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "provider":
                    assert parameter["schema"]["enum"] == list(PROVIDERS), path
                    seen += 1
    assert seen >= 6
    view = document["components"]["schemas"]["IntegrationView"]
    assert view["properties"]["provider"]["enum"] == list(PROVIDERS)


def test_each_provider_publishes_its_fields(app: Any) -> None:
    document = app.openapi()
    body = document["components"]["schemas"]["CredentialsWrite"]["properties"]["fields"]
    alternatives = [resolve(document, s) for s in body["anyOf"]]
    assert len(alternatives) == len(PROVIDERS)
    for spec, schema in zip(PROVIDERS.values(), alternatives, strict=True):
        assert spec.name in schema["description"]
        assert list(schema["properties"]) == [f.name for f in spec.fields]
        assert schema["required"] == [f.name for f in spec.fields if f.required]
        assert schema["additionalProperties"] is False
        for field in spec.fields:
            assert schema["properties"][field.name].get("writeOnly", False) is field.secret
    woo = next(s for s in alternatives if "woocommerce" in s["description"])
    assert {"store_url", "consumer_key", "consumer_secret"} <= set(woo["required"])
    assert (
        "shop_domain" in next(s for s in alternatives if "shopify" in s["description"])["required"]
    )


def test_every_operation_shows_its_scopes(app: Any) -> None:
    document = app.openapi()
    scheme = document["components"]["securitySchemes"][OAUTH2]
    assert scheme["type"] == "oauth2"
    assert set(scheme["flows"]["clientCredentials"]["scopes"]) == KNOWN_SCOPES
    checked = 0
    for router in ROUTERS:
        for route in router.routes:
            scopes = route_scopes(route)  # type: ignore[arg-type]
            if not scopes:
                continue
            for method in route.methods:  # type: ignore[attr-defined]
                operation = document["paths"][route.path_format][method.lower()]  # type: ignore[attr-defined]
                # Any one of the scopes: one requirement per scope, each with the token.
                assert operation["security"] == [
                    {"HTTPBearer": [], OAUTH2: [str(scope)]} for scope in scopes
                ]
                assert all(str(scope) in operation["description"] for scope in scopes)
                checked += 1
    assert checked >= 20


def test_docs_and_redoc_load_nothing_from_another_host(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200
        html = response.text
        # No absolute URL at all: every script, style sheet, font and icon is ours.
        assert re.search(r"(?i)(?:https?:)?//[a-z0-9]", html) is None, page
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert assets, page
        for asset in assets:
            served = client.get(asset)
            assert served.status_code == 200, asset
            assert len(served.content) > 300, asset  # a real file, not an error page
        assert "/openapi.json" in html
        # No inline script either, so a `script-src 'self'` policy leaves the page working.
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], page
        assert "<style" not in html, page
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy
        assert "http" not in policy


def test_a_body_without_json_content_type_says_json_is_expected(
    client: TestClient, tenant: str
) -> None:
    response = client.put(
        f"{INTEGRATIONS}/openai",
        content=b'{"fields": {"api_key": "x"}}',
        headers={**admin(tenant), "Content-Type": "text/plain"},
    )
    assert response.status_code == 422
    # The field is "" for the body as a whole, as everywhere else.
    assert response.json()["errors"] == [
        {
            "field": "",
            "message": "the body must be JSON, sent with Content-Type: application/json",
        }
    ]


def test_bad_json_is_not_reported_as_a_field_named_by_its_offset(
    client: TestClient, tenant: str
) -> None:
    response = client.put(
        f"{INTEGRATIONS}/openai",
        content=b'{"fields": {"api_key": "sk-canary-0123456789abcdef",,}}',
        headers={**admin(tenant), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == ""  # the body, not a field named "50"
    assert error["message"].startswith("not valid JSON: ")
    assert "at character" in error["message"]
    assert "canary" not in response.text


def test_an_unknown_provider_lists_the_known_ones(client: TestClient, tenant: str) -> None:
    response = client.post(f"{INTEGRATIONS}/stripe-ish/test", headers=admin(tenant))
    assert response.status_code == 404
    assert "stripe-ish" not in response.text
    for name in PROVIDERS:
        assert name in response.json()["detail"]


def test_an_unknown_settings_group_lists_the_groups(client: TestClient, tenant: str) -> None:
    response = client.patch(
        "/v1/tenants/settings", json={"colour_scheme": {"dark": True}}, headers=admin(tenant)
    )
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert "colour_scheme" not in response.text
    for group in ("branding", "business_hours", "feature_flags", "notification_settings"):
        assert group in error["message"]


def _no_such_host(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_a_host_that_does_not_resolve_is_not_called_an_ssrf_refusal() -> None:
    spec = get_provider("woocommerce")
    creds = spec.validate({**VALID["woocommerce"], "store_url": "https://shop.example.com"})
    policy = EgressPolicy(timeout_s=2.0)
    with EgressClient(policy, resolver=_no_such_host) as client:
        result = spec.connection_test(client, ProviderEndpoints(), creds)
        assert (result.ok, result.code) == (False, "unreachable")
        assert "could not be resolved" in result.reason
        assert "may not call" not in result.reason
        try:
            spec.check_target(client, ProviderEndpoints(), creds)
        except Exception as exc:  # noqa: BLE001
            errors = getattr(exc, "extra", {}).get("errors")
        assert errors == [
            {
                "field": "fields.store_url",
                "message": "the host in store_url could not be resolved (is it spelled right, "
                "and does it exist?)",
            }
        ]
