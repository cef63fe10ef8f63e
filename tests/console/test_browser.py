"""The console in a real browser: headless Chromium against a broker served by uvicorn.

One broker process on loopback, with the real Vault and PostgreSQL of the session, the fake
Shopify (OAuth consent), the fake providers (WooCommerce) and the fake Stripe with its
Stripe.js stand-in. Each journey saves a screenshot under tests/artifacts/.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import Select, WebDriverWait

from broker.devstack.openbao import free_port
from broker.vault.gateway import VaultGateway
from tests.fakes.oidc import FakeOIDC
from tests.fakes.providers import VALID, FakeProviders
from tests.fakes.shopify_oauth import FakeClock, FakeShopifyOAuth
from tests.fakes.stripe import FakeStripe
from tests.support.apps import VaultEndpoint
from tests.support.broker_process import BrokerProcess
from tests.support.browser import chromium, screenshot
from tests.support.loopback import QuietHandler, Serving
from tests.support.tenants import new_tenant_id
from tests.support.tokens import AUDIENCE, TEST_SIGNING_KEY, bearer, token

WAIT_S = 15
CLIENT_ID = "console-browser-client"
CLIENT_SECRET = "shpss_console_" + uuid.uuid4().hex
JS_BUDGET = 200 * 1024


@pytest.fixture(scope="module")
def broker_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def shopify(
    broker_url: str, vault_admin: VaultGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeShopifyOAuth]:
    """The fake Shopify, whose app is the platform's app in Vault for this module."""
    clock = FakeClock(tmp_path_factory.mktemp("clock") / "offset")
    before = vault_admin.kv.read("platform/shopify")
    with FakeShopifyOAuth(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock) as fake:
        fake.allowed_redirect_uris = [f"{broker_url}/v1/oauth/callback/shopify"]
        vault_admin.kv.write(
            "platform/shopify", {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, cas=None
        )
        yield fake
    if before is not None:
        vault_admin.kv.write("platform/shopify", dict(before.data), cas=None)


@contextmanager
def _broker_process(
    url: str, workdir: Path, base: dict[str, str], settings: dict[str, str]
) -> Iterator[str]:
    """`python -m tests.support.broker_process`: the app under uvicorn on loopback."""
    clock_file = workdir / "clock"
    clock_file.write_text("0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= base | settings
    env |= {
        "BROKER_ENV": "test",
        "BROKER_PORT": url.rsplit(":", 1)[1],
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_TEST_CLOCK_FILE": str(clock_file),
    }
    broker = BrokerProcess.start(url, env, workdir)
    try:
        yield url
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def services(
    vault_endpoint: VaultEndpoint, broker_vault_token: str, database_url: str
) -> dict[str, str]:
    """The session's real Vault and PostgreSQL, for every broker process here."""
    return {
        "BROKER_DATABASE_URL": database_url,
        "BROKER_VAULT_ADDRS": vault_endpoint.addr,
        "BROKER_VAULT_TOKEN": broker_vault_token,
        "BROKER_RATE_LIMIT_WRITE": "100000/minute",
        "BROKER_RATE_LIMIT_DENIALS": "100000/minute",
    }


@pytest.fixture(scope="module")
def broker(
    broker_url: str,
    services: dict[str, str],
    shopify: FakeShopifyOAuth,
    providers: FakeProviders,
    stripe_server: FakeStripe,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The broker as `make dev` runs it (a dev sign-in), with every fake plugged in."""
    settings = {
        "BROKER_JWT_HS256_SECRET": TEST_SIGNING_KEY,
        "BROKER_EGRESS_ALLOW_HTTP": "true",
        "BROKER_EGRESS_ALLOW_LOOPBACK": "true",
        "BROKER_SHOPIFY_BASE_URL": shopify.base_url,
        "BROKER_TWILIO_BASE_URL": providers.base_url,
        "BROKER_OAUTH_REDIRECT_BASE_URL": broker_url,
        "BROKER_OAUTH_RETURN_URLS": f"{broker_url}/console/integrations",
        "BROKER_STRIPE_API_BASE": stripe_server.base_url,
        "BROKER_STRIPE_JS_URL": stripe_server.js_url,
        "BROKER_STRIPE_PUBLISHABLE_KEY": stripe_server.publishable_key,
    }
    workdir = tmp_path_factory.mktemp("console-broker")
    with _broker_process(broker_url, workdir, services, settings) as url:
        yield url


def browser_log(driver: Chrome) -> list[dict[str, Any]]:
    """What the page logged since the last call (CSP violations among it), then forgotten."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]  # selenium leaves get_log unannotated
    return entries


@pytest.fixture(scope="module")
def driver() -> Iterator[Chrome]:
    browser = chromium()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver: Chrome) -> Chrome:
    """The browser with no cookies left from the journey before."""
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.set_window_size(1280, 900)
    browser_log(driver)  # drop what earlier journeys logged
    return driver


def _tenant(broker: str) -> str:
    tenant = new_tenant_id("web")
    made = httpx.post(
        f"{broker}/v1/tenants",
        json={"id": tenant, "name": "Mama Mboga Shop"},
        headers=bearer(token("platform:admin", subject="ops")),
    )
    assert made.status_code == 201, made.text
    return tenant


def _api(tenant: str) -> dict[str, str]:
    return bearer(token("tenant:admin", tenant_id=tenant))


def _wait(driver: Chrome, css: str) -> Any:
    return WebDriverWait(driver, WAIT_S).until(
        ready.visibility_of_element_located((By.CSS_SELECTOR, css))
    )


def _go(driver: Chrome, element: Any, *keys: str) -> None:
    """Click (or type into) something that loads another page, and wait until it has:
    until then the old page's elements would still be found."""
    driver.execute_script("window.__leaving = true;")  # a new page has a new window
    if keys:
        element.send_keys(*keys)
    else:
        element.click()
    WebDriverWait(driver, WAIT_S, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__leaving === undefined && document.readyState === 'complete';"
        )
    )


def _sign_in(driver: Chrome, broker: str, tenant: str, role: str = "admin") -> None:
    """The dev sign-in, with the keyboard: type, choose, Enter."""
    driver.get(f"{broker}/console")
    tenant_box = _wait(driver, "#tenant_id")
    assert driver.current_url.startswith(f"{broker}/console/sign-in")
    tenant_box.clear()
    tenant_box.send_keys(tenant)
    Select(driver.find_element(By.ID, "role")).select_by_value(role)
    _go(driver, driver.find_element(By.ID, "name"), Keys.ENTER)
    _wait(driver, "main h1")
    assert driver.current_url == f"{broker}/console", driver.page_source[:500]


def _script_bytes(driver: Chrome) -> int:
    """Bytes of JavaScript the page loaded (its own and every frame's same-origin scripts)."""
    return int(
        driver.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(function (e) { return e.initiatorType === 'script'; })"
            ".reduce(function (sum, e) { return sum + (e.decodedBodySize || 0); }, 0);"
        )
    )


