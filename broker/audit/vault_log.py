"""Reading Vault/OpenBao file audit logs: parse, join request to response, filter.

A file audit device writes one JSON object per line, a `request` entry when a
call arrives and a `response` entry when it is answered, both carrying the
same `request.id`. The broker stamps audited headers on every call it makes
(`x-request-id`, `x-broker-actor`, `x-broker-tenant`, `x-broker-action`; see
`broker.vault.gateway.AUDITED_HEADERS`), so each entry names the person or
service behind it and the broker request it served.

Everything here is lenient: a log may be rotated, gzipped, cut short by a
crash or interleaved with other lines. Lines that are not audit entries are
skipped and counted in `ReadStats`, never fatal.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from broker.audit.query import TrailQuery, in_window

Outcome = Literal["allowed", "denied", "failed", "unknown"]

# The audit device's HMAC prefix: values in `data`, tokens and accessors.
HMAC_PREFIX = "hmac-sha256:"
# The broker's caller's address, when the gateway stamps it as an audited header
# (read if present; otherwise the address comes from the broker's trail).
CLIENT_ADDR_HEADER = "x-broker-client-addr"

# KV v2: <mount>/<data|metadata|...>/tenants/<id>[/integrations/<provider>|/payout]
_KV_TENANT = re.compile(
    r"^[^/]+/(?:data|metadata|delete|undelete|destroy)/tenants/(?P<tenant>[^/]+)"
    r"(?:/(?:integrations/(?P<provider>[^/]+)|(?P<payout>payout)))?"
)
# Transit: <mount>/<operation>/tenant-<id>[/...]; the key is named after the tenant.
_TRANSIT_TENANT = re.compile(r"^[^/]+/(?:[^/]+/)+?tenant-(?P<tenant>[^/]+)(?:/|$)")
# Broker trail resources and API paths: tenants/<id>/integrations/<provider>, /v1/.../integrations/x
_RESOURCE_TENANT = re.compile(r"(?:^|/)tenants/(?P<tenant>[^/]+)")
_RESOURCE_PROVIDER = re.compile(r"(?:^|/)integrations/(?P<provider>[^/?]+)")
# Service delivery: /v1/credentials/<tenant>/<provider>
_RESOURCE_CREDENTIALS = re.compile(
    r"(?:^|/)credentials/(?P<tenant>[^/?]+)(?:/(?P<provider>[^/?]+))?"
)
# System paths that never carry tenant data, whatever their segments look like.
_SYSTEM_PREFIXES = ("sys/", "auth/", "identity/", "cubbyhole/")

_FRACTION = re.compile(r"(\.\d{6})\d+")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# -- reading ------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What reading the logs met: files, lines, and the lines that were skipped."""

    files: int = 0
    lines: int = 0
    malformed: int = 0
    truncated_files: list[Path] = field(default_factory=list)


