"""Tests for the provider specs: validation, masking and live connection tests.

Connection tests run against FakeProviders (a real HTTP server on 127.0.0.1) through a
real EgressClient; hostile addresses are checked with socket.connect booby-trapped.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.errors import NotFound, ValidationFailed
from broker.integrations.egress import EgressClient, EgressPolicy
from broker.integrations.providers import (
    PROVIDERS,
    ConnectionResult,
    Credentials,
    ProviderEndpoints,
    get_provider,
    mask_hint,
)
from tests.fakes.providers import (
    AUTH_ERROR_MESSAGES,
    UPSTREAM_DETAIL,
    VALID,
    FakeProviders,
)

NAMES = list(PROVIDERS)
CANARY = "Zq9CanaryValue7f3a"

# The field that proves identity, and a format-valid wrong value for it.
SECRET_FIELD = {
    "twilio": ("auth_token", "deadbeef" * 4),
    "woocommerce": ("consumer_secret", "cs_" + "0123456789abcdef" * 2 + "01234567"),
    "shopify": ("access_token", "shpat_" + "ab" * 16),
    "whatsapp": ("access_token", "EAAWrongToken0000000000000000"),
    "openai": ("api_key", "sk-wrongkeywrongkeywrongkey1234"),
}


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as server:
        yield server


@pytest.fixture
def client() -> Iterator[EgressClient]:
    with EgressClient(EgressPolicy(allow_http=True, allow_loopback=True, timeout_s=1.0)) as c:
        yield c


@pytest.fixture
def endpoints(fake: FakeProviders) -> ProviderEndpoints:
    return ProviderEndpoints(
        twilio=fake.base_url,
        openai=fake.base_url,
        graph=fake.base_url,
        shopify_base=fake.base_url,
    )


def valid_fields(
    provider: str, fake: FakeProviders | None = None, /, **overrides: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = dict(VALID[provider])
    if provider == "woocommerce":
        fields["store_url"] = fake.base_url if fake is not None else "https://shop.example.com"
    fields.update(overrides)
    return fields


def run_test(
    provider: str,
    client: EgressClient,
    endpoints: ProviderEndpoints,
    fields: dict[str, Any],
) -> ConnectionResult:
    spec = get_provider(provider)
    return spec.connection_test(client, endpoints, spec.validate(fields))


# ------------------------------------------------------------ registry


def test_providers_in_issue_order_and_unknown_is_not_found() -> None:
    assert NAMES == ["twilio", "woocommerce", "shopify", "whatsapp", "openai"]
    assert get_provider("shopify").title == "Shopify"
    with pytest.raises(NotFound):
        get_provider("stripe")


def test_only_store_url_and_shop_domain_are_identifiers() -> None:
    identifiers = {
        (name, f.name) for name, spec in PROVIDERS.items() for f in spec.fields if not f.secret
    }
    assert identifiers == {("woocommerce", "store_url"), ("shopify", "shop_domain")}


# ------------------------------------------------------ connection tests


@pytest.mark.parametrize("provider", NAMES)
def test_right_credentials_pass(
    provider: str, fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    result = run_test(provider, client, endpoints, valid_fields(provider, fake))
    assert result == ConnectionResult(
        True, "ok", f"{get_provider(provider).title} accepted the credentials", 200
    )
    assert fake.hits[provider] == 1


@pytest.mark.parametrize("provider", NAMES)
def test_wrong_secret_is_rejected_without_leaking(
    provider: str, fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    name, wrong = SECRET_FIELD[provider]
    result = run_test(provider, client, endpoints, valid_fields(provider, fake, **{name: wrong}))
    assert result.code == "rejected"
    assert not result.ok
    assert result.status_code == 401
    assert result.reason == f"{get_provider(provider).title} rejected the credentials"
    assert wrong not in result.reason
    assert VALID[provider][name] not in result.reason
    assert not any(message in result.reason for message in AUTH_ERROR_MESSAGES)
    assert fake.hits[provider] == 1


@pytest.mark.parametrize("status", [500, 503, 429])
@pytest.mark.parametrize("provider", NAMES)
def test_provider_failure_is_reported_with_status(
    provider: str,
    status: int,
    fake: FakeProviders,
    client: EgressClient,
    endpoints: ProviderEndpoints,
) -> None:
    fake.fail_with(provider, status)
    result = run_test(provider, client, endpoints, valid_fields(provider, fake))
    assert (result.ok, result.code, result.status_code) == (False, "provider_error", status)
    assert str(status) in result.reason
    assert UPSTREAM_DETAIL not in result.reason


@pytest.mark.parametrize("provider", NAMES)
def test_slow_provider_times_out(
    provider: str, fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    fake.delay(provider, 3.0)
    started = time.monotonic()
    result = run_test(provider, client, endpoints, valid_fields(provider, fake))
    assert (result.ok, result.code, result.status_code) == (False, "timeout", None)
    assert result.reason == f"{get_provider(provider).title} did not answer in time"
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("provider", NAMES)
def test_redirect_is_an_error_and_not_followed(
    provider: str, fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    fake.redirect(provider, f"{fake.base_url}/landing")
    result = run_test(provider, client, endpoints, valid_fields(provider, fake))
    assert (result.ok, result.code, result.status_code) == (False, "provider_error", 302)
    assert "redirect" in result.reason
    assert fake.hits["unknown"] == 0
    assert [r.provider for r in fake.requests] == [provider]


@pytest.mark.parametrize(
    ("provider", "code"),
    [
        ("twilio", "rejected"),
        ("whatsapp", "rejected"),
        ("woocommerce", "provider_error"),
        ("shopify", "provider_error"),
        ("openai", "provider_error"),
    ],
)
def test_not_found_rejects_only_account_ids(
    provider: str,
    code: str,
    fake: FakeProviders,
    client: EgressClient,
    endpoints: ProviderEndpoints,
) -> None:
    fake.fail_with(provider, 404)
    result = run_test(provider, client, endpoints, valid_fields(provider, fake))
    assert (result.code, result.status_code) == (code, 404)
    assert UPSTREAM_DETAIL not in result.reason


def test_whatsapp_unknown_business_id_is_rejected(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    # Graph answers 400 with error code 100 for an id the token cannot see; the body
    # echoes the id, which is a secret field here.
    other_id = "998877665544"
    result = run_test("whatsapp", client, endpoints, valid_fields("whatsapp", business_id=other_id))
    assert (result.code, result.status_code) == ("rejected", 400)
    assert other_id not in result.reason


def test_openai_org_header_sent_only_when_set_and_checked(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    fields = valid_fields("openai")
    del fields["org_id"]
    assert run_test("openai", client, endpoints, fields).ok
    assert "openai-organization" not in fake.requests[-1].headers

    assert run_test("openai", client, endpoints, valid_fields("openai")).ok
    assert fake.requests[-1].headers["openai-organization"] == VALID["openai"]["org_id"]

    wrong_org = valid_fields("openai", org_id="org-SomeoneElse99")
    assert run_test("openai", client, endpoints, wrong_org).code == "rejected"


def test_accept_registers_another_credential_set(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    other = {"account_sid": "AC" + "1" * 32, "auth_token": "2" * 32}
    assert run_test("twilio", client, endpoints, other).code == "rejected"
    fake.accept("twilio", **other)
    assert run_test("twilio", client, endpoints, other).ok


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_requests_have_the_documented_shape(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    for provider in NAMES:
        assert run_test(provider, client, endpoints, valid_fields(provider, fake)).ok
    sent = {r.provider: r for r in fake.requests}
    tw, woo, shop, wa, oai = (VALID[name] for name in NAMES)

    assert sent["twilio"].path == f"/2010-04-01/Accounts/{tw['account_sid']}.json"
    assert sent["twilio"].headers["authorization"] == _basic(tw["account_sid"], tw["auth_token"])
    assert sent["woocommerce"].path == "/wp-json/wc/v3/products?per_page=1"
    assert sent["woocommerce"].headers["authorization"] == _basic(
        woo["consumer_key"], woo["consumer_secret"]
    )
    assert sent["shopify"].path == "/admin/api/2024-10/shop.json"
    assert sent["shopify"].headers["x-shopify-access-token"] == shop["access_token"]
    assert "authorization" not in sent["shopify"].headers
    assert sent["whatsapp"].path == f"/v21.0/{wa['business_id']}"
    assert sent["whatsapp"].headers["authorization"] == f"Bearer {wa['access_token']}"
    assert sent["openai"].path == "/v1/models"
    assert sent["openai"].headers["authorization"] == f"Bearer {oai['api_key']}"
    # The fake's records never show header credentials when printed (account ids are
    # part of the path, as in the real APIs).
    in_headers = [
        tw["auth_token"],
        woo["consumer_key"],
        woo["consumer_secret"],
        shop["access_token"],
        wa["access_token"],
        oai["api_key"],
    ]
    assert not any(value in repr(fake.requests) for value in in_headers)


def test_store_url_with_a_path_is_kept(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    fields = valid_fields("woocommerce", store_url=f"{fake.base_url}/shop/")
    assert run_test("woocommerce", client, endpoints, fields).ok
    assert fake.requests[-1].path == "/shop/wp-json/wc/v3/products?per_page=1"


def test_on_request_hook_runs_before_the_answer(
    fake: FakeProviders, client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    seen: list[str] = []

    def hook(provider: str) -> None:
        seen.append(provider)
        fake.fail_with(provider, 503)

    fake.on_request = hook
    result = run_test("shopify", client, endpoints, valid_fields("shopify"))
    assert seen == ["shopify"]
    assert (result.code, result.status_code) == ("provider_error", 503)


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every socket connect and fails it."""
    attempts: list[Any] = []

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError("unexpected connect")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize(
    "store_url",
    [
        "http://169.254.169.254",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5",
        "https://10.0.0.5:8443/shop",
        "http://[::ffff:169.254.169.254]",
    ],
)
def test_store_url_to_forbidden_address_is_refused(
    store_url: str,
    fake: FakeProviders,
    client: EgressClient,
    endpoints: ProviderEndpoints,
    no_connect: list[Any],
) -> None:
    result = run_test(
        "woocommerce", client, endpoints, valid_fields("woocommerce", store_url=store_url)
    )
    assert (result.ok, result.code, result.status_code) == (False, "refused_address", None)
    assert result.reason.startswith("the URL points to an address the broker may not call")
    assert VALID["woocommerce"]["consumer_secret"] not in result.reason
    assert no_connect == []
    assert sum(fake.hits.values()) == 0