def _unlabelled(driver: Chrome) -> list[str]:
    """Form controls a screen reader could not name."""
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('input, select, textarea'))"
            ".filter(function (e) { return e.type !== 'hidden' && e.labels.length === 0"
            " && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'); })"
            ".map(function (e) { return e.name || e.id; });"
        )
    )


def test_sign_in_edit_settings_see_a_validation_error_and_resolve_a_conflict(
    page: Chrome, broker: str
) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant)
    # The session cookie is httpOnly: no script on the page can read it.
    assert "broker_console" not in page.execute_script("return document.cookie")
    _go(page, page.find_element(By.LINK_TEXT, "Settings"))
    _go(page, page.find_element(By.LINK_TEXT, "Compliance settings"))
    retention = _wait(page, "#f-data_retention_days")
    assert _unlabelled(page) == []
    retention.clear()
    retention.send_keys("0")
    _go(page, page.find_element(By.ID, "save"))
    error = _wait(page, "#f-data_retention_days-error")
    assert "greater than or equal to 1" in error.text
    field = page.find_element(By.ID, "f-data_retention_days")
    assert field.get_attribute("aria-invalid") == "true"
    assert "f-data_retention_days-error" in (field.get_attribute("aria-describedby") or "")
    screenshot(page, "console-settings-validation-error")
    field.clear()
    field.send_keys("90")
    _go(page, page.find_element(By.ID, "save"))
    assert "Saved." in _wait(page, "#saved").text
    stored = httpx.get(f"{broker}/v1/tenants/settings", headers=_api(tenant)).json()
    assert stored["compliance_settings"]["data_retention_days"] == 90

    # Someone else saves branding while this page is open.
    page.get(f"{broker}/console/settings/branding")
    footer = _wait(page, "#f-footer_text")
    changed = httpx.patch(
        f"{broker}/v1/tenants/settings",
        json={"branding": {"footer_text": "Set by a colleague"}},
        headers=_api(tenant),
    )
    assert changed.status_code == 200
    footer.clear()
    footer.send_keys("Mine")
    _go(page, page.find_element(By.ID, "save"))
    conflict = _wait(page, "#conflict")
    assert "changed by someone else" in conflict.text
    screenshot(page, "console-settings-conflict")
    _go(page, page.find_element(By.ID, "reload"))
    footer = _wait(page, "#f-footer_text")
    assert footer.get_attribute("value") == "Set by a colleague"
    footer.clear()
    footer.send_keys("Mine, after reading theirs")
    _go(page, page.find_element(By.ID, "save"))
    _wait(page, "#saved")
    stored = httpx.get(f"{broker}/v1/tenants/settings", headers=_api(tenant)).json()
    assert stored["branding"]["footer_text"] == "Mine, after reading theirs"