def is_gzipped(path: Path) -> bool:
    """True when `path` starts with the gzip magic number (whatever its name says)."""
    try:
        with path.open("rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return path.suffix == ".gz"


def _lines(path: Path, stats: ReadStats) -> Iterator[str]:
    opener: Callable[[], Any]
    if is_gzipped(path):

        def opener() -> Any:
            return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    else:

        def opener() -> Any:
            return path.open("r", encoding="utf-8", errors="replace")

    with opener() as handle:
        try:
            yield from handle
        except (EOFError, gzip.BadGzipFile, zlib.error):
            # A rotated file cut short (copied while being compressed, disk full):
            # keep what was readable and say so.
            stats.truncated_files.append(path)


def read_entries(paths: Sequence[Path], stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every audit entry (a JSON object) in `paths`, plain or gzipped, in the order given.

    Lines that are not JSON objects are skipped and counted in `stats.malformed`.
    A file audit device's optional `prefix` before the JSON is tolerated.
    """
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        stats.files += 1
        for line in _lines(Path(path), stats):
            stats.lines += 1
            text = line.strip()
            if not text:
                stats.lines -= 1
                continue
            start = text.find("{")
            if start < 0:
                stats.malformed += 1
                continue
            try:
                entry = json.loads(text[start:])
            except ValueError:
                stats.malformed += 1
                continue
            if not isinstance(entry, dict):
                stats.malformed += 1
                continue
            yield entry


# -- parsing ------------------------------------------------------------------------------


def parse_time(value: object) -> datetime | None:
    """An aware UTC datetime from Vault's RFC 3339 timestamps (nanoseconds allowed)."""
    if not isinstance(value, str) or not value:
        return None
    text = _FRACTION.sub(r"\1", value.strip())
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_when(value: str, *, now: datetime | None = None) -> datetime:
    """An aware datetime from an ISO string or a relative form (`90s`, `15m`, `24h`, `7d`, `2w`).

    Relative forms count back from `now`. A date or time without a zone is UTC.
    Raises ValueError for anything else.
    """
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(value)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    if value.strip().lower() == "now":
        return now
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError(
            f"not a time: {value!r} (use ISO 8601, e.g. 2026-01-31T12:00:00Z, or 24h, 7d, 30m)"
        )
    return parsed


def tenant_and_provider(path: str) -> tuple[str | None, str | None]:
    """The tenant and provider a Vault path belongs to, when its shape says so.

    `secret/data/tenants/t1/integrations/shopify` gives ("t1", "shopify"),
    `secret/data/tenants/t1/payout` gives ("t1", "payout"), and
    `transit/decrypt/tenant-t1` gives ("t1", None): the Transit context that
    binds a ciphertext to its provider is HMAC'd in the log.
    """
    if path.startswith(_SYSTEM_PREFIXES):
        return None, None
    kv = _KV_TENANT.match(path)
    if kv:
        provider = kv.group("provider") or ("payout" if kv.group("payout") else None)
        return kv.group("tenant"), provider
    transit = _TRANSIT_TENANT.match(path)
    if transit:
        return transit.group("tenant"), None
    return None, None


def resource_tenant_and_provider(resource: str) -> tuple[str | None, str | None]:
    """The tenant and provider named in a broker trail resource or an API path."""
    credentials = _RESOURCE_CREDENTIALS.search(resource)
    if credentials:
        return credentials.group("tenant"), credentials.group("provider")
    tenant = _RESOURCE_TENANT.search(resource)
    provider = _RESOURCE_PROVIDER.search(resource)
    tenant_id = tenant.group("tenant") if tenant else None
    if tenant_id == "settings":  # /v1/tenants/settings/...: the caller's own tenant
        tenant_id = None
    return tenant_id, provider.group("provider") if provider else None


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value not in (None, "") else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def is_permission_denied(error: str | None) -> bool:
    """True for Vault's "permission denied" (a policy refusal or a bad token)."""
    return error is not None and "permission denied" in error.lower()


@dataclass(frozen=True)
class VaultAuditEntry:
    """One Vault call: its request joined to its response.

    `actor` is the `x-broker-actor` header, or `vault:<display name>` of the
    token for calls that did not come through the broker (an operator with a
    root token, say). `tenant` and `provider` come from the path when its shape
    names them (the data actually touched), otherwise from the headers.
    """

    time: datetime
    vault_request_id: str
    broker_request_id: str | None
    actor: str | None
    tenant: str | None
    provider: str | None
    action: str | None
    path: str
    operation: str | None
    remote_address: str | None
    allowed: bool
    error: str | None
    outcome: Outcome
    header_tenant: str | None = None
    vault_identity: str | None = None
    policies: tuple[str, ...] = ()
    response_time: datetime | None = None
    client_addr: str | None = None

    @property
    def denied(self) -> bool:
        """Refused by Vault's policies (or an invalid token)."""
        return self.outcome == "denied"


def _error_of(entry: Mapping[str, Any]) -> str | None:
    error = entry.get("error")
    if isinstance(error, str) and error.strip():
        # Vault wraps errors as "1 error occurred:\n\t* permission denied\n\n".
        lines = [part.strip(" \t*") for part in error.splitlines()]
        useful = [line for line in lines if line and not line.endswith("occurred:")]
        return "; ".join(useful) if useful else error.strip()
    return None


def _status_of(entry: Mapping[str, Any]) -> int | None:
    response = _mapping(entry.get("response"))
    for holder in (response, _mapping(response.get("data"))):
        for key in ("status_code", "http_status_code"):
            value = holder.get(key)
            if isinstance(value, int):
                return value
    return None


def _policy_allowed(entry: Mapping[str, Any]) -> bool | None:
    results = _mapping(_mapping(entry.get("auth")).get("policy_results"))
    allowed = results.get("allowed")
    return allowed if isinstance(allowed, bool) else None


def _outcome(
    request: Mapping[str, Any] | None, response: Mapping[str, Any] | None
) -> tuple[Outcome, str | None]:
    """How one call ended (allowed, denied, failed, unknown) and Vault's error, if any."""
    primary = response or request or {}
    error = _error_of(response) if response else None
    error = error or (_error_of(request) if request else None)
    status = _status_of(response) if response else None
    policy_allowed = _policy_allowed(primary)
    if request is not None and policy_allowed is None:
        policy_allowed = _policy_allowed(request)
    if (
        is_permission_denied(error)
        or policy_allowed is False
        or (status is not None and status in (401, 403))
    ):
        return "denied", error
    if response is None:
        return "unknown", error
    if error is not None or (status is not None and status >= 400):
        return "failed", error
    return "allowed", error


def _text(holder: Mapping[str, Any], key: str) -> str | None:
    value = holder.get(key)
    return value if isinstance(value, str) else None


def build_entry(
    request: Mapping[str, Any] | None, response: Mapping[str, Any] | None
) -> VaultAuditEntry | None:
    """Combine the request and response halves of one call (either may be missing)."""
    primary = response or request
    if primary is None:
        return None
    req = _mapping(primary.get("request"))
    vault_id, path = _text(req, "id"), _text(req, "path")
    when = parse_time((request or primary).get("time"))
    if vault_id is None or path is None or when is None:
        return None
    headers = _mapping(req.get("headers"))
    auth = _mapping(primary.get("auth"))
    outcome, error = _outcome(request, response)
    path_tenant, path_provider = tenant_and_provider(path)
    header_tenant = _header(headers, "x-broker-tenant")
    display_name = _text(auth, "display_name")
    actor = _header(headers, "x-broker-actor") or (
        f"vault:{display_name}" if display_name else None
    )
    policies = auth.get("policies")
    return VaultAuditEntry(
        time=when,
        vault_request_id=vault_id,
        broker_request_id=_header(headers, "x-request-id"),
        actor=actor,
        tenant=path_tenant or header_tenant,
        provider=path_provider,
        action=_header(headers, "x-broker-action"),
        path=path,
        operation=_text(req, "operation"),
        remote_address=_text(req, "remote_address"),
        allowed=outcome != "denied",
        error=error,
        outcome=outcome,
        header_tenant=header_tenant,
        vault_identity=display_name,
        policies=tuple(str(p) for p in policies) if isinstance(policies, list) else (),
        response_time=parse_time(response.get("time")) if response else None,
        client_addr=_header(headers, CLIENT_ADDR_HEADER),
    )


def join(
    entries: Iterable[Mapping[str, Any]],
    *,
    stats: ReadStats | None = None,
    where: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Iterator[VaultAuditEntry]:
    """Pair each request with its response by Vault's `request.id`.

    Calls are yielded as their responses arrive; requests that never got a
    response (cut-off log, crash) come last, with outcome "unknown". With
    `where`, only calls where the request or the response satisfies it are kept
    (the search behind `find-value`). Entries without a request id, path or time
    are counted as malformed.
    """
    stats = stats if stats is not None else ReadStats()
    pending: dict[str, tuple[Mapping[str, Any], bool]] = {}
    for raw in entries:
        kind = raw.get("type")
        vault_id = _text(_mapping(raw.get("request")), "id")
        if kind not in ("request", "response") or vault_id is None:
            stats.malformed += 1
            continue
        hit = where(raw) if where is not None else True
        if kind == "request":
            earlier = pending.pop(vault_id, None)
            if earlier is not None:  # a duplicate id: report the first one alone
                yield from _built(earlier[0], None, earlier[1], stats)
            pending[vault_id] = (raw, hit)
            continue
        request, request_hit = pending.pop(vault_id, (None, False))
        yield from _built(request, raw, hit or request_hit, stats)
    for request, request_hit in pending.values():
        yield from _built(request, None, request_hit, stats)


def _built(
    request: Mapping[str, Any] | None,
    response: Mapping[str, Any] | None,
    wanted: bool,
    stats: ReadStats,
) -> Iterator[VaultAuditEntry]:
    """The call, when it is wanted; a call that cannot be built is counted as malformed."""
    if not wanted:
        return
    built = build_entry(request, response)
    if built is None:
        stats.malformed += 1
        return
    yield built


def fill_providers(entries: Sequence[VaultAuditEntry]) -> list[VaultAuditEntry]:
    """Give calls without a provider the one provider their broker request touched.

    A broker request that reads `.../integrations/shopify` and then decrypts
    with `transit/decrypt/tenant-t1` concerns Shopify throughout, though only
    the KV path says so. Requests that touched several providers are left alone.
    """
    by_request: dict[tuple[str, str | None], set[str]] = {}
    for entry in entries:
        if entry.broker_request_id and entry.provider:
            key = (entry.broker_request_id, entry.tenant)
            by_request.setdefault(key, set()).add(entry.provider)
    out = []
    for entry in entries:
        if entry.provider is None and entry.broker_request_id:
            found = by_request.get((entry.broker_request_id, entry.tenant), set())
            if len(found) == 1:
                entry = replace(entry, provider=next(iter(found)))
        out.append(entry)
    return out


# -- filtering ----------------------------------------------------------------------------


def actor_matches(wanted: str, actor: str | None) -> bool:
    """`user:alice` matches itself; a bare `alice` matches `user:alice` and `service:alice`."""
    if actor is None:
        return False
    if wanted == actor:
        return True
    return ":" not in wanted and actor.split(":", 1)[-1] == wanted


@dataclass(frozen=True)
class Filters:
    """The report's filters; every one that is set must match."""

    tenant: str | None = None
    actor: str | None = None
    provider: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    denied: bool = False

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime")

    def time_ok(self, when: datetime) -> bool:
        """Inside `[since, until)`, the window the broker's trail is queried with."""
        return in_window(when, self.since, self.until)

    def trail_query(self) -> TrailQuery:
        """The same filters as a query over the broker's trail."""
        return TrailQuery(
            tenant=self.tenant,
            actor=self.actor,
            provider=self.provider,
            outcome="denied" if self.denied else None,
            since=self.since,
            until=self.until,
        )

    def matches(self, entry: VaultAuditEntry) -> bool:
        """True when the Vault call passes every filter.

        The tenant filter matches the tenant whose data was touched (from the
        path) or the caller's own tenant (the `x-broker-tenant` header), so it
        errs towards showing more.
        """
        if not self.time_ok(entry.time):
            return False
        if self.tenant is not None and self.tenant not in (entry.tenant, entry.header_tenant):
            return False
        if self.actor is not None and not actor_matches(self.actor, entry.actor):
            return False
        if self.provider is not None and entry.provider != self.provider:
            return False
        return not (self.denied and not entry.denied)


def load(
    paths: Sequence[Path],
    filters: Filters | None = None,
    *,
    stats: ReadStats | None = None,
    where: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[VaultAuditEntry]:
    """Read, join and filter the logs; the result is sorted by time."""
    filters = filters or Filters()
    stats = stats if stats is not None else ReadStats()
    # Time, tenant and actor are shared by every call of one broker request, so
    # they can thin the stream early. Provider and outcome wait until providers
    # are filled in, so --provider also finds the Transit calls of a request
    # that read that provider's credentials.
    early = replace(filters, provider=None, denied=False)
    joined = fill_providers(
        [
            entry
            for entry in join(read_entries(paths, stats), stats=stats, where=where)
            if early.matches(entry)
        ]
    )
    matched = [entry for entry in joined if filters.matches(entry)]
    matched.sort(key=lambda entry: (entry.time, entry.vault_request_id))
    return matched


def contains_text(needle: str) -> Callable[[Mapping[str, Any]], bool]:
    """A `where` predicate: the entry's JSON contains `needle` anywhere."""

    def check(raw: Mapping[str, Any]) -> bool:
        return needle in json.dumps(raw, ensure_ascii=False)

    return check


# -- default locations --------------------------------------------------------------------


def default_log_paths(data_dir: Path) -> list[Path]:
    """`<data_dir>/vault/audit.log` and its rotated siblings, oldest first."""
    live = data_dir / "vault" / "audit.log"
    return with_rotated(live)


def with_rotated(live: Path) -> list[Path]:
    """`live` plus its rotated copies (`audit.log.1`, `audit.log.2.gz`, `audit.log-20260101.gz`).

    Rotated copies come first, oldest by modification time first; the live file last.
    """
    siblings = [
        path
        for pattern in (f"{live.name}.*", f"{live.name}-*")
        for path in live.parent.glob(pattern)
        if path.is_file()
    ]
    siblings = sorted(set(siblings), key=lambda p: (p.stat().st_mtime, p.name))
    return [*siblings, *([live] if live.is_file() else [])]