# What a tenant-controlled DNS zone could answer for a store URL's host.
TARGET_DNS = {
    "shop.example.com": ["93.184.216.34"],
    "rebind.example.com": ["93.184.216.34", "10.0.0.7"],
    "meta.example.com": ["169.254.169.254"],
    "demo-shop.myshopify.com": ["23.227.38.65"],
    "evil.myshopify.com": ["127.0.0.1"],
}


def target_resolver(host: str, port: int) -> list[str]:
    try:
        return list(TARGET_DNS[host])
    except KeyError:
        raise OSError("NXDOMAIN") from None


@pytest.mark.parametrize(
    ("provider", "name", "value"),
    [
        ("woocommerce", "store_url", "https://127.0.0.1"),
        ("woocommerce", "store_url", "https://[::1]:8443/shop"),
        ("woocommerce", "store_url", "https://169.254.169.254/latest"),
        ("woocommerce", "store_url", "https://172.20.0.3"),
        ("woocommerce", "store_url", "https://[::ffff:a9fe:a9fe]/"),
        ("woocommerce", "store_url", "https://2130706433/"),
        ("woocommerce", "store_url", "https://017700000001/"),
        ("woocommerce", "store_url", "https://localhost/"),
        ("woocommerce", "store_url", "https://metadata.google.internal/"),
        ("woocommerce", "store_url", "https://shop.corp.internal/"),
        ("woocommerce", "store_url", "https://rebind.example.com/"),
        ("woocommerce", "store_url", "https://meta.example.com/"),
        ("woocommerce", "store_url", "https://nxdomain.example.com/"),
        ("woocommerce", "store_url", "http://shop.example.com/"),
        ("shopify", "shop_domain", "evil.myshopify.com"),
    ],
)
def test_check_target_refuses_what_the_egress_policy_refuses(
    provider: str, name: str, value: str, no_connect: list[Any]
) -> None:
    spec = get_provider(provider)
    creds = spec.validate(valid_fields(provider, **{name: value}))
    strict = EgressClient(EgressPolicy(), resolver=target_resolver)
    with pytest.raises(ValidationFailed) as refused:
        spec.check_target(strict, ProviderEndpoints(), creds)
    assert refused.value.extra["errors"][0]["field"] == f"fields.{name}"
    assert value not in str(refused.value.extra)
    assert no_connect == []


