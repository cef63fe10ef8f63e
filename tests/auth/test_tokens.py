"""Bearer token verification: what is accepted, what is refused, and what scopes mean."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio.to_thread
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError
from sqlalchemy import Engine

from broker.app import create_app
from broker.auth.principal import Principal
from broker.auth.scopes import Scope, effective_scopes
from broker.auth.tokens import TokenVerifier, mint_token, principal_from_claims
from broker.core.config import ConfigurationError, Settings
from broker.core.errors import Forbidden, Unauthenticated
from broker.vault.gateway import VaultGateway
from tests.support.loopback import Serving
from tests.support.tenants import make_tenant
from tests.support.tokens import token as signed_token

SECRET = "unit-test-hs256-signing-key-0123456789abcdef"
ISSUER = "tenant-secrets-broker"
AUDIENCE = "tenant-secrets-broker"
ASYMMETRIC = ["RS256", "ES256", "EdDSA"]
DROP = object()  # marks a claim to leave out


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_b64(value: Any) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid claim set for a tenant user; `DROP` removes a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "integrations:view",
        "kind": "user",
        "tenant_id": "t-acme",
    }
    for name, value in overrides.items():
        if value is DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def pem(private_key: Any) -> str:
    encoded: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded.decode()


def hs_verifier(cls: type[TokenVerifier] = TokenVerifier, **overrides: Any) -> TokenVerifier:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ASYMMETRIC,
        "hs256_secret": SECRET,
    }
    options.update(overrides)
    return cls(**options)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- the happy path ---------------------------------------------------------------


def test_minted_token_verifies_into_the_principal_it_names() -> None:
    token = mint_token(
        SECRET,
        subject="catalog-sync",
        scopes=["credentials:read", "integrations:view"],
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant_id="t-home",
        kind="service",
        tenants=["t-1", "t-2"],
    )

    principal = hs_verifier().verify(token)

    assert principal.subject == "catalog-sync"
    assert principal.kind == "service"
    assert principal.tenant_id == "t-home"
    assert principal.scopes == {"credentials:read", "integrations:view"}
    assert principal.tenants == {"t-1", "t-2"}
    assert principal.actor == "service:catalog-sync"
    assert principal.token_id  # the jti, for the audit trail


def test_user_token_defaults_to_kind_user_with_no_tenants_served() -> None:
    principal = hs_verifier().verify(hs256(claims(kind=DROP)))

    assert principal.kind == "user"
    assert principal.actor == "user:alice"
    assert principal.tenants == frozenset()
    assert principal.tenant_id == "t-acme"


def test_verifier_from_dev_settings_accepts_dev_tokens() -> None:
    settings = Settings(_env_file=None, env="test", jwt_hs256_secret=SECRET)
    token = mint_token(
        SECRET, subject="bob", scopes=["finance:view"], issuer=ISSUER, audience=AUDIENCE
    )

    assert TokenVerifier.from_settings(settings).verify(token).subject == "bob"


def test_expiry_and_nbf_within_the_leeway_are_tolerated() -> None:
    now = int(time.time())
    verifier = hs_verifier(leeway_s=30)

    assert verifier.verify(hs256(claims(exp=now - 10))).subject == "alice"
    assert verifier.verify(hs256(claims(nbf=now + 10))).subject == "alice"


# --- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "make_claims"),
    [
        ("expired beyond leeway", lambda now: claims(exp=now - 120)),
        ("nbf beyond leeway", lambda now: claims(nbf=now + 120)),
        ("wrong issuer", lambda now: claims(iss="https://evil.example")),
        ("wrong audience", lambda now: claims(aud="some-other-api")),
        ("missing audience", lambda now: claims(aud=DROP)),
        ("missing exp", lambda now: claims(exp=DROP)),
        ("missing sub", lambda now: claims(sub=DROP)),
        ("empty sub", lambda now: claims(sub="")),
        ("missing iss", lambda now: claims(iss=DROP)),
        ("scope is a list", lambda now: claims(scope=["integrations:view"])),
        ("unknown kind", lambda now: claims(kind="admin")),
        ("tenants is a string", lambda now: claims(kind="service", tenants="t-1")),
        ("tenants holds non-strings", lambda now: claims(kind="service", tenants=["t-1", 2])),
        ("tenant_id is not a string", lambda now: claims(tenant_id=42)),
    ],
)
def test_bad_claims_are_unauthenticated(label: str, make_claims: Any) -> None:
    token = hs256(make_claims(int(time.time())))

    with pytest.raises(Unauthenticated):
        hs_verifier(leeway_s=30).verify(token)


def test_expired_token_says_so() -> None:
    token = mint_token(
        SECRET, subject="alice", scopes=[], issuer=ISSUER, audience=AUDIENCE, ttl_s=-120
    )

    with pytest.raises(Unauthenticated, match="expired"):
        hs_verifier().verify(token)


def test_token_signed_with_another_key_is_refused() -> None:
    token = hs256(claims(), secret="another-tenant-signing-key-0123456789abcdef")

    with pytest.raises(Unauthenticated):
        hs_verifier().verify(token)


def test_tampered_payload_is_refused() -> None:
    header, _, signature = hs256(claims()).split(".")
    escalated = _json_b64(claims(scope="platform:admin audit:read"))

    with pytest.raises(Unauthenticated):
        hs_verifier().verify(f"{header}.{escalated}.{signature}")


def test_alg_none_token_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    token = f"{_json_b64({'alg': 'none', 'typ': 'JWT'})}.{_json_b64(claims())}."

    with pytest.raises(Unauthenticated):
        hs_verifier().verify(token)
    with pytest.raises(Unauthenticated):
        TokenVerifier(
            issuer=ISSUER, audience=AUDIENCE, algorithms=ASYMMETRIC, public_key=pem(rsa_key)
        ).verify(token)


def test_hs256_signed_with_the_public_key_pem_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic algorithm confusion: the attacker knows the public key and
    # uses its PEM text as an HMAC secret. Even an allowlist that names HS256
    # must not let that through when the verifier holds a public key.
    public_pem = pem(rsa_key)
    signing_input = f"{_json_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_json_b64(claims())}"
    mac = hmac.new(public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64url(mac)}"
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["RS256", "HS256"],
        public_key=public_pem,
    )

    with pytest.raises(Unauthenticated):
        verifier.verify(token)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not-a-jwt",
        "a.b.c",
        "....",
        "Bearer abc",
        f"{_json_b64(['alg', 'HS256'])}.{_json_b64({'sub': 'x'})}.sig",
        f"{_json_b64({'alg': 'HS256'})}.bm90IGpzb24.sig",
        "eyJhbGciOiJIUzI1NiJ9.%%%.###",
    ],
)
def test_garbage_is_unauthenticated(garbage: str) -> None:
    with pytest.raises(Unauthenticated):
        hs_verifier().verify(garbage)


# --- the Authorization header ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_accepted_in_any_case(client: TestClient, scheme: str) -> None:
    tenant = make_tenant(client)
    jwt_ = signed_token("tenant:admin", tenant_id=tenant)
    response = client.get("/v1/tenants/settings", headers={"Authorization": f"{scheme} {jwt_}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "header",
    [
        "Bearer  {t}",  # two spaces
        "Bearer\t{t}",
        "Bearer {t} extra",
        "Bearer {t},{t}",
        "Bearer{t}",
        "{t}",
        "Basic {t}",
        "Token {t}",
        "Bearer",
        "Bearer ",
    ],
)
def test_anything_but_exactly_bearer_space_token_is_unauthenticated(
    client: TestClient, header: str
) -> None:
    tenant = make_tenant(client)
    jwt_ = signed_token("tenant:admin", tenant_id=tenant)
    response = client.get(
        "/v1/tenants/settings", headers={"Authorization": header.replace("{t}", jwt_)}
    )
    assert response.status_code == 401, response.text
    assert jwt_ not in response.text


def test_two_authorization_headers_are_a_bad_request(client: TestClient) -> None:
    tenant = make_tenant(client)
    good = f"Bearer {signed_token('tenant:admin', tenant_id=tenant)}"
    other = f"Bearer {signed_token('tenant:admin', tenant_id=make_tenant(client))}"
    for pair in ([good, good], [good, other], [good, "Basic eA=="]):
        response = client.get(
            "/v1/tenants/settings", headers=[("Authorization", value) for value in pair]
        )
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "Bearer" not in response.text


def test_unknown_scope_fails_closed() -> None:
    token = hs256(claims(scope="integrations:view superuser"))

    with pytest.raises(Forbidden, match="superuser"):
        hs_verifier().verify(token)


def test_principal_from_claims_rejects_unknown_scope_without_a_token() -> None:
    with pytest.raises(Forbidden):
        principal_from_claims({"sub": "alice", "scope": "tenant:admin tenant:owner"})


# --- remembering verified tokens ---------------------------------------------------


class _CountingVerifier(TokenVerifier):
    """Counts full verifications (signature and claims), to tell hits from misses."""

    full_checks = 0

    def _verified_claims(self, token: str) -> Any:
        self.full_checks += 1
        return super()._verified_claims(token)


def counting_verifier(**overrides: Any) -> _CountingVerifier:
    verifier = hs_verifier(_CountingVerifier, **overrides)
    assert isinstance(verifier, _CountingVerifier)
    return verifier


def test_a_verified_token_is_remembered_by_its_digest_not_its_text() -> None:
    verifier = counting_verifier()
    token = hs256(claims())

    first = verifier.verify(token)
    again = [verifier.verify(token) for _ in range(5)]

    assert verifier.full_checks == 1
    assert all(p == first for p in again)
    assert list(verifier._remembered) == [hashlib.sha256(token.encode()).digest()]
    assert token not in repr(verifier._remembered)


def test_refused_tokens_are_never_remembered() -> None:
    verifier = counting_verifier()
    forged = hs256(claims(), secret="another-key-entirely-0123456789abcdef")
    unknown_scope = hs256(claims(scope="tenant:admin root:everything"))

    for _ in range(3):
        with pytest.raises(Unauthenticated):
            verifier.verify(forged)
        with pytest.raises(Forbidden):
            verifier.verify(unknown_scope)

    assert verifier.full_checks == 6
    assert not verifier._remembered


def test_a_remembered_token_still_expires_on_time() -> None:
    verifier = counting_verifier(leeway_s=0)
    token = hs256(claims(exp=int(time.time()) + 1))
    verifier.verify(token)

    time.sleep(1.2)

    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)


def test_remembering_lasts_cache_ttl_then_verifies_again() -> None:
    verifier = counting_verifier(cache_ttl_s=0.2)
    token = hs256(claims())
    verifier.verify(token)
    verifier.verify(token)
    assert verifier.full_checks == 1

    time.sleep(0.3)
    verifier.verify(token)

    assert verifier.full_checks == 2


def test_remembered_tokens_are_bounded() -> None:
    verifier = counting_verifier(cache_size=2)
    tokens = [hs256(claims(sub=name)) for name in ("ann", "ben", "cat")]
    for token in tokens:
        verifier.verify(token)

    assert len(verifier._remembered) == 2
    verifier.verify(tokens[0])  # the oldest was let go: verified in full again
    assert verifier.full_checks == 4


def test_cache_ttl_zero_verifies_every_time() -> None:
    verifier = counting_verifier(cache_ttl_s=0)
    token = hs256(claims())
    for _ in range(3):
        verifier.verify(token)

    assert verifier.full_checks == 3
    assert not verifier._remembered


# --- asymmetric keys --------------------------------------------------------------


def test_rs256_token_verifies_with_the_pem_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=ASYMMETRIC, public_key=pem(rsa_key)
    )
    token = jwt.encode(claims(scope="tenant:admin"), rsa_key, algorithm="RS256")

    principal = verifier.verify(token)

    assert principal.subject == "alice"
    assert principal.scopes == {"tenant:admin"}


def test_es256_token_verifies_with_the_pem_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=ASYMMETRIC, public_key=pem(ec_key)
    )
    token = jwt.encode(claims(), ec_key, algorithm="ES256")

    assert verifier.verify(token).tenant_id == "t-acme"


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        pytest.param("other_rsa_key", "RS256", id="rs256-from-another-key-pair"),
        pytest.param("ec_key", "ES256", id="es256-against-an-rsa-public-key"),
    ],
)
def test_a_token_the_configured_rsa_public_key_did_not_sign_is_refused(
    rsa_key: rsa.RSAPrivateKey, request: pytest.FixtureRequest, key: str, algorithm: str
) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=ASYMMETRIC, public_key=pem(rsa_key)
    )
    token = jwt.encode(claims(), request.getfixturevalue(key), algorithm=algorithm)

    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_rs256_token_refused_when_the_allowlist_omits_rs256(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"], public_key=pem(rsa_key)
    )
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")

    with pytest.raises(Unauthenticated, match="algorithm"):
        verifier.verify(token)


# --- construction -----------------------------------------------------------------


def test_verifier_refuses_to_exist_without_a_key() -> None:
    with pytest.raises(ConfigurationError, match="no token verification key"):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ASYMMETRIC)


def test_verifier_refuses_a_public_key_with_only_symmetric_algorithms(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    with pytest.raises(ConfigurationError, match="algorithm"):
        TokenVerifier(
            issuer=ISSUER, audience=AUDIENCE, algorithms=["HS256"], public_key=pem(rsa_key)
        )


@pytest.mark.parametrize("algorithms", ["RS256,none", "RS256, None", "NONE"])
def test_settings_refuse_the_none_algorithm(algorithms: str) -> None:
    with pytest.raises(ValidationError, match="'none' algorithm"):
        Settings(_env_file=None, jwt_algorithms=algorithms)


# --- JWKS -------------------------------------------------------------------------


@dataclass
class JwksServer:
    """A real local HTTP server that serves a JWKS document and counts fetches."""

    url: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    stall_s: float = 0.0  # wait this long before answering a fetch
    answered: int = 0


def jwk(private_key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    entry: dict[str, Any] = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    entry.update(kid=kid, use="sig", alg="RS256")
    return entry


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    state = JwksServer(url="", keys=[jwk(rsa_key, "key-1")])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            time.sleep(state.stall_s)
            state.answered += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    # Stalled answers are not waited for when the test ends.
    with Serving(Handler, join_handlers=False) as server:
        state.url = f"{server.base_url}/.well-known/jwks.json"
        yield state


def jwks_verifier(server: JwksServer, **overrides: Any) -> TokenVerifier:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ASYMMETRIC,
        "jwks_url": server.url,
    }
    options.update(overrides)
    return TokenVerifier(**options)


def test_jwks_token_with_known_kid_verifies(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})

    assert jwks_verifier(jwks_server).verify(token).subject == "alice"


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        pytest.param("rsa_key", {"kid": "key-unknown"}, id="unknown-kid"),
        pytest.param("rsa_key", None, id="without-kid"),
        pytest.param("other_rsa_key", {"kid": "key-1"}, id="another-key-under-a-known-kid"),
    ],
)
def test_a_jwks_token_no_published_key_verifies_is_unauthenticated(
    jwks_server: JwksServer,
    request: pytest.FixtureRequest,
    key: str,
    headers: dict[str, str] | None,
) -> None:
    signing: rsa.RSAPrivateKey = request.getfixturevalue(key)
    token = jwt.encode(claims(), signing, algorithm="RS256", headers=headers)

    with pytest.raises(Unauthenticated):
        jwks_verifier(jwks_server).verify(token)


def test_jwks_is_fetched_once_across_verifications(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks_server)

    for subject in ("alice", "bob", "carol"):
        token = jwt.encode(
            claims(sub=subject), rsa_key, algorithm="RS256", headers={"kid": "key-1"}
        )
        assert verifier.verify(token).subject == subject

    assert jwks_server.hits == 1


def test_unreachable_jwks_is_unauthenticated(rsa_key: rsa.RSAPrivateKey) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on this port any more
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=ASYMMETRIC,
        jwks_url=f"http://127.0.0.1:{port}/jwks.json",
    )
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})

    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_key_removed_from_jwks_stops_verifying_once_the_cache_expires(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    # A key the IdP withdraws (say, after a compromise) must stop working
    # within the cache lifetime, not stay trusted until the broker restarts.
    verifier = jwks_verifier(jwks_server, jwks_lifespan_s=0.2)
    old = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
    new = jwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "key-2"})
    assert verifier.verify(old).subject == "alice"

    jwks_server.keys = [jwk(other_rsa_key, "key-2")]
    time.sleep(0.3)

    # `old` was verified (and remembered) before: remembering must not outlive the key.
    assert verifier.verify(new).subject == "alice"
    with pytest.raises(Unauthenticated):
        verifier.verify(old)


def test_remembered_never_fetches_the_jwks(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks_server, jwks_lifespan_s=0.2)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
    assert verifier.remembered(token) is None  # never verified: a miss, not a fetch
    verifier.verify(token)
    assert verifier.remembered(token) == verifier.verify(token)

    time.sleep(0.3)  # the key set is past its lifespan

    assert verifier.remembered(token) is None  # a miss, without fetching
    assert jwks_server.hits == 1
    assert verifier.verify(token).subject == "alice"  # the full path fetches
    assert jwks_server.hits == 2


def test_a_jwks_fetch_does_not_stall_other_requests(
    jwks_server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    settings: Settings,
    engine: Engine,
    broker_vault: VaultGateway,
) -> None:
    jwks_settings = settings.model_copy(
        update={"jwt_jwks_url": jwks_server.url, "jwt_hs256_secret": None}
    )
    app = create_app(jwks_settings, engine=engine, vault=broker_vault)
    jwks_server.stall_s = 1.5
    token = jwt.encode(
        claims(scope="tenant:admin"), rsa_key, algorithm="RS256", headers={"kid": "key-1"}
    )

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            slow = asyncio.create_task(
                client.get("/v1/tenants/settings", headers={"Authorization": f"Bearer {token}"})
            )
            await asyncio.sleep(0.2)  # its JWKS fetch is under way, stalled
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert jwks_server.answered == 0  # answered while the fetch was still stalled
            assert (await slow).status_code != 401

    asyncio.run(scenario())
    assert jwks_server.hits == 1


@pytest.fixture
def stalled_jwks_app(
    jwks_server: JwksServer, settings: Settings, engine: Engine, broker_vault: VaultGateway
) -> Callable[..., Any]:
    """`make(stall_s, **settings)`: the app verifying against `jwks_server`, which answers
    each key fetch only after `stall_s`."""

    def make(stall_s: float, **update: Any) -> Any:
        app = create_app(settings.model_copy(update=update), engine=engine, vault=broker_vault)
        app.state.verifier = jwks_verifier(jwks_server)
        jwks_server.stall_s = stall_s
        return app

    return make


def _rs256(rsa_key: rsa.RSAPrivateKey, *subjects: str) -> list[str]:
    return [
        jwt.encode(claims(sub=name), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
        for name in subjects
    ]


def test_verifications_stalled_on_the_jwks_leave_threads_for_other_work(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, stalled_jwks_app: Callable[..., Any]
) -> None:
    app = stalled_jwks_app(1.5)
    tokens = _rs256(rsa_key, "ann", "ben", "cat")

    async def scenario() -> None:
        # Two threads for ordinary work: without a limit of their own, the stalled
        # verifications would hold both and /readyz (database and Vault checks in
        # the thread pool) would wait for the identity provider.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            stalled = [
                asyncio.create_task(
                    client.get("/v1/tenants/settings", headers={"Authorization": f"Bearer {t}"})
                )
                for t in tokens
            ]
            await asyncio.sleep(0.2)
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert jwks_server.answered == 0  # answered while the fetch was still stalled
            await asyncio.gather(*stalled)

    asyncio.run(scenario())


def test_a_request_finding_every_jwks_thread_stalled_is_a_503_instead_of_a_wait(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, stalled_jwks_app: Callable[..., Any]
) -> None:
    # A request waits for a verification thread as long as it would wait on Vault.
    app = stalled_jwks_app(3, vault_retry_budget_s=0.5)
    tokens = _rs256(rsa_key, *(f"user-{i}" for i in range(5)))
    bearers = [{"Authorization": f"Bearer {t}"} for t in tokens]

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
            stalled = [  # one per verification thread
                asyncio.create_task(client.get("/v1/tenants/settings", headers=headers))
                for headers in bearers[:4]
            ]
            await asyncio.sleep(0.2)
            refused = await client.get("/v1/tenants/settings", headers=bearers[4])
            assert jwks_server.answered == 0  # refused while every verification still waited
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) > 0
            await asyncio.gather(*stalled)

    asyncio.run(scenario())


def test_a_remembered_jwks_token_survives_a_refetch_of_the_same_key(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = jwks_verifier(jwks_server, jwks_lifespan_s=0.2)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
    assert verifier.verify(token).subject == "alice"

    time.sleep(0.3)  # the key set is fetched again; the key is the same

    assert verifier.verify(token).subject == "alice"
    assert jwks_server.hits == 2


# --- scopes and principals --------------------------------------------------------


def test_tenant_admin_implies_tenant_scopes_only() -> None:
    admin = Principal(subject="ada", kind="user", scopes=frozenset({"tenant:admin"}))

    for implied in ("integrations:view", "integrations:manage", "finance:view", "finance:manage"):
        assert admin.has(implied), implied
    for not_implied in ("credentials:read", "audit:read", "platform:admin"):
        assert not admin.has(not_implied), not_implied


def test_effective_scopes_adds_nothing_without_tenant_admin() -> None:
    granted = frozenset({"finance:view", "audit:read"})

    assert effective_scopes(granted) == granted
    assert effective_scopes(frozenset({Scope.TENANT_ADMIN.value})) == {
        "tenant:admin",
        "integrations:view",
        "integrations:manage",
        "finance:view",
        "finance:manage",
    }


def test_scope_is_granted_only_when_listed() -> None:
    viewer = Principal(subject="vic", kind="user", scopes=frozenset({"integrations:view"}))

    assert viewer.has("integrations:view")
    assert not viewer.has("integrations:manage")
    assert not viewer.has("tenant:admin")


@pytest.mark.parametrize(
    ("kind", "tenants", "asked", "expected"),
    [
        ("service", {"t-1", "t-2"}, "t-1", True),
        ("service", {"t-1", "t-2"}, "t-3", False),
        ("service", set(), "t-1", False),
        ("user", {"t-1"}, "t-1", False),
    ],
)
def test_may_serve_only_listed_tenants_and_only_for_services(
    kind: Any, tenants: set[str], asked: str, expected: bool
) -> None:
    principal = Principal(
        subject="catalog-sync",
        kind=kind,
        scopes=frozenset({"credentials:read"}),
        tenant_id="t-1",
        tenants=frozenset(tenants),
    )

    assert principal.may_serve(asked) is expected