def test_connect_shopify_through_the_providers_consent_page(
    page: Chrome, broker: str, shopify: FakeShopifyOAuth
) -> None:
    tenant = _tenant(broker)
    shop = f"{tenant}.myshopify.com"
    page.get(f"{shopify.base_url}/admin/login?shop={shop}")  # the merchant's Shopify admin
    _sign_in(page, broker, tenant)
    page.get(f"{broker}/console/integrations/shopify")
    box = _wait(page, "#shop")
    box.send_keys(shop)
    _go(page, page.find_element(By.CSS_SELECTOR, "#connect button"))
    install = _wait(page, "#install")
    assert page.current_url.startswith(f"{shopify.base_url}/admin/oauth/authorize?")
    assert shop in page.find_element(By.TAG_NAME, "h1").text
    screenshot(page, "console-shopify-consent")
    _go(page, install)
    outcome = _wait(page, "#outcome")
    assert page.current_url.startswith(f"{broker}/console/integrations?")
    assert "Connected." in outcome.text
    card = page.find_element(By.ID, "integration-shopify")
    assert "Working" in card.text
    assert "Access token expires" in card.text
    assert "in 59 minutes" in card.text or "in 1 hour" in card.text
    screenshot(page, "console-shopify-connected")
    fetched = httpx.get(
        f"{broker}/v1/credentials/{tenant}/shopify",
        headers=bearer(token("credentials:read", kind="service", tenants=(tenant,), subject="s")),
    )
    assert fetched.status_code == 200
    access_token = fetched.json()["fields"]["access_token"]
    assert shopify.token_valid(access_token)
    assert access_token not in page.page_source


def _paste_woo(page: Chrome, providers: FakeProviders, key: str, secret: str) -> None:
    store = page.find_element(By.ID, "field-store_url")
    store.clear()
    store.send_keys(providers.base_url)
    for name, value in (("consumer_key", key), ("consumer_secret", secret)):
        box = page.find_element(By.ID, f"field-{name}")
        box.clear()
        box.send_keys(value)


