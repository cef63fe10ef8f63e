"""Bearer JWT verification (and minting with the dev key)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWKClient

from broker.auth.principal import Principal
from broker.auth.scopes import KNOWN_SCOPES
from broker.core.config import ConfigurationError, Settings
from broker.core.errors import BadRequest, Forbidden, Unauthenticated

_SYMMETRIC = {"HS256", "HS384", "HS512"}


# RFC 6750: the scheme in any case, exactly one space, then the token (b64token
# characters; a JWT uses a subset). Anything looser is not a bearer token.
_BEARER = re.compile(r"(?i:bearer) ([A-Za-z0-9\-._~+/]+=*)")


def bearer_token(authorization: list[str]) -> str | None:
    """The token of the one `Authorization: Bearer <token>` header, or None when there is none.

    Two Authorization headers are a 400: proxies and frameworks disagree on
    which one counts, so the broker picks neither. A header that is not
    exactly `Bearer <token>` is a 401.
    """
    if len(authorization) > 1:
        raise BadRequest("send exactly one Authorization header")
    if not authorization:
        return None
    match = _BEARER.fullmatch(authorization[0])
    if match is None:
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return match.group(1)


class TokenVerifier:
    """Checks signature (from an allowlist of algorithms), issuer, audience, expiry and nbf.

    Exactly one key source is in use. With a public key or JWKS, symmetric
    algorithms are refused outright, which closes the classic confusion where a
    public key is used as an HMAC secret.

    A token that verified is remembered (by its SHA-256, never the token itself)
    for `cache_ttl_s` or until it expires, whichever comes first, so a service
    that sends the same token on every call is not re-verified every time: a
    signature check and claim validation cost about a tenth of a millisecond,
    the largest piece of the broker's own work on a credential fetch. Only
    successes are remembered; a refused token is checked in full every time.
    Up to `cache_size` tokens (16,384: a token for each of 10,000 tenants and more)
    are remembered, the least recently used dropped first. With a JWKS, a
    remembered token is trusted only while its signing key is still the one the
    key set holds, so a withdrawn key stops working exactly when it would without
    this cache (within the JWKS lifespan).
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | None,
        algorithms: Iterable[str],
        hs256_secret: str | None = None,
        public_key: str | None = None,
        jwks_url: str | None = None,
        leeway_s: int = 30,
        jwks_lifespan_s: float = 300,
        cache_ttl_s: float = 60,
        cache_size: int = 16_384,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        # sha256(token) -> what its verification found, least recently stored first
        self._remembered: OrderedDict[bytes, _Remembered] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Told whether each lookup in the cache of verified tokens found it (for /metrics).
        self.on_lookup: Callable[[bool], None] = lambda found: None
        self._jwks: PyJWKClient | None = None
        self._key: Any = None
        if jwks_url:
            # Only the key set is cached, for `jwks_lifespan_s`. PyJWT's per-kid
            # cache (cache_keys) never expires, so a key the IdP withdraws would
            # stay trusted until the process restarts.
            self._jwks = PyJWKClient(jwks_url, lifespan=jwks_lifespan_s, timeout=5)
            self.algorithms = [a for a in algorithms if a not in _SYMMETRIC]
        elif public_key:
            # Parse the PEM once, not on every request.
            self._key = load_pem_public_key(public_key.encode())
            self.algorithms = [a for a in algorithms if a not in _SYMMETRIC]
        elif hs256_secret:
            self._key = hs256_secret
            self.algorithms = ["HS256"]
        else:
            raise ConfigurationError(
                "no token verification key is configured: set BROKER_JWT_JWKS_URL or "
                "BROKER_JWT_PUBLIC_KEY (outside production, BROKER_JWT_HS256_SECRET)"
            )
        if not self.algorithms:
            raise ConfigurationError(
                "no usable signing algorithm is allowed for this key (BROKER_JWT_ALGORITHMS)"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The verifier the configuration describes."""
        return cls(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            hs256_secret=(
                settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None
            ),
            public_key=(
                settings.jwt_public_key.get_secret_value() if settings.jwt_public_key else None
            ),
            jwks_url=settings.jwt_jwks_url,
            leeway_s=settings.jwt_leeway_s,
            cache_ttl_s=settings.jwt_cache_ttl_s,
        )

    @property
    def may_block(self) -> bool:
        """True when a full verification may fetch the JWKS over the network.

        Callers on an event loop run `verify` in a worker thread then, after
        trying `remembered`, which never does I/O.
        """
        return self._jwks is not None

    def remembered(self, token: str) -> Principal | None:
        """The principal of a token verified moments ago, found without any I/O; or None."""
        if self._cache_ttl_s <= 0:
            return None
        return self._lookup(hashlib.sha256(token.encode()).digest(), time.time())

    def verify(self, token: str) -> Principal:
        """The principal a token names; raises Unauthenticated or Forbidden."""
        if self._cache_ttl_s <= 0:
            return principal_from_claims(self._verified_claims(token).claims)
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        known = self._lookup(digest, now)
        if known is not None:
            return known
        verified = self._verified_claims(token)
        principal = principal_from_claims(verified.claims)
        until = min(now + self._cache_ttl_s, float(verified.claims["exp"]))
        if until > now:
            entry = _Remembered(until, principal, verified.kid, verified.key)
            with self._cache_lock:
                self._remembered[digest] = entry
                self._remembered.move_to_end(digest)
                while len(self._remembered) > self._cache_size:
                    self._remembered.popitem(last=False)
        return principal

    def _lookup(self, digest: bytes, now: float) -> Principal | None:
        with self._cache_lock:
            known = self._remembered.get(digest)
        if known is None or known.until <= now or not self._key_unchanged(known):
            self.on_lookup(False)
            return None
        self.on_lookup(True)
        return known.principal

    def _key_unchanged(self, known: _Remembered) -> bool:
        """A static key never changes; a JWKS key must still be the one it was.

        Looked up in the JWKS client's cached key set only, never fetched: the
        set hands out the same key objects until it is fetched again (once per
        lifespan), so a set past its lifespan, or a rotated or withdrawn key,
        is a miss, and the token is verified in full against a fresh set.
        """
        if self._jwks is None:
            return True
        cache = self._jwks.jwk_set_cache
        key_set = cache.get() if cache is not None else None
        if key_set is None:
            return False
        return any(jwk.key_id == known.kid and jwk.key is known.key for jwk in key_set.keys)

    def _verified_claims(self, token: str) -> _Verified:
        """Verify signature and registered claims, or raise Unauthenticated."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed bearer token") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthenticated("token algorithm is not allowed")
        kid = header.get("kid")
        try:
            key = self._jwks.get_signing_key(kid or "").key if self._jwks else self._key
            claims = jwt.decode(
                token,
                key=key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={
                    "require": ["exp", "iss", "sub"] + (["aud"] if self.audience else []),
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise _signed_but_unusable(token, "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _signed_but_unusable(token, "token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise _signed_but_unusable(token, "token audience is wrong") from None
        except jwt.InvalidIssuerError:
            raise _signed_but_unusable(token, "token issuer is wrong") from None
        except (jwt.PyJWTError, TypeError):
            # PyJWT raises a bare TypeError when the header's algorithm does not
            # fit the key type (an ES256 header against an RSA key).
            raise Unauthenticated("token signature or claims are invalid") from None
        if not isinstance(claims.get("exp"), int | float):
            raise Unauthenticated("token expiry is invalid")
        return _Verified(claims, kid if isinstance(kid, str) else None, key)


@dataclass(frozen=True)
class _Verified:
    claims: dict[str, Any]
    kid: str | None
    key: Any


@dataclass(frozen=True)
class _Remembered:
    """A token verified moments ago: until when to trust it, and the key that signed it."""

    until: float
    principal: Principal
    kid: str | None
    key: Any


def _signed_but_unusable(token: str, reason: str) -> Unauthenticated:
    # PyJWT checks the signature before these claims, so the subject is genuine.
    error = Unauthenticated(reason)
    try:
        subject = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        subject = None
    error.subject = subject if isinstance(subject, str) else None
    return error


# The actor (`service:<subject>`) fills 200-character columns (created_by,
# updated_by, the audit trail's actor) and a tenant id 63-character ones. A claim
# that cannot be stored is refused here, once, as a 401; otherwise every audited
# write by that caller would fail at the database with a 500.
_MAX_SUBJECT = 200 - len("service:")


def _storable(value: object, limit: int) -> TypeGuard[str]:
    """A non-empty string of at most `limit` characters, with no NUL (PostgreSQL refuses it)."""
    return isinstance(value, str) and 0 < len(value) <= limit and "\x00" not in value


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Build the principal; a claim of the wrong shape or an unknown scope denies."""
    subject = claims.get("sub")
    scope = claims.get("scope", "")
    kind = claims.get("kind", "user")
    tenant_id = claims.get("tenant_id")
    tenants = claims.get("tenants", [])
    if not _storable(subject, _MAX_SUBJECT):
        raise Unauthenticated("token subject is invalid")
    if not isinstance(scope, str):
        raise Unauthenticated("token scope claim must be a space-separated string")
    if kind not in ("user", "service"):
        raise Unauthenticated("token kind is invalid")
    if tenant_id is not None and not _storable(tenant_id, 63):
        raise Unauthenticated("token tenant_id is invalid")
    if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
        raise Unauthenticated("token tenants claim must be a list of tenant ids")
    scopes = frozenset(scope.split())
    unknown = sorted(scopes - KNOWN_SCOPES)
    if unknown:
        # Fail closed: a scope we do not know might mean something we do not enforce.
        raise Forbidden(f"token carries unknown scope {unknown[0]!r}")
    return Principal(
        subject=subject,
        kind=kind,
        scopes=scopes,
        tenant_id=tenant_id,
        tenants=frozenset(tenants),
        token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
    )


def mint_token(
    secret: str,
    *,
    subject: str,
    scopes: Iterable[str],
    issuer: str,
    audience: str | None,
    tenant_id: str | None = None,
    kind: str = "user",
    tenants: Iterable[str] = (),
    ttl_s: int = 3600,
    not_before_s: int = 0,
) -> str:
    """Mint an HS256 token with the dev key. Production tokens come from your IdP."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "iss": issuer,
        "iat": now,
        "nbf": now + not_before_s,
        "exp": now + ttl_s,
        "jti": str(uuid.uuid4()),
        "scope": " ".join(scopes),
        "kind": kind,
    }
    if audience:
        claims["aud"] = audience
    if tenant_id:
        claims["tenant_id"] = tenant_id
    tenant_list = list(tenants)
    if tenant_list:
        claims["tenants"] = tenant_list
    return jwt.encode(claims, secret, algorithm="HS256")
