"""The console's protections, over HTTP: session cookie, CSRF, origin, headers, scopes, escaping."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, text

from broker.app import create_app
from broker.audit import routes as audit_routes
from broker.auth.dependencies import declared_scopes
from broker.console import sessions
from broker.console.access import api_scopes
from broker.console.app import ROUTERS
from broker.console.rendering import ConsoleRoute
from broker.console.signin import dev_sign_in_available
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.integrations import routes as integration_routes
from broker.leases import routes as lease_routes
from broker.models import ConsoleSession, utcnow
from broker.payments import routes as payment_routes
from broker.settings import routes as settings_routes
from broker.vault.gateway import VaultGateway
from tests.console.conftest import ORIGIN, csrf_of, post_form, sign_in
from tests.support.tokens import bearer, token

COOKIE = "__Host-broker_console"


def test_pages_carry_a_strict_policy_and_hardening_headers(browser: TestClient) -> None:
    page = browser.get("/console/sign-in")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    script = browser.get("/console/static/add-card.js")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text.replace("<script src=", "")  # no inline script at all


def test_the_session_cookie_is_httponly_secure_lax_and_host_bound(browser: TestClient) -> None:
    cookie = browser.get("/console/sign-in").headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/"):
        assert attribute in cookie
    assert "Domain" not in cookie


def test_signing_in_starts_a_new_session_so_a_planted_id_is_worthless(
    browser: TestClient, shop: str
) -> None:
    browser.get("/console/sign-in")
    planted = browser.cookies.get(COOKIE)
    sign_in(browser, shop)
    assert browser.cookies.get(COOKIE) != planted
    stranger = TestClient(browser.app, base_url=ORIGIN)
    stranger.cookies.set(COOKIE, planted)
    answer = stranger.get("/console/settings", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/console/sign-in")


def sign_in_as_admin(browser: TestClient, page: str, shop: str, next_path: str) -> Any:
    """Submit the dev sign-in form of `page` as the shop's admin, asking to go to `next_path`."""
    return browser.post(
        "/console/sign-in/dev",
        data={"csrf_token": csrf_of(page), "tenant_id": shop, "role": "admin", "next": next_path},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )


