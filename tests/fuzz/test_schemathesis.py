"""Schemathesis against the app's own OpenAPI document, with valid tokens.

Every operation the app documents is fuzzed in-process (ASGI) past
authentication: a tenant admin's token for the tenant routes, a platform
admin's for tenant lifecycle, an auditor's for the audit trail, and a service
token for credential delivery. Each response must be no server error, carry a
documented status code and content type, and match the documented schema.

The in-suite run is small and derandomized, so it costs seconds and never
flakes; `make fuzz` sets FUZZ_EXAMPLES for a longer, random run before a release.

Half of the generated cases have their path parameters steered to things that
exist (the fuzz tenant, a configured provider), so the fuzzer reaches the
happy paths too. Destructive operations get objects of their own:
`DELETE /v1/tenants/{id}` only ever shreds the tenant `doomed`, key rotation
only rotates `rotating`, and deleting credentials only deletes the twilio ones,
so none of them takes away what the other operations read. Nothing is
excluded from the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.app import create_app
from broker.core.config import Settings
from tests.fakes.providers import VALID, FakeProviders
from tests.support.tenants import make_tenant, new_tenant_id
from tests.support.tokens import TEST_SIGNING_KEY, bearer, token

# FUZZ_EXAMPLES=500 (make fuzz) for the long run; the suite's own run stays small.
LONG_RUN = int(os.environ.get("FUZZ_EXAMPLES") or 0)
EXAMPLES = LONG_RUN or 20

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Credentials every operation reads, and others that only DELETE is steered to,
# so that deleting them cannot take the readers' credentials away.
STORED_PROVIDER = "shopify"
DELETED_PROVIDER = "twilio"
TENANT_ADMIN_SCOPES = ("tenant:admin", "integrations:manage", "finance:manage")


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document. Building it talks to no service, so it can run at import.

    The schema must exist when pytest collects this module (one test per
    operation), before the session's services are up; the test below proves
    the session's app serves the very same document.
    """
    placeholder = Settings(
        _env_file=None,
        env="test",
        database_url="postgresql+psycopg://fuzz@/unused",
        vault_addrs=["http://127.0.0.1:9"],
        vault_token="unused",
        jwt_hs256_secret=TEST_SIGNING_KEY,
    )
    app = create_app(placeholder)
    try:
        return app.openapi()
    finally:
        app.state.vault.close()
        app.state.outbound.client.close()
        app.state.stripe.close()
        app.state.engine.dispose()


class SessionApp:
    """An ASGI app forwarding to the session's app, once a fixture has bound it.

    It has no lifespan: schemathesis would start the app's lifespan once and
    end it at exit, closing Vault, the engine and the outbound clients that
    the session fixtures own. Refusing the lifespan scope before receiving
    anything is how an ASGI app says it has none.
    """

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("the test session owns the app's resources")
        assert self.app is not None, "the session app is not bound"
        await self.app(scope, receive, send)


SESSION_APP = SessionApp()
DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config())
schema.app = SESSION_APP


@dataclass(frozen=True)
class FuzzTenants:
    """The tenants the fuzzer works in, and the token each operation is sent with."""

    main: str
    doomed: str
    rotating: str

    def authorization(self, path: str) -> str:
        """A valid bearer token with the scopes the operation at `path` needs."""
        if path.startswith("/v1/credentials/"):
            jwt = token("credentials:read", kind="service", tenants=(self.main,))
        elif path.startswith("/v1/audit/"):
            jwt = token("audit:read", subject="fuzz-auditor")
        elif path.startswith("/v1/tenants/settings"):
            jwt = token(*TENANT_ADMIN_SCOPES, tenant_id=self.main, subject="fuzz-admin")
        else:
            jwt = token("platform:admin", subject="fuzz-ops")
        return f"Bearer {jwt}"

    def steer(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """The same path parameters, pointed at objects that exist."""
        steered = dict(params)
        if "tenant_id" in steered:
            if method == "DELETE" and path == "/v1/tenants/{tenant_id}":
                steered["tenant_id"] = self.doomed
            elif path.endswith("/keys/rotate"):
                steered["tenant_id"] = self.rotating
            else:
                steered["tenant_id"] = self.main
        if "provider" in steered:
            steered["provider"] = DELETED_PROVIDER if method == "DELETE" else STORED_PROVIDER
        return steered


@pytest.fixture(scope="module")
def fuzz_tenants(app: Any, client: TestClient, providers: FakeProviders) -> Iterator[FuzzTenants]:
    """A tenant with stored credentials, one to delete and one to rotate; binds the app."""
    tenants = FuzzTenants(
        main=make_tenant(client, new_tenant_id("fuzz")),
        doomed=make_tenant(client, new_tenant_id("fuzz-doomed")),
        rotating=make_tenant(client, new_tenant_id("fuzz-rotating")),
    )
    for provider in (STORED_PROVIDER, DELETED_PROVIDER):
        response = client.put(
            f"/v1/tenants/settings/integrations/{provider}",
            json={"fields": VALID[provider], "skip_connection_test": True},
            headers=bearer(token(*TENANT_ADMIN_SCOPES, tenant_id=tenants.main)),
        )
        assert response.status_code == 200, response.text
    SESSION_APP.app = app
    yield tenants
    SESSION_APP.app = None


def test_the_fuzzed_document_is_the_apps_own(app: Any) -> None:
    assert app.openapi() == DOCUMENT


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG_RUN,
    # Every example is a real request to Vault and PostgreSQL, and the bodies of
    # some operations are large: slow generation is expected, not a smell.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@schema.given(steer=st.booleans())
@schema.parametrize()
def test_the_api_conforms_to_its_openapi_document(
    case: schemathesis.Case[Any], steer: bool, fuzz_tenants: FuzzTenants
) -> None:
    operation = case.operation
    if steer and case.path_parameters:
        case.path_parameters = fuzz_tenants.steer(
            operation.method.upper(), operation.path, case.path_parameters
        )
    headers: CaseInsensitiveDict[Any] = CaseInsensitiveDict(case.headers or {})
    headers["Authorization"] = fuzz_tenants.authorization(case.path)
    case.headers = headers
    case.call_and_validate(checks=CHECKS)