@pytest.mark.parametrize("provider", NAMES)
def test_check_target_passes_public_targets_and_providers_without_one(
    provider: str, no_connect: list[Any]
) -> None:
    spec = get_provider(provider)
    strict = EgressClient(EgressPolicy(), resolver=target_resolver)
    spec.check_target(strict, ProviderEndpoints(), spec.validate(valid_fields(provider)))
    assert no_connect == []


def test_check_target_honours_the_loopback_setting(fake: FakeProviders) -> None:
    """The test suite's fake providers live on 127.0.0.1: allowed only when configured."""
    spec = get_provider("woocommerce")
    creds = spec.validate(valid_fields("woocommerce", fake))
    dev = EgressClient(EgressPolicy(allow_http=True, allow_loopback=True))
    spec.check_target(dev, ProviderEndpoints(), creds)
    with pytest.raises(ValidationFailed):
        spec.check_target(EgressClient(EgressPolicy(allow_http=True)), ProviderEndpoints(), creds)


@pytest.mark.parametrize(
    ("provider", "host"),
    [
        ("twilio", "api.twilio.com"),
        ("woocommerce", "shop.example.com"),
        ("shopify", "demo-shop.myshopify.com"),
        ("whatsapp", "graph.facebook.com"),
        ("openai", "api.openai.com"),
    ],
)
def test_default_endpoints_go_to_the_real_hosts_over_https(
    provider: str, host: str, no_connect: list[Any]
) -> None:
    # A resolver that answers with a private address: the production policy refuses it,
    # so nothing leaves the machine, and the lookup shows which host would be called.
    lookups: list[tuple[str, int]] = []

    def resolver(name: str, port: int) -> list[str]:
        lookups.append((name, port))
        return ["10.9.8.7"]

    with EgressClient(EgressPolicy(), resolver=resolver) as production:
        result = run_test(provider, production, ProviderEndpoints(), valid_fields(provider))
    assert result.code == "refused_address"
    assert lookups == [(host, 443)]
    assert no_connect == []


