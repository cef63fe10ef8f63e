"""The HTTP transport under hvac: one urllib3 pool, audited headers, no redirects.

hvac builds the URLs, the request bodies and the error mapping; this adapter only
moves bytes. It replaces hvac's default, which goes through `requests`, because
on the credential-fetch path (two Vault calls per request) `requests` cost more
than Vault itself: a `Session.request` spends about half a millisecond per call
on merging environment settings, looking up proxies and NO_PROXY in the
environment, re-preparing hooks and cookies, and wrapping urllib3's response.
Measured on the bench machine, one KV read plus one Transit decrypt took 3.5 ms
through `requests`, 3.1 ms with `trust_env` off, and 2.6 ms through urllib3
directly (see the README's performance section for the whole fetch path).

Consequences, on purpose:
- proxy environment variables (`HTTPS_PROXY`, `NO_PROXY`) are not consulted: the
  broker talks to the Vault addresses it is configured with, directly;
- 3xx answers are never followed (a standby whose leader died points at the
  dead leader); they come back as `StandbyRedirect`, which the gateway treats
  as transient;
- transport failures surface as `urllib3.exceptions.HTTPError` subclasses
  (listed in `broker.vault.errors.TRANSIENT_TRANSPORT`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import hvac.adapters
import urllib3
from hvac import utils

from broker.vault.errors import StandbyRedirect

JSON = "application/json"


@dataclass(frozen=True)
class VaultResponse:
    """A Vault answer that is not a 200 with a JSON body (a 204, a 3xx, an error).

    The few attributes of `requests.Response` that hvac and the broker read.
    """

    status_code: int
    headers: Mapping[str, str] = field(repr=False)
    content: bytes = field(repr=False)

    @property
    def ok(self) -> bool:
        """As in requests: anything below 400."""
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def make_pool(*, verify: bool | str, timeout_s: float, maxsize: int) -> urllib3.PoolManager:
    """One keep-alive pool for every Vault node (urllib3 pools per host).

    `maxsize` connections are kept per node, enough for every worker thread that
    may call Vault at once, so busy periods do not open and drop connections.
    """
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED" if verify else "CERT_NONE"}
    if isinstance(verify, str):
        tls["ca_certs"] = verify
    return urllib3.PoolManager(
        maxsize=maxsize,
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        retries=False,  # the gateway retries, across nodes, within its budget
        **tls,
    )


class PooledAdapter(hvac.adapters.Adapter):  # type: ignore[type-arg]  # generic in stubs only
    """hvac's adapter contract over a shared urllib3 pool, stamping audited headers.

    Like hvac's JSONAdapter, a 200 with a JSON body comes back as a dict; any
    other success as a `VaultResponse`; an error status raises the hvac
    exception for it. `headers_for_call` supplies the audited headers of the
    request being served.
    """

    def __init__(
        self,
        *,
        pool: urllib3.PoolManager,
        headers_for_call: Callable[[], dict[str, str]],
        **kwargs: Any,
    ) -> None:
        # hvac's base class builds a requests.Session when given none; hand it a
        # placeholder so it does not, since nothing here uses one.
        kwargs.pop("session", None)
        super().__init__(session=_NO_SESSION, **kwargs)  # type: ignore[arg-type]
        self._pool = pool
        self._headers_for_call = headers_for_call

    def close(self) -> None:
        """The pool belongs to the gateway, which closes it."""

    def get_login_token(self, response: Any) -> str:
        return str(response["auth"]["client_token"])

    def request(  # type: ignore[no-untyped-def]  # hvac's signature
        self, method, url, headers=None, raise_exception=True, **kwargs
    ):
        while "//" in url:  # Vault reads a double slash as one; so does hvac
            url = url.replace("//", "/")
        url = self.urljoin(self.base_uri, url)
        sent = self._headers_for_call()
        sent.update(headers or {})
        sent["X-Vault-Request"] = "true"
        if self.token:
            sent["X-Vault-Token"] = self.token
        if self.namespace:
            sent["X-Vault-Namespace"] = self.namespace
        wrap_ttl = kwargs.pop("wrap_ttl", None)
        if wrap_ttl:
            sent["X-Vault-Wrap-TTL"] = str(wrap_ttl)
        body = self._body(kwargs, sent)
        params = kwargs.pop("params", None)
        if kwargs:
            raise TypeError(f"unsupported request options: {sorted(kwargs)}")
        if params:
            url = f"{url}?{urlencode(params, doseq=True)}"

        answer = self._pool.request(
            method.upper(), url, body=body, headers=sent, redirect=False, preload_content=True
        )
        status = answer.status
        if status == 200:
            try:
                return json.loads(answer.data)
            except ValueError:
                pass
        response = VaultResponse(status, answer.headers, answer.data)
        if not raise_exception or self.ignore_exceptions:
            return response
        if 300 <= status < 400:
            # A standby pointing elsewhere (urllib3, like requests, counts 3xx as
            # "ok"); code expecting a dict must not get it.
            raise StandbyRedirect(
                f"Vault answered {status} (a standby redirecting)", method=method, url=url
            )
        if status >= 400:
            self._raise_for_error(method, url, response)
        return response

    @staticmethod
    def _body(kwargs: dict[str, Any], headers: dict[str, str]) -> bytes | None:
        if "json" in kwargs:
            payload = kwargs.pop("json")
            if payload is None:
                return None
            headers["Content-Type"] = JSON
            return json.dumps(payload).encode()
        data = kwargs.pop("data", None)
        if data is None or isinstance(data, bytes):
            return data
        return str(data).encode()

    @staticmethod
    def _raise_for_error(method: str, url: str, response: VaultResponse) -> None:
        text = response.text
        body: Any = None
        errors = None
        if response.headers.get("Content-Type", "").startswith(JSON):
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                errors = body.get("errors")
        utils.raise_for_error(
            method,
            url,
            response.status_code,
            None if errors is not None else text,
            errors=errors,
            text=text,
            json=body,
        )


class _Placeholder:
    """Truthy enough for hvac's constructor, which reads verify/cert/proxies off it."""

    verify = None
    cert = None
    proxies = None


_NO_SESSION = _Placeholder()