def test_paste_a_woocommerce_key_see_its_test_and_restore_a_version(
    page: Chrome, broker: str, providers: FakeProviders
) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant)
    page.get(f"{broker}/console/integrations/woocommerce")
    good = VALID["woocommerce"]
    _wait(page, "#field-store_url")
    assert page.find_element(By.ID, "field-consumer_secret").get_attribute("type") == "password"
    _paste_woo(page, providers, good["consumer_key"], "cs_" + "9" * 40)
    _go(page, page.find_element(By.ID, "test"))
    result = _wait(page, "#test-result")
    assert "Connection test failed" in result.text
    assert "Nothing was stored" in result.text
    screenshot(page, "console-woocommerce-test-failed")
    # A secret is never put back into the form, even a wrong one.
    assert page.find_element(By.ID, "field-consumer_secret").get_attribute("value") == ""
    _paste_woo(page, providers, good["consumer_key"], good["consumer_secret"])
    _go(page, page.find_element(By.ID, "test"))
    assert "Connection test passed" in _wait(page, "#test-result").text
    _paste_woo(page, providers, good["consumer_key"], good["consumer_secret"])
    _go(page, page.find_element(By.ID, "save"))
    assert "Saved." in _wait(page, "#done").text
    first_hint = page.find_element(By.CSS_SELECTOR, ".hint-value").text
    assert "****" in first_hint
    assert good["consumer_secret"] not in page.page_source

    second = {"consumer_key": "ck_" + "5" * 40, "consumer_secret": "cs_" + "6" * 40}
    providers.accept("woocommerce", **(dict(good) | second))
    _paste_woo(page, providers, second["consumer_key"], second["consumer_secret"])
    _go(page, page.find_element(By.ID, "save"))
    _wait(page, "#done")
    assert page.find_element(By.ID, "version").text == "2"
    _go(page, page.find_element(By.CSS_SELECTOR, "#version-1 button"))
    assert "Version restored." in _wait(page, "#done").text
    assert page.find_element(By.ID, "version").text == "3"
    assert page.find_element(By.CSS_SELECTOR, ".hint-value").text == first_hint
    screenshot(page, "console-woocommerce-restored")


def test_see_a_services_live_twilio_key_and_revoke_it(
    page: Chrome, broker: str, providers: FakeProviders
) -> None:
    tenant = _tenant(broker)
    integration = f"{broker}/v1/tenants/settings/integrations/twilio"
    saved = httpx.put(integration, json={"fields": VALID["twilio"]}, headers=_api(tenant))
    assert saved.status_code == 200, saved.text
    dynamic = httpx.put(f"{integration}/delivery", json={"mode": "dynamic"}, headers=_api(tenant))
    assert dynamic.status_code == 200, dynamic.text
    service = bearer(token("credentials:read", kind="service", tenants=(tenant,), subject="bot"))
    lease = httpx.get(f"{broker}/v1/credentials/{tenant}/twilio", headers=service).json()
    key_sid = lease["fields"]["api_key_sid"]

    _sign_in(page, broker, tenant)
    _go(page, page.find_element(By.CSS_SELECTOR, 'nav a[href="/console/leases"]'))
    row = _wait(page, f"#lease-{lease['lease_id']}")
    assert "bot" in row.text
    assert key_sid in row.text
    assert lease["fields"]["api_key_secret"] not in page.page_source
    screenshot(page, "console-live-leases")
    _go(page, row.find_element(By.CSS_SELECTOR, "button"))
    assert "Revoked" in _wait(page, "#done").text
    assert page.find_elements(By.ID, "no-leases")
    assert key_sid not in providers.keys.twilio  # deleted at the provider


def _type_card(page: Chrome, number: str) -> None:
    frame = _wait(page, "#card-element iframe")
    page.switch_to.frame(frame)
    try:
        _wait(page, "#number").send_keys(number)
        page.find_element(By.ID, "expiry").send_keys("12 / 34")
        page.find_element(By.ID, "cvc").send_keys("123")
    finally:
        page.switch_to.default_content()