def test_unreachable_provider(client: EgressClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    dead = ProviderEndpoints(twilio=f"http://127.0.0.1:{port}")
    result = run_test("twilio", client, dead, valid_fields("twilio"))
    assert (result.ok, result.code, result.status_code) == (False, "unreachable", None)
    assert result.reason.startswith("could not reach Twilio")
    assert VALID["twilio"]["auth_token"] not in result.reason


def test_connection_test_refuses_other_providers_credentials(
    client: EgressClient, endpoints: ProviderEndpoints
) -> None:
    creds = get_provider("openai").validate(valid_fields("openai"))
    with pytest.raises(ValueError, match="openai"):
        get_provider("twilio").connection_test(client, endpoints, creds)


# ------------------------------------------------------------ validation


GOOD: list[Any] = [
    pytest.param(
        "twilio", "account_sid", "  AC" + "0a" * 16 + "\n", "AC" + "0a" * 16, id="sid-stripped"
    ),
    pytest.param("twilio", "auth_token", "f" * 32, "f" * 32, id="twilio-token"),
    pytest.param(
        "twilio", "webhook_secret", "s3cr3t!#$%&()*+,-./:;<=>?@[]^_{}~", None, id="webhook-symbols"
    ),
    pytest.param(
        "woocommerce",
        "store_url",
        "https://shop.example.com/",
        "https://shop.example.com",
        id="url-slash",
    ),
    pytest.param(
        "woocommerce",
        "store_url",
        "HTTPS://shop.example.com//",
        "https://shop.example.com",
        id="url-scheme-case",
    ),
    pytest.param(
        "woocommerce",
        "store_url",
        "http://shop.example.com:8080/wp/",
        "http://shop.example.com:8080/wp",
        id="url-port-path",
    ),
    pytest.param("woocommerce", "store_url", "https://[2606:4700::1111]", None, id="url-ipv6"),
    pytest.param("woocommerce", "consumer_key", "ck_" + "a1" * 20, None, id="woo-key"),
    pytest.param(
        "shopify",
        "shop_domain",
        " Demo-Shop.MyShopify.com ",
        "demo-shop.myshopify.com",
        id="shop-lowercased",
    ),
    pytest.param("shopify", "shop_domain", "7shop.myshopify.com", None, id="shop-digit"),
    pytest.param("shopify", "access_token", "shpca_" + "AB12" * 8, None, id="shpca-upper"),
    pytest.param("shopify", "access_token", "shppa_" + "0" * 32, None, id="shppa"),
    pytest.param("whatsapp", "business_id", "12345", None, id="business-min"),
    pytest.param(
        "whatsapp", "access_token", "123456789012345|AbCdEf.ghIJ-kl_mn", None, id="app-token"
    ),
    pytest.param("openai", "api_key", "sk-" + "A" * 20, None, id="sk-min"),
    pytest.param("openai", "api_key", "sk-proj-" + "x_Y-" * 10, None, id="sk-proj"),
    pytest.param("openai", "org_id", "org-abcd1234", None, id="org-min"),
]


@pytest.mark.parametrize(("provider", "name", "raw", "expected"), GOOD)
def test_good_values_are_accepted(provider: str, name: str, raw: str, expected: str | None) -> None:
    creds = get_provider(provider).validate(valid_fields(provider, **{name: raw}))
    assert creds.reveal(name) == (raw if expected is None else expected)


BAD: list[Any] = [
    pytest.param("twilio", "account_sid", "AC123", id="sid-short"),
    pytest.param("twilio", "account_sid", "AC" + "0A" * 16, id="sid-upper"),
    pytest.param("twilio", "account_sid", "SK" + "0a" * 16, id="sid-prefix"),
    pytest.param("twilio", "account_sid", "AC" + "0a" * 16 + "\nx", id="sid-newline"),
    pytest.param("twilio", "auth_token", "g" * 32, id="token-not-hex"),
    pytest.param("twilio", "auth_token", "a" * 31, id="token-short"),
    pytest.param("woocommerce", "consumer_key", "a1" * 20, id="key-no-ck"),
    pytest.param("woocommerce", "consumer_key", "ck_" + "a" * 39, id="key-39"),
    pytest.param("woocommerce", "consumer_secret", "ck_" + "a" * 40, id="secret-ck-prefix"),
    pytest.param("woocommerce", "store_url", "shop.example.com", id="url-no-scheme"),
    pytest.param("woocommerce", "store_url", "ftp://shop.example.com", id="url-ftp"),
    pytest.param(
        "woocommerce", "store_url", "https://admin:hunter22@shop.example.com", id="url-userinfo"
    ),
    pytest.param(
        "woocommerce", "store_url", "https://shop.example.com/?consumer_key=x", id="url-query"
    ),
    pytest.param("woocommerce", "store_url", "https://shop.example.com/#frag", id="url-fragment"),
    pytest.param("woocommerce", "store_url", "https:///only-a-path", id="url-no-host"),
    pytest.param("woocommerce", "store_url", "https://shop.example.com:99999", id="url-bad-port"),
    pytest.param("woocommerce", "store_url", "https://shop.example.com:0", id="url-port-0"),
    pytest.param("woocommerce", "store_url", "https://shop example.com", id="url-space"),
    pytest.param(
        "woocommerce", "store_url", "https://shop.example.com\\@evil.test", id="url-backslash"
    ),
    pytest.param("woocommerce", "store_url", "javascript:alert(1)//", id="url-javascript"),
    pytest.param("shopify", "shop_domain", "shop.example.com", id="shop-other-domain"),
    pytest.param(
        "shopify", "shop_domain", "evil.myshopify.com.attacker.net", id="shop-suffix-trick"
    ),
    pytest.param(
        "shopify", "shop_domain", "https://demo-shop.myshopify.com", id="shop-with-scheme"
    ),
    pytest.param("shopify", "shop_domain", "demo-shop.myshopify.com/admin", id="shop-with-path"),
    pytest.param("shopify", "shop_domain", "a.b.myshopify.com", id="shop-two-labels"),
    pytest.param("shopify", "shop_domain", "-shop.myshopify.com", id="shop-leading-dash"),
    pytest.param("shopify", "access_token", "shpat_short", id="shopify-token-short"),
    pytest.param("shopify", "access_token", "shpxx_" + "a" * 32, id="shopify-token-prefix"),
    pytest.param("whatsapp", "business_id", "1234", id="business-short"),
    pytest.param("whatsapp", "business_id", "12345abc", id="business-letters"),
    pytest.param("whatsapp", "business_id", "1" * 21, id="business-long"),
    pytest.param(
        "whatsapp", "business_id", "\u0661\u0662\u0663\u0664\u0665", id="business-arabic-digits"
    ),
    pytest.param("whatsapp", "access_token", "EAAshort", id="wa-token-short"),
    pytest.param("whatsapp", "access_token", "EAA token with spaces in it", id="wa-token-space"),
    pytest.param("whatsapp", "access_token", "EAA/slashes/are/not/allowed", id="wa-token-slash"),
    pytest.param("whatsapp", "access_token", "E" * 501, id="wa-token-over-500"),
    pytest.param("openai", "api_key", "pk-" + "a" * 30, id="openai-prefix"),
    pytest.param("openai", "api_key", "sk-tooshort", id="openai-short"),
    pytest.param("openai", "api_key", "sk-" + "a" * 20 + "!", id="openai-bang"),
    pytest.param("openai", "org_id", "org-short", id="org-short"),
    pytest.param("openai", "org_id", "organisation-12345678", id="org-prefix"),
    pytest.param("twilio", "webhook_secret", "tooshort", id="webhook-short"),
    pytest.param("shopify", "webhook_secret", "has spaces in the secret value", id="webhook-space"),
    pytest.param("woocommerce", "webhook_secret", "\u00e9" * 20, id="webhook-non-ascii"),
    pytest.param("woocommerce", "webhook_secret", "x" * 257, id="webhook-long"),
]


def _errors(exc: ValidationFailed) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = exc.extra["errors"]
    return errors


@pytest.mark.parametrize(("provider", "name", "value"), BAD)
def test_bad_values_are_rejected_naming_the_field_not_the_value(
    provider: str, name: str, value: str
) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_provider(provider).validate(valid_fields(provider, **{name: value}))
    errors = _errors(excinfo.value)
    assert [e["field"] for e in errors] == [f"fields.{name}"]
    assert errors[0]["message"].startswith(f"{name} ")
    for text in (errors[0]["message"], str(excinfo.value), repr(excinfo.value)):
        assert value not in text
        assert value.strip() not in text


@pytest.mark.parametrize("provider", NAMES)
def test_canary_values_never_appear_in_errors(provider: str) -> None:
    spec = get_provider(provider)
    raw = {f.name: f"{f.name} {CANARY}" for f in spec.fields}  # a space: never valid
    raw["not_a_field"] = CANARY
    with pytest.raises(ValidationFailed) as excinfo:
        spec.validate(raw)
    errors = _errors(excinfo.value)
    assert {e["field"] for e in errors} == {f"fields.{f.name}" for f in spec.fields} | {"fields"}
    dumped = json.dumps([str(excinfo.value), repr(excinfo.value), errors, excinfo.value.extra])
    # Not even a fragment (a prefix, a hint-like tail) of the value.
    fragments = {CANARY[i : i + 5] for i in range(len(CANARY) - 4)}
    assert not [fragment for fragment in fragments if fragment in dumped]


def test_every_problem_is_listed() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_provider("woocommerce").validate({"consumer_key": "nope", "color": "blue"})
    assert excinfo.value.status == 422
    assert _errors(excinfo.value) == [
        {
            "field": "fields",
            "message": "unknown field for WooCommerce; the allowed fields are store_url, "
            "consumer_key, consumer_secret, webhook_secret",
        },
        {"field": "fields.store_url", "message": "store_url is required"},
        {
            "field": "fields.consumer_key",
            "message": "consumer_key must be 'ck_' followed by 40 lowercase hexadecimal characters",
        },
        {"field": "fields.consumer_secret", "message": "consumer_secret is required"},
    ]


@pytest.mark.parametrize("provider", NAMES)
def test_an_unknown_field_name_is_never_echoed(provider: str) -> None:
    # A secret pasted as a key looks like a field name: lowercase, digits, underscores.
    pasted = "sk_live_" + "a1b2c3d4" * 3
    with pytest.raises(ValidationFailed) as excinfo:
        get_provider(provider).validate({pasted: "x"})
    dumped = json.dumps([str(excinfo.value), _errors(excinfo.value), excinfo.value.extra])
    assert pasted not in dumped
    assert _errors(excinfo.value)[0]["field"] == "fields"


@pytest.mark.parametrize("provider", NAMES)
def test_missing_required_fields(provider: str) -> None:
    spec = get_provider(provider)
    with pytest.raises(ValidationFailed) as excinfo:
        spec.validate({})
    required = [f.name for f in spec.fields if f.required]
    assert _errors(excinfo.value) == [
        {"field": f"fields.{name}", "message": f"{name} is required"} for name in required
    ]


def test_required_fields_per_issue() -> None:
    required = {
        name: {f.name for f in spec.fields if f.required} for name, spec in PROVIDERS.items()
    }
    assert required == {
        "twilio": {"account_sid", "auth_token"},
        "woocommerce": {"store_url", "consumer_key", "consumer_secret"},
        "shopify": {"shop_domain", "access_token"},
        "whatsapp": {"business_id", "access_token"},
        "openai": {"api_key"},
    }


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_blank_values_count_as_missing(blank: str | None) -> None:
    spec = get_provider("twilio")
    creds = spec.validate(valid_fields("twilio", webhook_secret=blank))
    assert "webhook_secret" not in creds.names()
    with pytest.raises(ValidationFailed) as excinfo:
        spec.validate(valid_fields("twilio", auth_token=blank))
    assert _errors(excinfo.value) == [
        {"field": "fields.auth_token", "message": "auth_token is required"}
    ]


@pytest.mark.parametrize("value", [123, ["a"], {"a": 1}, b"AC" + b"0" * 32, True])
def test_non_string_values_are_rejected(value: object) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_provider("twilio").validate(valid_fields("twilio", account_sid=value))
    assert _errors(excinfo.value) == [
        {"field": "fields.account_sid", "message": "account_sid must be a string"}
    ]


def test_non_mapping_body_and_odd_field_names() -> None:
    spec = get_provider("openai")
    with pytest.raises(ValidationFailed):
        spec.validate(["api_key"])  # type: ignore[arg-type]
    # A pasted secret used as a key is not echoed.
    with pytest.raises(ValidationFailed) as excinfo:
        spec.validate({**valid_fields("openai"), f"sk-{CANARY}": "x", 7: "y"})  # type: ignore[dict-item]
    errors = _errors(excinfo.value)
    assert [e["field"] for e in errors] == ["fields", "fields"]
    assert CANARY not in json.dumps(errors)


def test_whitespace_is_stripped_everywhere() -> None:
    spec = get_provider("shopify")
    padded = {name: f" \t{value}\n " for name, value in VALID["shopify"].items()}
    assert spec.validate(padded) == spec.validate(VALID["shopify"])
    assert spec.validate(padded).reveal("access_token") == VALID["shopify"]["access_token"]


# ------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("value", "keep_prefix", "hint"),
    [
        ("ck_" + "0" * 36 + "abcd", True, "ck_****abcd"),
        ("cs_" + "0" * 36 + "wxyz", True, "cs_****wxyz"),
        ("AC" + "0" * 28 + "1234", True, "AC****1234"),
        ("sk-proj-" + "0" * 30 + "wxyz", True, "sk-****wxyz"),
        ("shpat_" + "0" * 28 + "beef", True, "shpat_****beef"),
        ("shpca_" + "0" * 28 + "cafe", True, "shpca_****cafe"),
        ("org-" + "A" * 20 + "9999", True, "org-****9999"),
        ("ck_" + "0" * 36 + "abcd", False, "****abcd"),
        ("plain-webhook-secret-5678", True, "****5678"),
        # Shorter than 16 characters: no tail.
        ("org-abcd1234", True, "org-****"),
        ("sk-abcdefghij", True, "sk-****"),
        ("short-secret", True, "****"),
        ("", True, "****"),
    ],
)
def test_mask_hint(value: str, keep_prefix: bool, hint: str) -> None:
    assert mask_hint(value, keep_prefix=keep_prefix) == hint


