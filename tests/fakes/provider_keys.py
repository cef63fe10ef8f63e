"""Minted provider keys for the fake providers: Twilio's Keys API and OpenAI's admin API.

It follows /work/shared/research/lifecycle-building-blocks.md (sections 1 and 2):

| route                                                          | auth                          |
| POST   /2010-04-01/Accounts/{AC}/Keys.json  (FriendlyName)     | AC:auth_token or a Main key   |
| GET    /2010-04-01/Accounts/{AC}/Keys.json                     | same                          |
| DELETE /2010-04-01/Accounts/{AC}/Keys/{SK}.json  -> 204 / 404  | same                          |
| GET    /2010-04-01/Accounts/{AC}.json   with SK:secret         | a Standard key, until deleted |
| POST   /v1/organization/projects/{p}/service_accounts          | Bearer admin key              |
| GET    /v1/organization/projects/{p}/service_accounts          | Bearer admin key              |
| DELETE /v1/organization/projects/{p}/service_accounts/{id}     | Bearer admin key              |
| GET    /v1/organization/projects/{p}                           | Bearer admin key              |
| GET    /v1/models  with the service account's key              | until deleted or expired      |

Standard keys (SK) cannot mint keys, as on Twilio; admin keys work on admin endpoints
only, as on OpenAI. OpenAI keys expire by the fake's `clock` (seconds since the epoch,
a test moves it with `tests.fakes.shopify_oauth.FakeClock`); Twilio keys never expire.
Every successful deletion is counted per key, so a test can prove none went twice.
"""

from __future__ import annotations

import collections
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_EXPIRES_IN_S = 31_536_000

OPENAI_ADMIN: dict[str, str] = {
    "api_key": "sk-admin-Q9xLmTz4Rw8Kc2Vb7Nf1Hj5Pd3Gs6Ya0Ue",
    "org_id": "org-Q1w2E3r4T5y6U7i8",
    "project_id": "proj_Ab12Cd34Ef56Gh78",
}
"""The admin key (and its organisation and project) the fake accepts on admin endpoints."""

TWILIO_KEYS = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Keys\.json")
TWILIO_KEY = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-f]{32})/Keys/(SK[0-9a-f]{32})\.json")
OPENAI_PROJECT = re.compile(r"/v1/organization/projects/([A-Za-z0-9_]+)")
OPENAI_SERVICE_ACCOUNTS = re.compile(r"/v1/organization/projects/([A-Za-z0-9_]+)/service_accounts")
OPENAI_SERVICE_ACCOUNT = re.compile(
    r"/v1/organization/projects/([A-Za-z0-9_]+)/service_accounts/([A-Za-z0-9_]+)"
)

TWILIO_AUTH_ERROR = {
    "code": 20003,
    "detail": "Your AccountSid or AuthToken was incorrect.",
    "message": "Authenticate",
    "more_info": "https://www.twilio.com/docs/errors/20003",
    "status": 401,
}
TWILIO_NOT_FOUND = {
    "code": 20404,
    "message": "The requested resource was not found",
    "more_info": "https://www.twilio.com/docs/errors/20404",
    "status": 404,
}


def openai_error(message: str, code: str | None, kind: str = "invalid_request_error") -> Any:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class TwilioKey:
    """One Standard API key of an account."""

    sid: str
    account_sid: str
    secret: str
    friendly_name: str
    created: float

    def __repr__(self) -> str:
        return f"TwilioKey({self.sid}, {self.friendly_name!r})"


@dataclass
class ServiceAccount:
    """One OpenAI project service account and its one API key."""

    id: str
    project_id: str
    name: str
    created: float
    key_id: str
    key_value: str
    expires_at: float | None

    def __repr__(self) -> str:
        return f"ServiceAccount({self.id}, {self.name!r})"