def test_add_cards_through_stripe_js_set_the_default_and_remove_one(
    page: Chrome, broker: str, stripe_server: FakeStripe
) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant)
    for number, last4 in (("4242 4242 4242 4242", "4242"), ("5555 5555 5555 4444", "4444")):
        page.get(f"{broker}/console/payments")
        _go(page, page.find_element(By.ID, "add-card-link"))
        _type_card(page, number)
        assert _script_bytes(page) < JS_BUDGET
        if last4 == "4242":
            screenshot(page, "console-add-card")
        _go(page, page.find_element(By.ID, "save-card"))
        assert "Card added." in _wait(page, "#done").text
        assert (
            f"ending {last4}"
            in page.find_element(By.ID, "cards-title").find_element(By.XPATH, "..").text
        )
    # What the broker saw: references only. Stripe got the number, from Stripe's own frame.
    created = [r for r in stripe_server.requests if r.path == "/v1/payment_methods"]
    assert created[-1].params["card"]["number"] == "5555555555554444"
    methods = httpx.get(
        f"{broker}/v1/tenants/settings/payment-methods", headers=_api(tenant)
    ).json()
    assert [m["last4"] for m in methods] == ["4242", "4444"]
    assert all(m["id"].startswith("pm_") for m in methods)
    second = methods[1]["id"]
    _go(page, page.find_element(By.CSS_SELECTOR, f"#card-{second} form[action$='/default'] button"))
    assert "Default card changed." in _wait(page, "#done").text
    assert "Default" in page.find_element(By.ID, f"card-{second}").text
    first = methods[0]["id"]
    _go(page, page.find_element(By.CSS_SELECTOR, f"#card-{first} form[action$='/remove'] button"))
    assert "Card removed." in _wait(page, "#done").text
    assert page.find_elements(By.ID, f"card-{first}") == []
    screenshot(page, "console-payments")
    # Stripe.js is allowed on the add-card page only: here its load is refused.
    outcome = page.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "document.addEventListener('securitypolicyviolation', function (e) {"
        "  done('refused ' + e.effectiveDirective + ' ' + e.blockedURI); });"
        "var s = document.createElement('script'); s.src = arguments[0];"
        "s.onload = function () { done('loaded'); };"
        "document.head.appendChild(s);",
        stripe_server.js_url,
    )
    assert outcome.startswith(f"refused script-src-elem {stripe_server.base_url}"), outcome
    assert page.execute_script("return typeof window.Stripe") == "undefined"


def test_a_finance_only_user_sees_payments_and_is_refused_the_integrations_pages(
    page: Chrome, broker: str
) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant, role="finance")
    links = [a.text for a in page.find_elements(By.CSS_SELECTOR, "nav a")]
    assert links == ["Payments"]
    page.get(f"{broker}/console/integrations")
    assert "You don't have access" in _wait(page, "main h1").text
    screenshot(page, "console-finance-refused")
    page.get(f"{broker}/console/integrations/woocommerce")
    assert "You don't have access" in _wait(page, "main h1").text
    page.get(f"{broker}/console/payments")
    assert _wait(page, "main h1").text == "Payments"


def _attacker_page(target: str) -> type[BaseHTTPRequestHandler]:
    """Another origin's handler (another port on loopback: same site, so SameSite cookies
    are sent) whose page posts a form to the console as soon as it loads."""
    page = f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}">