def test_hints_mask_secrets_and_show_identifiers() -> None:
    woo = get_provider("woocommerce")
    creds = woo.validate(valid_fields("woocommerce", webhook_secret="sk-looks-like-a-key-1234"))
    key, secret = VALID["woocommerce"]["consumer_key"], VALID["woocommerce"]["consumer_secret"]
    assert woo.hints(creds) == {
        "store_url": "https://shop.example.com",
        "consumer_key": f"ck_****{key[-4:]}",
        "consumer_secret": f"cs_****{secret[-4:]}",
        "webhook_secret": "****1234",  # never a prefix for webhook secrets
    }
    tw = get_provider("twilio")
    token = VALID["twilio"]["auth_token"]
    assert tw.hints(tw.validate(valid_fields("twilio")))["auth_token"] == f"****{token[-4:]}"


@pytest.mark.parametrize("provider", NAMES)
def test_hints_never_contain_a_secret(provider: str) -> None:
    spec = get_provider(provider)
    creds = spec.validate(valid_fields(provider))
    hints = spec.hints(creds)
    assert set(hints) == creds.names()
    for name, value in creds.secret_values().items():
        assert value not in hints[name]
        assert "****" in hints[name]


@pytest.mark.parametrize("provider", NAMES)
def test_repr_and_str_show_field_names_only(provider: str) -> None:
    creds = get_provider(provider).validate(valid_fields(provider))
    for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"c": creds})):
        assert text.count("Credentials(") == 1
        for value in creds.secret_values().values():
            assert value not in text
    assert repr(creds) == (f"Credentials(provider={provider!r}, fields={sorted(creds.names())!r})")


