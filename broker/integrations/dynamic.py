"""The "dynamic" credential kind: a key minted per lease from a root credential the broker keeps.

Two providers can mint and delete keys over their REST APIs
(/work/shared/research/lifecycle-building-blocks.md, sections 1 and 2):

- Twilio: the account's auth token mints Standard API keys
  (`POST /2010-04-01/Accounts/{AC}/Keys.json`, `FriendlyName`); a service gets the
  `SK...` sid and its secret, never the auth token. Standard keys cannot mint keys
  themselves, and never expire: only the broker's revocation ends them.
- OpenAI: an Admin key creates a project service account whose API key expires with
  the lease (`expires_in_seconds`), a backstop should revocation be late; revoking
  deletes the service account. The stored credential is the admin key (`api_key`,
  `sk-admin-...`) and the project id.

A key is named after its lease, so one whose creation was answered too late to be
recorded (a timeout) can still be found by name and deleted. A delete answered with
404 means the key is already gone: done.

Every call goes through the broker's egress guard, like connection tests. Errors say
which class of failure happened, never a URL, a header or a provider's body.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from broker.integrations.egress import EgressFailed, EgressPolicy, EgressRefused, GuardedTransport
from broker.integrations.providers import Credentials, ProviderEndpoints

__all__ = [
    "DYNAMIC",
    "DynamicSpec",
    "KeyCallFailed",
    "KeyCalls",
    "MintedKey",
    "dynamic_spec",
    "lease_key_name",
]

FailureClass = Literal[
    "unreachable", "timeout", "rate_limited", "rejected", "provider_error", "refused_address"
]

_TWILIO_KEY_SID = re.compile(r"SK[0-9a-f]{32}", re.ASCII)
_OPENAI_ID = re.compile(r"[A-Za-z0-9_-]{1,200}", re.ASCII)
# Pages of keys or service accounts looked through to find a lost key by its name.
_FIND_PAGES = 20
# What each key call answers when it did what it was asked (the same at both providers);
# any other answer is the provider's error. A delete's 404: the key is already gone.
_DONE: dict[str, tuple[int, ...]] = {"POST": (200, 201), "GET": (200,), "DELETE": (200, 204, 404)}


def lease_key_name(lease_id: str) -> str:
    """The name a lease's key carries at the provider (Twilio allows 64 characters)."""
    return f"broker-lease-{lease_id}"


class KeyCallFailed(Exception):
    """A mint, find or revoke call did not succeed. `unknown`: it may have taken effect."""

    def __init__(
        self,
        error: FailureClass,
        message: str,
        *,
        retry_after_s: int | None = None,
        unknown: bool = False,
    ) -> None:
        super().__init__(message)
        self.error: FailureClass = error
        self.retry_after_s = retry_after_s
        self.unknown = unknown


@dataclass(frozen=True)
class MintedKey:
    """A key the provider just minted: its id (to revoke it) and what a service receives."""

    key_id: str
    secrets: dict[str, str] = field(repr=False)

    def __repr__(self) -> str:
        return f"MintedKey({self.key_id!r}, fields={sorted(self.secrets)})"