def test_an_anonymous_visitor_is_sent_to_sign_in_and_back(browser: TestClient, shop: str) -> None:
    answer = browser.get("/console/settings/branding", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fsettings%2Fbranding"
    page = browser.get(answer.headers["location"])
    done = sign_in_as_admin(browser, page.text, shop, "/console/settings/branding")
    assert done.headers["location"] == "/console/settings/branding"


def test_sign_in_never_returns_to_another_site(browser: TestClient, shop: str) -> None:
    page = browser.get("/console/sign-in?next=https://evil.example/x")
    assert 'value="/console"' in page.text
    done = sign_in_as_admin(browser, page.text, shop, "//evil")
    assert done.headers["location"] == "/console"


def test_a_post_from_another_origin_is_refused_and_audited(
    admin: TestClient, shop: str, client: TestClient, engine: Engine
) -> None:
    page = admin.get("/console/settings/branding")
    forged = admin.post(
        "/console/settings/branding",
        data={"csrf_token": csrf_of(page.text), "version": "1", "business_name": "Forged"},
        headers={"Origin": "https://evil.example"},
    )
    assert forged.status_code == 403
    assert (
        "Forged"
        not in client.get(
            "/v1/tenants/settings", headers=bearer(token("tenant:admin", tenant_id=shop))
        ).text
    )
    with engine.connect() as conn:
        denied = conn.execute(
            text(
                "SELECT count(*) FROM audit_events WHERE tenant_id = :t AND outcome = 'denied'"
                " AND action = 'POST /console/settings/{group}'"
            ),
            {"t": shop},
        ).scalar_one()
    assert denied == 1


def test_a_post_without_the_sessions_csrf_token_is_refused(
    admin: TestClient, browser_factory: Any, shop: str
) -> None:
    missing = admin.post(
        "/console/settings/branding",
        data={"version": "1", "business_name": "No token"},
        headers={"Origin": ORIGIN},
    )
    assert missing.status_code == 403
    other = browser_factory()
    sign_in(other, shop)
    foreign_token = csrf_of(other.get("/console/settings/branding").text)
    crossed = admin.post(
        "/console/settings/branding",
        data={"csrf_token": foreign_token, "version": "1", "business_name": "Other token"},
        headers={"Origin": ORIGIN},
    )
    assert crossed.status_code == 403
    no_origin = admin.post(
        "/console/settings/branding",
        data={"csrf_token": csrf_of(admin.get("/console").text), "version": "1"},
    )
    assert no_origin.status_code == 403


def test_finance_only_sees_payments_and_is_refused_everything_else(
    browser: TestClient, shop: str
) -> None:
    sign_in(browser, shop, role="finance")
    home = browser.get("/console")
    assert 'href="/console/payments"' in home.text
    assert 'href="/console/integrations"' not in home.text
    assert 'href="/console/settings"' not in home.text
    assert browser.get("/console/payments").status_code == 200
    for path in (
        "/console/integrations",
        "/console/integrations/woocommerce",
        "/console/integrations/shopify",
        "/console/settings",
        "/console/settings/branding",
    ):
        refused = browser.get(path)
        assert refused.status_code == 403, path
        assert "You don&#39;t have access" in refused.text
    posted = post_form(
        browser, "/console/integrations/woocommerce/disconnect", {}, page="/console/payments"
    )
    assert posted.status_code == 403


def test_a_read_only_user_sees_settings_but_cannot_save_them(
    browser: TestClient, shop: str
) -> None:
    sign_in(browser, shop, role="viewer")
    page = browser.get("/console/settings/branding")
    assert page.status_code == 200
    assert "disabled" in page.text
    assert 'id="save"' not in page.text
    refused = post_form(
        browser,
        "/console/settings/branding",
        {"version": "1", "business_name": "Viewer"},
        page="/console/settings/branding",
    )
    assert refused.status_code == 403


def test_stored_markup_in_branding_is_shown_as_text(
    admin: TestClient, client: TestClient, shop: str
) -> None:
    attack = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
    stored = client.patch(
        "/v1/tenants/settings",
        json={"branding": {"business_name": attack[:100], "welcome_message": attack}},
        headers=bearer(token("tenant:admin", tenant_id=shop)),
    )
    assert stored.status_code == 200, stored.text
    page = admin.get("/console/settings/branding").text
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page
    assert "<script>document.title" not in page
    assert "<img src=x" not in page


def test_sign_out_ends_the_session_on_the_server(
    admin: TestClient, engine: Engine, shop: str
) -> None:
    cookie = admin.cookies.get(COOKIE)
    assert post_form(admin, "/console/sign-out", {}).status_code == 303
    with engine.connect() as conn:
        actions = conn.execute(
            text("SELECT action, detail FROM audit_events WHERE tenant_id = :t ORDER BY id"),
            {"t": shop},
        ).all()
    assert [(a, d) for a, d in actions if a.startswith("console.")] == [
        ("console.sign_in", {"method": "dev"}),
        ("console.sign_out", {}),
    ]
    replay = TestClient(admin.app, base_url=ORIGIN)
    replay.cookies.set(COOKIE, cookie)
    assert replay.get("/console/settings", follow_redirects=False).status_code == 303


def test_an_expired_session_signs_nobody_in(admin: TestClient, engine: Engine, shop: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE console_sessions SET expires_at = now() - :gap WHERE tenant_id = :t"),
            {"gap": timedelta(seconds=1), "t": shop},
        )
    assert admin.get("/console/settings", follow_redirects=False).status_code == 303


def test_a_session_whose_scopes_became_unknown_is_refused(
    admin: TestClient, engine: Engine, shop: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE console_sessions SET claims = jsonb_set(claims, '{scope}',"
                " '\"tenant:admin tenant:superuser\"') WHERE tenant_id = :t"
            ),
            {"t": shop},
        )
    assert admin.get("/console/settings").status_code == 403


def test_dev_sign_in_names_a_real_tenant(browser: TestClient) -> None:
    page = browser.get("/console/sign-in")
    answer = browser.post(
        "/console/sign-in/dev",
        data={"csrf_token": csrf_of(page.text), "tenant_id": "no-such-shop", "role": "admin"},
        headers={"Origin": ORIGIN},
    )
    assert answer.status_code == 422
    assert "There is no tenant with that id." in answer.text


def test_dev_sign_in_exists_only_outside_production() -> None:
    secret = SecretStr("x" * 40)
    assert dev_sign_in_available(Settings.model_construct(env="dev", jwt_hs256_secret=secret))
    assert not dev_sign_in_available(
        Settings.model_construct(env="production", jwt_hs256_secret=secret)
    )
    assert not dev_sign_in_available(Settings.model_construct(env="dev", jwt_hs256_secret=None))


API_ALIASES = {
    api_scopes(alias)
    for alias in (
        settings_routes.SettingsReader,
        settings_routes.SettingsWriter,
        integration_routes.Viewer,
        integration_routes.Manager,
        integration_routes.Writer,
        payment_routes.FinanceViewer,
        payment_routes.FinanceManager,
        lease_routes.Viewer,
        lease_routes.Writer,
        audit_routes.TenantAdmin,
    )
}
# Pages every signed-in user may open, and the sign-in pages themselves.
OPEN = {
    "/console",
    "/console/sign-in",
    "/console/sign-in/dev",
    "/console/sign-in/oidc",
    "/console/auth/callback",
    "/console/sign-out",
}


def test_every_console_page_demands_the_scopes_of_an_api_route() -> None:
    pages = [r for router in ROUTERS for r in router.routes if isinstance(r, ConsoleRoute)]
    assert len(pages) > 15
    for route in pages:
        if route.path in OPEN:
            continue
        declared = [
            (declared_scopes(dep.call), getattr(dep.call, "__broker_limit__", None))
            for dep in route.dependant.dependencies
            if declared_scopes(dep.call)
        ]
        assert len(declared) == 1, route.path
        assert declared[0] in API_ALIASES, route.path
        if "POST" in (route.methods or set()):
            # A form that changes something counts against the same limit as the API's writes.
            assert declared[0][1] == "write", route.path


def test_the_root_leads_to_the_console(client: TestClient) -> None:
    answer = client.get("/", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "/console"


def test_docs_pages_load_nothing_from_another_host(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        page = client.get(path).text
        assert "cdn" not in page.lower()
        assert "https://" not in page
        assert "http://" not in page


def test_refused_pages_are_in_the_audit_trail_with_the_user(
    browser: TestClient, shop: str, engine: Engine
) -> None:
    sign_in(browser, shop, role="finance")
    assert browser.get("/console/integrations").status_code == 403
    with engine.connect() as conn:
        actors = conn.execute(
            text(
                "SELECT actor FROM audit_events WHERE tenant_id = :t AND outcome = 'denied'"
                " AND action = 'GET /console/integrations'"
            ),
            {"t": shop},
        ).scalars()
        assert list(actors) == ["user:console-dev"]


def test_unknown_pages_are_a_plain_404(admin: TestClient) -> None:
    for path in ("/console/integrations/myspace", "/console/settings/integrations_status"):
        answer = admin.get(path)
        assert answer.status_code == 404, path
        assert "text/html" in answer.headers["content-type"]
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


def test_under_make_dev_the_cookie_suits_plain_http_on_loopback() -> None:
    dev = Settings.model_construct(env="dev")
    assert sessions.cookie_name(dev) == "broker_console"
    assert not sessions.cookie_secure(dev)
    test = Settings.model_construct(env="test")
    assert sessions.cookie_name(test) == "__Host-broker_console"
    assert sessions.cookie_secure(test)


def test_long_expired_sessions_are_deleted_when_new_ones_start(engine: Engine) -> None:
    now = utcnow()
    with unit_of_work(engine) as session:
        old = sessions.start_pending(session, now=now - timedelta(days=1)).row.id_hash
        recent = sessions.start_pending(session, now=now - timedelta(minutes=20)).row.id_hash
    with unit_of_work(engine) as session:
        sessions.start_pending(session, now=now)
        assert session.get(ConsoleSession, old) is None
        assert session.get(ConsoleSession, recent) is not None  # expired, kept a while


def test_a_read_only_user_sees_integrations_without_forms_or_versions(
    browser: TestClient, admin_of: Any, shop: str, providers: Any
) -> None:
    admin_of(shop)
    sign_in(browser, shop, role="viewer")
    page = browser.get("/console/integrations/woocommerce")
    assert page.status_code == 200
    assert "Working (last test passed)" in page.text
    for form_id in ('id="credentials"', 'id="disconnect"', 'id="versions-title"'):
        assert form_id not in page.text
    refused = post_form(
        browser,
        "/console/integrations/woocommerce/disconnect",
        {"version": "1"},
        page="/console/integrations/woocommerce",
    )
    assert refused.status_code == 403


def test_without_any_sign_in_the_page_names_the_settings_to_set(
    settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    # A production-like key source (no HS256 dev key) and no OpenID Connect provider.
    keyed = settings.model_copy(
        update={"jwt_hs256_secret": None, "jwt_public_key": SecretStr(public_pem)}
    )
    assert not dev_sign_in_available(keyed)
    # Not as a context manager: the lifespan's shutdown would close the shared resources.
    unconfigured = TestClient(create_app(keyed, engine=engine, vault=broker_vault), base_url=ORIGIN)
    page = unconfigured.get("/console/sign-in").text
    assert "No sign-in is configured" in page
    # Whole names, so they can be pasted into the environment.
    assert "BROKER_CONSOLE_OIDC_ISSUER" in page
    assert "BROKER_CONSOLE_OIDC_CLIENT_ID" in page