def test_repr_example_from_the_spec() -> None:
    creds = Credentials(
        "shopify",
        {
            "shop_domain": "demo-shop.myshopify.com",
            "access_token": VALID["shopify"]["access_token"],
        },
    )
    assert repr(creds) == "Credentials(provider='shopify', fields=['access_token', 'shop_domain'])"


def test_secret_values_and_identifiers_split() -> None:
    creds = get_provider("woocommerce").validate(valid_fields("woocommerce"))
    assert creds.identifiers() == {"store_url": "https://shop.example.com"}
    assert creds.secret_values() == {
        name: VALID["woocommerce"][name]
        for name in ("consumer_key", "consumer_secret", "webhook_secret")
    }
    openai = get_provider("openai").validate(valid_fields("openai"))
    assert openai.identifiers() == {}
    assert openai.reveal("missing") is None


def test_credentials_reject_unknown_fields_and_providers() -> None:
    with pytest.raises(ValueError, match="'colour'"):
        Credentials("openai", {"colour": "blue"})
    with pytest.raises(NotFound):
        Credentials("stripe", {})


def test_fingerprints() -> None:
    spec = get_provider("openai")
    first = spec.validate(valid_fields("openai"))
    again = spec.validate({k: f"  {v} " for k, v in reversed(valid_fields("openai").items())})
    changed = spec.validate(valid_fields("openai", org_id="org-Another12345"))
    without_org = spec.validate({"api_key": VALID["openai"]["api_key"]})

    assert first.fingerprint() == again.fingerprint()
    assert len({first.fingerprint(), changed.fingerprint(), without_org.fingerprint()}) == 3
    assert all(c in "0123456789abcdef" for c in first.fingerprint())
    assert len(first.fingerprint()) == 64
    # Keyed (HMAC) fingerprints depend on the key.
    assert first.fingerprint(key=b"k1") == again.fingerprint(key=b"k1")
    assert first.fingerprint(key=b"k1") not in (first.fingerprint(), first.fingerprint(key=b"k2"))
    assert first == again
    assert first != changed


