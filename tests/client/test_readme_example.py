"""The README's SDK example runs as written (against `make dev`'s address, here a live app)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.client.test_sdk import broker_url  # noqa: F401 - the live app fixture
from tests.support.tenants import make_tenant
from tests.support.tokens import bearer, token

# Keep identical to the README's "For services: the client SDK" block: only the
# address and the tenant are substituted below.
README_EXAMPLE = '''
import os

from broker.client import BrokerClient


def read_service_token() -> str:
    """The service's bearer token, read on every fetch so a rotated one is picked up."""
    return os.environ["SERVICE_TOKEN"]  # `make dev` prints an export line for it


broker = BrokerClient("http://127.0.0.1:8000", token_provider=read_service_token,
                      max_stale_s=60)
creds = broker.openai("demo")  # OpenAICredentials, cached until shortly before expiry
print(creds)                   # the key is masked in repr and str
'''


def test_the_readme_holds_this_example() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "```python" + README_EXAMPLE + "```" in readme


def test_the_readme_sdk_example_runs(
    client: TestClient,
    broker_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = make_tenant(client)
    key = "sk-readme0123456789abcdefghij"
    saved = client.put(
        "/v1/tenants/settings/integrations/openai",
        json={"fields": {"api_key": key}, "skip_connection_test": True},
        headers=bearer(token("tenant:admin", tenant_id=tenant)),
    )
    assert saved.status_code == 200, saved.text
    service = token("credentials:read", kind="service", tenants=(tenant,), subject="readme")
    monkeypatch.setenv("SERVICE_TOKEN", service)
    source = README_EXAMPLE.replace("http://127.0.0.1:8000", broker_url).replace(
        '"demo"', f'"{tenant}"'
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 - our own text
    try:
        assert namespace["creds"].api_key == key
        printed = capsys.readouterr().out
        assert "OpenAICredentials" in printed
        assert key not in printed
    finally:
        namespace["broker"].close()