class KeyCalls:
    """Guarded HTTP calls to a provider's key API, over one shared (thread-safe) client.

    One client for the process: building a transport loads the trust store, tens of
    milliseconds, which a revocation sweep would pay per key. Every new connection still
    goes through the egress guard, which pins the address it checked.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self._client = httpx.Client(
            transport=GuardedTransport(policy),
            timeout=policy.timeout_s,
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def call(
        self,
        method: str,
        url: str,
        *,
        title: str,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """One request; KeyCallFailed for anything but the answer of a call that did its work."""
        writes = method != "GET"
        try:
            response = self._client.request(
                method, url, auth=auth, headers=headers, data=data, json=json
            )
        except (EgressRefused, EgressFailed) as exc:
            # The egress messages never contain the path, query or credentials.
            raise KeyCallFailed("refused_address", f"{title}: {exc}") from None
        except httpx.TimeoutException:
            raise KeyCallFailed(
                "timeout", f"{title} did not answer in time", unknown=writes
            ) from None
        except httpx.ConnectError:
            raise KeyCallFailed("unreachable", f"could not reach {title}") from None
        except httpx.HTTPError:
            # Sent, then the connection dropped without an answer.
            raise KeyCallFailed(
                "unreachable", f"{title} closed the connection", unknown=writes
            ) from None
        if response.status_code == 429:
            raise KeyCallFailed(
                "rate_limited",
                f"{title} is limiting requests (HTTP 429)",
                retry_after_s=_retry_after(response),
            )
        if response.status_code >= 500:
            raise KeyCallFailed(
                "provider_error",
                f"{title} answered with HTTP {response.status_code}",
                retry_after_s=_retry_after(response),
            )
        if response.status_code in (401, 403):
            raise KeyCallFailed("rejected", f"{title} rejected the root credential")
        if response.status_code not in _DONE[method]:
            raise _unexpected(title, response)
        return response


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("Retry-After", "")
    return min(int(value), 3600) if value.isdigit() else None


def _json(response: httpx.Response, title: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise KeyCallFailed("provider_error", f"{title} answered without the expected data")
    return body


def _unexpected(title: str, response: httpx.Response) -> KeyCallFailed:
    return KeyCallFailed("provider_error", f"{title} answered with HTTP {response.status_code}")


def _value(creds: Credentials, name: str) -> str:
    value = creds.reveal(name)
    if not value:
        raise ValueError(f"{name} is not set")
    return value


@dataclass(frozen=True)
class DynamicSpec:
    """How one provider mints, finds and revokes a lease's key from the root credential."""

    title: str
    check: Callable[[Credentials], str | None] = field(repr=False)
    """Why stored credentials cannot serve as a root (None when they can)."""
    mint: Callable[[KeyCalls, ProviderEndpoints, Credentials, str, int], MintedKey] = field(
        repr=False
    )
    """(calls, endpoints, root, key name, lease seconds) -> the new key."""
    find: Callable[[KeyCalls, ProviderEndpoints, Credentials, str], str | None] = field(repr=False)
    """The id of the key carrying this name, if the provider has one."""
    revoke: Callable[[KeyCalls, ProviderEndpoints, Credentials, str], None] = field(repr=False)
    """Delete a key by id; a key already gone counts as deleted."""
    deliver: Callable[[Credentials, MintedKey], dict[str, str]] = field(repr=False)
    """The fields a service receives: the minted key and non-root identifiers only."""
    account: Callable[[Credentials], str] = field(repr=False)
    """Where the keys live (the Twilio account, the OpenAI project): a root credential
    for another account cannot revoke them."""


# ------------------------------------------------------------------------ twilio


def _twilio_keys_url(endpoints: ProviderEndpoints, creds: Credentials) -> str:
    return f"{endpoints.twilio.rstrip('/')}/2010-04-01/Accounts/{_value(creds, 'account_sid')}/Keys"


def _twilio_root(creds: Credentials) -> tuple[str, str]:
    return _value(creds, "account_sid"), _value(creds, "auth_token")


def _twilio_check(creds: Credentials) -> str | None:
    if not (creds.reveal("account_sid") and creds.reveal("auth_token")):
        return "dynamic Twilio keys are minted with the account SID and auth token"
    return None


def _twilio_mint(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, name: str, ttl_s: int
) -> MintedKey:
    response = calls.call(
        "POST",
        f"{_twilio_keys_url(endpoints, creds)}.json",
        title="Twilio",
        auth=_twilio_root(creds),
        data={"FriendlyName": name},
    )
    body = _json(response, "Twilio")
    sid, secret = body.get("sid"), body.get("secret")
    if (
        not isinstance(sid, str)
        or not _TWILIO_KEY_SID.fullmatch(sid)
        or not isinstance(secret, str)
    ):
        raise KeyCallFailed("provider_error", "Twilio answered without a key", unknown=True)
    return MintedKey(sid, {"api_key_sid": sid, "api_key_secret": secret})


def _twilio_find(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, name: str
) -> str | None:
    url: str | None = f"{_twilio_keys_url(endpoints, creds)}.json?PageSize=1000"
    for _ in range(_FIND_PAGES):
        if url is None:
            return None
        response = calls.call("GET", url, title="Twilio", auth=_twilio_root(creds))
        body = _json(response, "Twilio")
        for key in body.get("keys") or []:
            if isinstance(key, dict) and key.get("friendly_name") == name:
                sid = key.get("sid")
                return sid if isinstance(sid, str) and _TWILIO_KEY_SID.fullmatch(sid) else None
        following = body.get("next_page_uri")
        url = f"{endpoints.twilio.rstrip('/')}{following}" if isinstance(following, str) else None
    return None