def test_fingerprint_depends_on_the_provider() -> None:
    token = VALID["whatsapp"]["access_token"]
    a = Credentials("whatsapp", {"access_token": token})
    b = Credentials("shopify", {"access_token": token})
    assert a.fingerprint() != b.fingerprint()


# --------------------------------------------------------- is_configured


@pytest.mark.parametrize(
    ("provider", "present", "configured"),
    [
        # has_woocommerce_configured: store URL, key and secret.
        ("woocommerce", {"store_url", "consumer_key", "consumer_secret"}, True),
        ("woocommerce", {"store_url", "consumer_key", "consumer_secret", "webhook_secret"}, True),
        ("woocommerce", {"store_url", "consumer_key", "webhook_secret"}, False),
        ("woocommerce", {"consumer_key", "consumer_secret"}, False),
        # has_shopify_configured: shop domain and access token.
        ("shopify", {"shop_domain", "access_token"}, True),
        ("shopify", {"access_token", "webhook_secret"}, False),
        ("shopify", set(), False),
        ("twilio", {"account_sid", "auth_token"}, True),
        ("twilio", {"account_sid", "webhook_secret"}, False),
        ("whatsapp", {"business_id"}, False),
        ("openai", {"api_key"}, True),
        ("openai", {"org_id"}, False),
    ],
)
def test_is_configured(provider: str, present: set[str], configured: bool) -> None:
    assert get_provider(provider).is_configured(iter(sorted(present))) is configured