class KeyRegistry:
    """The keys minted on the fake, shared by its request handlers (thread-safe)."""

    def __init__(self) -> None:
        self.clock: Callable[[], float] = time.time
        self._lock = threading.Lock()
        self.twilio: dict[str, TwilioKey] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.main_keys: set[tuple[str, str, str]] = set()
        self.deleted: collections.Counter[str] = collections.Counter()
        self.minted: collections.Counter[str] = collections.Counter()

    def reset(self) -> None:
        """Forget every key; the clock goes back to real time."""
        with self._lock:
            self.clock = time.time
            self.twilio.clear()
            self.service_accounts.clear()
            self.main_keys.clear()
            self.deleted.clear()
            self.minted.clear()

    # --------------------------------------------------------------- twilio

    def add_main_key(self, account_sid: str) -> tuple[str, str]:
        """A Main key of the account (Console-only on Twilio): it may mint keys."""
        sid, secret = "SK" + secrets.token_hex(16), secrets.token_hex(16)
        with self._lock:
            self.main_keys.add((account_sid, sid, secret))
        return sid, secret

    def twilio_key_valid(self, account_sid: str, sid: str, secret: str) -> bool:
        """Whether SK:secret authenticates for the account (a Standard or Main key)."""
        with self._lock:
            key = self.twilio.get(sid)
            if key is not None:
                return key.account_sid == account_sid and secrets.compare_digest(key.secret, secret)
            return (account_sid, sid, secret) in self.main_keys

    def is_main_key(self, account_sid: str, sid: str, secret: str) -> bool:
        """Whether SK:secret is a Main key of the account."""
        with self._lock:
            return (account_sid, sid, secret) in self.main_keys

    def create_twilio_key(self, account_sid: str, friendly_name: str) -> TwilioKey:
        """Mint a Standard key."""
        key = TwilioKey(
            sid="SK" + secrets.token_hex(16),
            account_sid=account_sid,
            secret=secrets.token_urlsafe(24),
            friendly_name=friendly_name,
            created=self.clock(),
        )
        with self._lock:
            self.twilio[key.sid] = key
            self.minted[key.sid] += 1
        return key

    def twilio_keys(self, account_sid: str) -> list[TwilioKey]:
        """Every Standard key of the account, oldest first."""
        with self._lock:
            return sorted(
                (k for k in self.twilio.values() if k.account_sid == account_sid),
                key=lambda k: k.created,
            )

    def delete_twilio_key(self, account_sid: str, sid: str) -> bool:
        """Delete a key; False when the account has no such key."""
        with self._lock:
            key = self.twilio.get(sid)
            if key is None or key.account_sid != account_sid:
                return False
            del self.twilio[sid]
            self.deleted[sid] += 1
            return True

    # --------------------------------------------------------------- openai

    def create_service_account(
        self, project_id: str, name: str, expires_in_s: int | None
    ) -> ServiceAccount:
        """A service account with one key, expiring `expires_in_s` from now (None: never)."""
        now = self.clock()
        account = ServiceAccount(
            id="svc_acct_" + secrets.token_hex(12),
            project_id=project_id,
            name=name,
            created=now,
            key_id="key_" + secrets.token_hex(8),
            key_value="sk-svcacct-" + secrets.token_urlsafe(36),
            expires_at=None if expires_in_s is None else now + expires_in_s,
        )
        with self._lock:
            self.service_accounts[account.id] = account
            self.minted[account.id] += 1
        return account

    def service_accounts_of(self, project_id: str) -> list[ServiceAccount]:
        """Every service account of a project, oldest first."""
        with self._lock:
            return sorted(
                (a for a in self.service_accounts.values() if a.project_id == project_id),
                key=lambda a: a.created,
            )

    def delete_service_account(self, project_id: str, account_id: str) -> bool:
        """Delete a service account and its keys; False when the project has none such."""
        with self._lock:
            account = self.service_accounts.get(account_id)
            if account is None or account.project_id != project_id:
                return False
            del self.service_accounts[account_id]
            self.deleted[account_id] += 1
            return True

    def openai_key(self, value: str) -> ServiceAccount | None:
        """The service account whose live (unexpired) key this is."""
        with self._lock:
            found = next(
                (
                    a
                    for a in self.service_accounts.values()
                    if secrets.compare_digest(a.key_value, value)
                ),
                None,
            )
        if found is None or (found.expires_at is not None and self.clock() >= found.expires_at):
            return None
        return found

    def openai_key_valid(self, value: str) -> bool:
        """Whether a minted key authenticates now (not deleted, not expired)."""
        return self.openai_key(value) is not None

    def twilio_key_json(self, key: TwilioKey, *, with_secret: bool) -> dict[str, Any]:
        """The Key resource as Twilio answers it (the secret only on creation)."""
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(key.created))
        body: dict[str, Any] = {
            "sid": key.sid,
            "friendly_name": key.friendly_name,
            "date_created": stamp,
            "date_updated": stamp,
        }
        if with_secret:
            body["secret"] = key.secret
        return body

    @staticmethod
    def service_account_json(account: ServiceAccount, *, with_key: bool) -> dict[str, Any]:
        """The service account as OpenAI answers it (the key value only on creation)."""
        body: dict[str, Any] = {
            "object": "organization.project.service_account",
            "id": account.id,
            "name": account.name,
            "role": "member",
            "created_at": int(account.created),
        }
        if with_key:
            body["api_key"] = {
                "object": "organization.project.service_account.api_key",
                "id": account.key_id,
                "value": account.key_value,
                "name": "Secret Key",
                "created_at": int(account.created),
                "expires_at": None if account.expires_at is None else int(account.expires_at),
            }
        return body