<input name="business_name" value="Hacked"><input name="version" value="1">
<input name="csrf_token" value="guessed"></form>
<script>document.getElementById("f").submit();</script></body></html>""".encode()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.answer(200, page, {"Content-Type": "text/html"})

    return Handler


def test_a_form_posted_from_another_origin_is_refused(page: Chrome, broker: str) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant)
    attacker_page = _attacker_page(f"{broker}/console/settings/branding")
    with Serving(attacker_page, join_handlers=False) as attacker:
        page.get(f"{attacker.base_url}/")
        heading = _wait(page, "main h1")
        assert page.current_url == f"{broker}/console/settings/branding"
        assert "You don't have access" in heading.text
        assert "not sent from the console" in page.find_element(By.CSS_SELECTOR, "main").text
        screenshot(page, "console-csrf-refused")
    stored = httpx.get(f"{broker}/v1/tenants/settings", headers=_api(tenant)).json()
    assert stored["branding"]["business_name"] is None


def test_stored_markup_is_shown_as_text_and_the_policy_blocks_inline_script(
    page: Chrome, broker: str
) -> None:
    tenant = _tenant(broker)
    attack = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
    stored = httpx.patch(
        f"{broker}/v1/tenants/settings",
        json={"branding": {"business_name": attack[:100], "welcome_message": attack}},
        headers=_api(tenant),
    )
    assert stored.status_code == 200, stored.text
    _sign_in(page, broker, tenant)
    page.get(f"{broker}/console/settings/branding")
    name = _wait(page, "#f-business_name")
    assert name.get_attribute("value") == attack[:100]
    assert page.find_elements(By.CSS_SELECTOR, "main script, main img") == []
    assert page.title != "pwned"
    # Suppose markup did get in: an inline script is still refused by the policy.
    outcome = page.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "document.addEventListener('securitypolicyviolation', function (e) {"
        "  done('refused ' + e.effectiveDirective + ' ' + e.blockedURI); });"
        "var s = document.createElement('script');"
        "s.textContent = \"document.title='pwned'; window.__ran = true;\";"
        "document.body.appendChild(s);"
        "if (window.__ran) { done('ran'); }"
    )
    assert outcome == "refused script-src-elem inline", outcome
    assert page.title != "pwned"
    violations = [
        entry["message"]
        for entry in browser_log(page)
        if "Content Security Policy" in entry["message"]
    ]
    assert violations, "Chromium reported no CSP violation"
    screenshot(page, "console-stored-xss-escaped")


def test_pages_fit_a_phone_and_stay_under_the_script_budget(page: Chrome, broker: str) -> None:
    tenant = _tenant(broker)
    _sign_in(page, broker, tenant)
    page.set_window_size(390, 844)
    for path in (
        "/console",
        "/console/settings/business_hours",
        "/console/integrations",
        "/console/payments/payout",
    ):
        page.get(f"{broker}{path}")
        _wait(page, "main h1")
        overflow = page.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, path
        assert _script_bytes(page) < JS_BUDGET, path
        assert _unlabelled(page) == [], path
    screenshot(page, "console-phone-integrations")
    # Keyboard: the first Tab reaches the skip link, which leads to the content.
    page.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    active = page.switch_to.active_element
    assert active.get_attribute("class") == "skip"


def test_api_docs_render_from_local_assets_only(page: Chrome, broker: str) -> None:
    for path, ready_css in (("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-content")):
        page.get(f"{broker}{path}")
        _wait(page, ready_css)
        loaded = page.execute_script(
            "return performance.getEntriesByType('resource')"
            ".map(function (e) { return [e.name, e.responseStatus || 0]; });"
        )
        refused = " ".join(entry["message"] for entry in browser_log(page))
        for url, status in loaded:
            if url.startswith((broker, "blob:")):
                continue
            # ReDoc's bundle shows Redocly's logo from its CDN; the page's policy refuses it.
            assert status == 0, url
            assert "Content Security Policy" in refused, url
            assert url in refused, url
        screenshot(page, f"docs{path.replace('/', '-')}")


def test_sign_in_through_an_identity_provider_in_the_browser(
    page: Chrome, broker: str, services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Production's sign-in: a broker trusting only the provider's tokens, no dev sign-in."""
    tenant = _tenant(broker)
    url = f"http://127.0.0.1:{free_port()}"
    with FakeOIDC(client_id="console", client_secret="s3cret-for-tests", audience=AUDIENCE) as idp:
        idp.redirect_uris = [f"{url}/console/auth/callback"]
        idp.user = {"sub": "wanjiru", "scope": "tenant:admin", "tenant_id": tenant}
        settings = {
            "BROKER_JWT_JWKS_URL": f"{idp.issuer}/jwks",
            "BROKER_JWT_ISSUER": idp.issuer,
            "BROKER_JWT_ALGORITHMS": "RS256",
            "BROKER_CONSOLE_OIDC_ISSUER": idp.issuer,
            "BROKER_CONSOLE_OIDC_CLIENT_ID": "console",
            "BROKER_CONSOLE_OIDC_CLIENT_SECRET": "s3cret-for-tests",
        }
        workdir = tmp_path_factory.mktemp("console-oidc")
        with _broker_process(url, workdir, services, settings):
            page.get(f"{url}/console/settings")
            button = _wait(page, "#oidc-sign-in")
            assert page.find_elements(By.ID, "dev-sign-in") == []
            _go(page, button)
            _wait(page, "main h1")
            assert page.current_url == f"{url}/console/settings"
            assert "wanjiru" in page.find_element(By.CSS_SELECTOR, ".who").text
            assert "code_verifier" in idp.token_requests[-1]
            screenshot(page, "console-oidc-signed-in")
