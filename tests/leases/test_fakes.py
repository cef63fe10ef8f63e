"""The fake providers' key APIs behave like Twilio's Keys API and OpenAI's admin API."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.provider_keys import OPENAI_ADMIN
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock

TWILIO = VALID["twilio"]
ACCOUNT = TWILIO["account_sid"]


def _keys_url(fake: FakeProviders) -> str:
    return f"{fake.base_url}/2010-04-01/Accounts/{ACCOUNT}/Keys.json"


def _account_ok(fake: FakeProviders, user: str, password: str) -> bool:
    response = httpx.get(
        f"{fake.base_url}/2010-04-01/Accounts/{ACCOUNT}.json", auth=(user, password)
    )
    return response.status_code == 200


def test_a_twilio_key_minted_with_the_auth_token_works_until_deleted(
    providers: FakeProviders,
) -> None:
    root = (ACCOUNT, TWILIO["auth_token"])
    created = httpx.post(_keys_url(providers), data={"FriendlyName": "lease-1"}, auth=root)
    assert created.status_code == 201
    key = created.json()
    assert key["sid"].startswith("SK")
    assert len(key["sid"]) == 34
    assert key["friendly_name"] == "lease-1"
    assert _account_ok(providers, key["sid"], key["secret"])

    listed = httpx.get(_keys_url(providers), auth=root).json()["keys"]
    assert [k["sid"] for k in listed] == [key["sid"]]
    assert "secret" not in listed[0]

    url = f"{providers.base_url}/2010-04-01/Accounts/{ACCOUNT}/Keys/{key['sid']}.json"
    assert httpx.delete(url, auth=root).status_code == 204
    assert not _account_ok(providers, key["sid"], key["secret"])
    assert httpx.delete(url, auth=root).status_code == 404
    assert providers.keys.deleted[key["sid"]] == 1


def test_a_standard_key_cannot_mint_but_a_main_key_can(providers: FakeProviders) -> None:
    root = (ACCOUNT, TWILIO["auth_token"])
    standard = httpx.post(_keys_url(providers), data={"FriendlyName": "a"}, auth=root).json()
    refused = httpx.post(
        _keys_url(providers), data={"FriendlyName": "b"}, auth=(standard["sid"], standard["secret"])
    )
    assert refused.status_code == 401
    assert refused.json()["code"] == 20003
    main = providers.keys.add_main_key(ACCOUNT)
    assert (
        httpx.post(_keys_url(providers), data={"FriendlyName": "c"}, auth=main).status_code == 201
    )
    assert (
        httpx.post(
            _keys_url(providers), data={"FriendlyName": "d"}, auth=(ACCOUNT, "0" * 32)
        ).status_code
        == 401
    )


def _service_accounts(fake: FakeProviders) -> str:
    return f"{fake.base_url}/v1/organization/projects/{OPENAI_ADMIN['project_id']}/service_accounts"


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {OPENAI_ADMIN['api_key']}"}


def _models_ok(fake: FakeProviders, key: str) -> bool:
    response = httpx.get(f"{fake.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    return response.status_code == 200


def test_an_openai_service_account_key_expires_on_the_fake_clock(
    providers: FakeProviders,
) -> None:
    clock = FakeClock()
    providers.keys.clock = clock.now
    created = httpx.post(
        _service_accounts(providers),
        json={"name": "lease-1", "expires_in_seconds": 300},
        headers=_admin(),
    )
    assert created.status_code == 200
    account = created.json()
    value = account["api_key"]["value"]
    assert account["api_key"]["expires_at"] - account["created_at"] == 300
    assert _models_ok(providers, value)
    # The admin key is for admin endpoints only.
    assert not _models_ok(providers, OPENAI_ADMIN["api_key"])
    clock.advance(301)
    assert not _models_ok(providers, value)


def test_an_openai_service_account_stops_working_once_deleted(providers: FakeProviders) -> None:
    account = httpx.post(
        _service_accounts(providers), json={"name": "lease-2"}, headers=_admin()
    ).json()
    value = account["api_key"]["value"]
    listed = httpx.get(_service_accounts(providers), headers=_admin()).json()["data"]
    assert [a["name"] for a in listed] == ["lease-2"]
    url = f"{_service_accounts(providers)}/{account['id']}"
    deleted = httpx.delete(url, headers=_admin())
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    assert not _models_ok(providers, value)
    assert httpx.delete(url, headers=_admin()).status_code == 404


@pytest.mark.parametrize("expires", [0, 31_536_001, "300"])
def test_openai_refuses_an_expiry_out_of_range(providers: FakeProviders, expires: object) -> None:
    response = httpx.post(
        _service_accounts(providers),
        json={"name": "x", "expires_in_seconds": expires},
        headers=_admin(),
    )
    assert response.status_code == 400


def test_faults_apply_to_the_key_apis(providers: FakeProviders) -> None:
    root = (ACCOUNT, TWILIO["auth_token"])
    providers.fail_with("twilio", 429, retry_after="7")
    limited = httpx.post(_keys_url(providers), data={"FriendlyName": "x"}, auth=root)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "7"
    providers.come_back("twilio")
    providers.go_down("openai")
    with pytest.raises(httpx.HTTPError):
        httpx.post(_service_accounts(providers), json={"name": "x"}, headers=_admin())
    providers.come_back("openai")
    assert (
        httpx.post(_keys_url(providers), data={"FriendlyName": "x"}, auth=root).status_code == 201
    )