# ----------------------------------------------------------------- merge


@pytest.fixture
def stored() -> Credentials:
    return get_provider("woocommerce").validate(valid_fields("woocommerce"))


def test_merge_keeps_and_replaces(stored: Credentials) -> None:
    new_secret = "cs_" + "9" * 40
    merged = get_provider("woocommerce").merge(stored, {"consumer_secret": f" {new_secret} "})
    assert merged.reveal("consumer_secret") == new_secret
    for name in ("store_url", "consumer_key", "webhook_secret"):
        assert merged.reveal(name) == stored.reveal(name)
    assert stored.reveal("consumer_secret") == VALID["woocommerce"]["consumer_secret"]


@pytest.mark.parametrize("removal", [None, ""])
def test_merge_removes_an_optional_field(stored: Credentials, removal: str | None) -> None:
    merged = get_provider("woocommerce").merge(stored, {"webhook_secret": removal})
    assert merged.names() == {"store_url", "consumer_key", "consumer_secret"}


def test_merge_empty_patch_is_identity(stored: Credentials) -> None:
    merged = get_provider("woocommerce").merge(stored, {})
    assert merged.fingerprint() == stored.fingerprint()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"consumer_key": None}, "fields.consumer_key"),
        ({"consumer_key": "ck_bad"}, "fields.consumer_key"),
        ({"store_url": "https://shop.example.com/?x=1"}, "fields.store_url"),
        ({"api_key": "sk-" + "a" * 30}, "fields"),
    ],
)
def test_merge_revalidates(stored: Credentials, patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        get_provider("woocommerce").merge(stored, patch)
    assert [e["field"] for e in _errors(excinfo.value)] == [field]


def test_merge_refuses_another_providers_credentials(stored: Credentials) -> None:
    with pytest.raises(ValueError, match="woocommerce"):
        get_provider("shopify").merge(stored, {})
