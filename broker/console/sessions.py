"""Server-side console sessions in PostgreSQL, referenced by an httpOnly cookie.

The cookie carries 256 random bits; the table keeps their SHA-256. Signing in always
starts a new session (the pending one a browser had is deleted), so a session id an
attacker planted before sign-in is worth nothing after it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete
from sqlmodel import Session, col

from broker.audit import trail
from broker.auth.principal import Principal
from broker.auth.tokens import principal_from_claims
from broker.core.config import Settings
from broker.core.db import unit_of_work
from broker.core.errors import NotFound
from broker.models import ConsoleSession

COOKIE = "broker_console"
# A browser that opened the sign-in page has this long to finish signing in.
PENDING_TTL = timedelta(minutes=15)
# Rows this long past their expiry are deleted whenever a new session starts.
PURGE_AFTER = timedelta(hours=1)


def cookie_name(settings: Settings) -> str:
    """`__Host-` outside dev: the browser then insists on Secure, Path=/ and no Domain."""
    return COOKIE if settings.env == "dev" else f"__Host-{COOKIE}"


def cookie_secure(settings: Settings) -> bool:
    """Secure everywhere but `make dev`, which serves plain http on loopback."""
    return settings.env != "dev"


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def hash_state(state: str) -> str:
    """How an OpenID Connect state is kept: hashed, like the session id."""
    return _hash(state)


@dataclass(frozen=True)
class Started:
    """A new session: the cookie value for the browser (shown nowhere else) and its row."""

    cookie: str
    row: ConsoleSession


def open_pending(engine: Engine, *, now: datetime) -> Started:
    """`start_pending` in a unit of work of its own."""
    with unit_of_work(engine) as session:
        return start_pending(session, now=now)


def lookup(engine: Engine, cookie: str, *, now: datetime) -> ConsoleSession | None:
    """`find` in a unit of work of its own."""
    with unit_of_work(engine) as session:
        return find(session, cookie, now=now)


def remember_login(
    engine: Engine,
    pending: ConsoleSession,
    *,
    state: str,
    nonce: str,
    verifier: str,
    next_path: str,
) -> None:
    """Bind an OpenID Connect login (state hashed, nonce, PKCE verifier) to this browser."""
    with unit_of_work(engine) as session:
        row = session.get(ConsoleSession, pending.id_hash)
        if row is None:
            raise NotFound("the sign-in expired; start again")
        row.oidc_state_hash = hash_state(state)
        row.oidc_nonce = nonce
        row.pkce_verifier = verifier
        row.next_path = next_path
        session.add(row)


def begin(
    engine: Engine,
    *,
    pending: ConsoleSession | None,
    principal: Principal,
    token_expires_at: datetime,
    ttl: timedelta,
    now: datetime,
    method: str,
) -> Started:
    """Replace the browser's pending session with a signed-in one under a fresh id.

    In a unit of work of its own. What is kept is the verified token's claims, never
    the token: the session ends when the token would have, or after `ttl`, whichever
    comes first.
    """
    with unit_of_work(engine) as session:
        previous = session.get(ConsoleSession, pending.id_hash) if pending else None
        if previous is not None:
            session.delete(previous)
        _record(session, "console.sign_in", principal, detail={"method": method})
        claims: dict[str, Any] = {
            "sub": principal.subject,
            "kind": principal.kind,
            "scope": " ".join(sorted(principal.scopes)),
            "tenant_id": principal.tenant_id,
        }
        return _start(
            session,
            status="active",
            now=now,
            expires_at=min(now + ttl, token_expires_at),
            claims=claims,
            tenant_id=principal.tenant_id,
        )


def close(engine: Engine, current: ConsoleSession) -> None:
    """`end` in a unit of work of its own (nothing to do if the row is already gone)."""
    with unit_of_work(engine) as session:
        row = session.get(ConsoleSession, current.id_hash)
        if row is not None:
            end(session, row)


def start_pending(session: Session, *, now: datetime) -> Started:
    """A session for a browser that has not signed in: it carries the sign-in form's CSRF."""
    session.execute(
        delete(ConsoleSession).where(col(ConsoleSession.expires_at) < now - PURGE_AFTER)
    )
    return _start(session, status="pending", now=now, expires_at=now + PENDING_TTL)


def find(session: Session, cookie: str | None, *, now: datetime) -> ConsoleSession | None:
    """The live session a cookie names, or None (unknown, malformed or expired)."""
    if not cookie or len(cookie) > 100:
        return None
    row = session.get(ConsoleSession, _hash(cookie))
    if row is None or row.expires_at <= now:
        return None
    return row


def principal_of(row: ConsoleSession) -> Principal:
    """The signed-in user, rebuilt from the stored claims with the API's own checks."""
    claims = {k: v for k, v in (row.claims or {}).items() if v is not None}
    return principal_from_claims(claims)


def end(session: Session, row: ConsoleSession) -> None:
    """Sign out: the row goes, so the cookie names nothing any more."""
    if row.status == "active":
        _record(session, "console.sign_out", principal_of(row))
    session.delete(row)


def _record(
    session: Session, action: str, principal: Principal, detail: dict[str, Any] | None = None
) -> None:
    """A sign-in or sign-out in the audit trail, against the user's tenant's console."""
    trail.record(
        session,
        action=action,
        resource=f"tenants/{principal.tenant_id}/console",
        outcome="success",
        principal=principal,
        tenant_id=principal.tenant_id,
        detail=detail,
    )


def _start(
    session: Session, *, status: str, now: datetime, expires_at: datetime, **fields: Any
) -> Started:
    cookie = secrets.token_urlsafe(32)
    row = ConsoleSession(
        id_hash=_hash(cookie),
        status=status,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=expires_at,
        **fields,
    )
    session.add(row)
    session.flush()
    return Started(cookie, row)