def _twilio_revoke(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, key_id: str
) -> None:
    if not _TWILIO_KEY_SID.fullmatch(key_id):
        raise ValueError("not a Twilio key sid")
    calls.call(
        "DELETE",
        f"{_twilio_keys_url(endpoints, creds)}/{key_id}.json",
        title="Twilio",
        auth=_twilio_root(creds),
    )


def _twilio_deliver(creds: Credentials, key: MintedKey) -> dict[str, str]:
    return {"account_sid": _value(creds, "account_sid"), **key.secrets}


# ------------------------------------------------------------------------ openai

ADMIN_KEY_PREFIX = "sk-admin-"


def _openai_accounts_url(endpoints: ProviderEndpoints, creds: Credentials) -> str:
    project = _value(creds, "project_id")
    return f"{endpoints.openai.rstrip('/')}/v1/organization/projects/{project}/service_accounts"


def _openai_admin(creds: Credentials) -> dict[str, str]:
    return {"Authorization": f"Bearer {_value(creds, 'api_key')}"}


def _openai_check(creds: Credentials) -> str | None:
    if not (creds.reveal("api_key") or "").startswith(ADMIN_KEY_PREFIX):
        return "dynamic OpenAI keys are minted with an Admin key (sk-admin-...)"
    if not creds.reveal("project_id"):
        return "dynamic OpenAI keys need the project id (proj_...) they are created in"
    return None


def _openai_mint(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, name: str, ttl_s: int
) -> MintedKey:
    response = calls.call(
        "POST",
        _openai_accounts_url(endpoints, creds),
        title="OpenAI",
        headers=_openai_admin(creds),
        json={"name": name, "expires_in_seconds": ttl_s},
    )
    body = _json(response, "OpenAI")
    account_id, key = body.get("id"), body.get("api_key")
    value = key.get("value") if isinstance(key, dict) else None
    if not isinstance(account_id, str) or not _OPENAI_ID.fullmatch(account_id):
        raise KeyCallFailed("provider_error", "OpenAI answered without a service account")
    if not isinstance(value, str) or not value:
        # The account exists (its id is known): revoking deletes it.
        raise KeyCallFailed("provider_error", "OpenAI answered without a key", unknown=True)
    return MintedKey(account_id, {"api_key": value})


def _openai_find(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, name: str
) -> str | None:
    after: str | None = None
    for _ in range(_FIND_PAGES):
        url = _openai_accounts_url(endpoints, creds) + "?limit=100"
        if after:
            url += f"&after={after}"
        response = calls.call("GET", url, title="OpenAI", headers=_openai_admin(creds))
        body = _json(response, "OpenAI")
        for account in body.get("data") or []:
            if isinstance(account, dict) and account.get("name") == name:
                found = account.get("id")
                return found if isinstance(found, str) and _OPENAI_ID.fullmatch(found) else None
        last = body.get("last_id")
        if not body.get("has_more") or not isinstance(last, str) or not _OPENAI_ID.fullmatch(last):
            return None
        after = last
    return None


def _openai_revoke(
    calls: KeyCalls, endpoints: ProviderEndpoints, creds: Credentials, key_id: str
) -> None:
    if not _OPENAI_ID.fullmatch(key_id):
        raise ValueError("not an OpenAI service account id")
    calls.call(
        "DELETE",
        f"{_openai_accounts_url(endpoints, creds)}/{key_id}",
        title="OpenAI",
        headers=_openai_admin(creds),
    )


def _openai_deliver(creds: Credentials, key: MintedKey) -> dict[str, str]:
    return dict(key.secrets)


DYNAMIC: dict[str, DynamicSpec] = {
    "twilio": DynamicSpec(
        title="Twilio",
        check=_twilio_check,
        mint=_twilio_mint,
        find=_twilio_find,
        revoke=_twilio_revoke,
        deliver=_twilio_deliver,
        account=lambda creds: _value(creds, "account_sid"),
    ),
    "openai": DynamicSpec(
        title="OpenAI",
        check=_openai_check,
        mint=_openai_mint,
        find=_openai_find,
        revoke=_openai_revoke,
        deliver=_openai_deliver,
        account=lambda creds: _value(creds, "project_id"),
    ),
}


def dynamic_spec(provider: str) -> DynamicSpec | None:
    """The provider's dynamic capability, or None when it cannot mint keys."""
    return DYNAMIC.get(provider)
