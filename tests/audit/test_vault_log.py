"""Parsing, joining and filtering Vault file audit logs.

The entries below have the exact shape OpenBao 2.7's file device writes
(checked against a live log); the end-to-end tests in `test_cli.py` run the
same code on the session OpenBao's real log.
"""

from __future__ import annotations

import gzip
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import vault_log
from broker.audit.vault_log import Filters, ReadStats

T0 = "2026-03-01T10:00:00.123456789Z"


def entry(
    kind: str,
    vault_id: str,
    path: str,
    *,
    when: str = T0,
    operation: str = "read",
    headers: dict[str, str] | None = None,
    error: str | None = None,
    allowed: bool = True,
    display_name: str = "approle",
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "id": vault_id,
        "operation": operation,
        "path": path,
        "remote_address": "10.0.0.5",
        "remote_port": 51234,
        "namespace": {"id": "root"},
    }
    if headers:
        request["headers"] = {name: [value] for name, value in headers.items()}
    if data is not None:
        request["data"] = data
    out: dict[str, Any] = {
        "time": when,
        "type": kind,
        "auth": {
            "client_token": "hmac-sha256:aa",
            "display_name": display_name,
            "policies": ["broker"],
            "policy_results": {"allowed": allowed},
        },
        "request": request,
    }
    if kind == "response":
        out["response"] = {"mount_point": "secret/", "data": {"version": 1}}
    if error is not None:
        out["error"] = error
    return out


def write_log(path: Path, entries: list[dict[str, Any] | str], *, gz: bool = False) -> Path:
    text = "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


BROKER = {
    "x-request-id": "req-1",
    "x-broker-actor": "user:alice",
    "x-broker-tenant": "acme",
    "x-broker-action": "integration.save",
}
KV = "secret/data/tenants/acme/integrations/shopify"


def test_request_and_response_are_joined_and_named(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "audit.log",
        [
            entry("request", "v1", KV, headers=BROKER, operation="create"),
            entry("response", "v1", KV, headers=BROKER, operation="create", when=T0[:-2] + "Z"),
        ],
    )
    [call] = vault_log.load([log])
    assert call.vault_request_id == "v1"
    assert call.broker_request_id == "req-1"
    assert call.actor == "user:alice"
    assert call.tenant == "acme"
    assert call.provider == "shopify"
    assert call.action == "integration.save"
    assert call.path == KV
    assert call.operation == "create"
    assert call.remote_address == "10.0.0.5"
    assert call.outcome == "allowed"
    assert call.allowed is True
    assert call.error is None
    assert call.time == datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert call.response_time is not None


def test_permission_denied_is_denied_and_other_errors_failed(tmp_path: Path) -> None:
    denied = "1 error occurred:\n\t* permission denied\n\n"
    cas = "1 error occurred:\n\t* check-and-set parameter did not match the current version\n\n"
    log = write_log(
        tmp_path / "audit.log",
        [
            entry("request", "d", KV, headers=BROKER, error=denied, allowed=False),
            entry("response", "d", KV, headers=BROKER, error=denied, allowed=False),
            entry("request", "f", KV, operation="create"),
            entry("response", "f", KV, operation="create", error=cas),
        ],
    )
    by_id = {call.vault_request_id: call for call in vault_log.load([log])}
    assert by_id["d"].outcome == "denied"
    assert by_id["d"].allowed is False
    assert by_id["d"].error == "permission denied"
    assert by_id["f"].outcome == "failed"
    assert by_id["f"].allowed is True
    assert by_id["f"].error == "check-and-set parameter did not match the current version"
    assert [c.vault_request_id for c in vault_log.load([log], Filters(denied=True))] == ["d"]


def test_a_request_without_response_is_reported_as_unknown(tmp_path: Path) -> None:
    log = write_log(tmp_path / "audit.log", [entry("request", "lonely", KV, headers=BROKER)])
    [call] = vault_log.load([log])
    assert call.outcome == "unknown"
    assert call.allowed is True  # the policy check passed; the answer was never logged
    denied_early = write_log(tmp_path / "denied.log", [entry("request", "x", KV, allowed=False)])
    [call] = vault_log.load([denied_early])
    assert call.outcome == "denied"


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "audit.log",
        [
            "not json at all",
            '{"truncated": ',
            "[1, 2, 3]",
            json.dumps({"type": "request"}),  # no request id
            "",
            "broker-prefix: " + json.dumps(entry("request", "p", KV)),  # device `prefix`
            entry("response", "p", KV),
        ],
    )
    stats = ReadStats()
    calls = vault_log.load([log], stats=stats)
    assert [c.vault_request_id for c in calls] == ["p"]
    assert calls[0].outcome == "allowed"
    assert stats.malformed == 4
    assert stats.files == 1


def test_gzipped_and_plain_files_are_read_in_order_and_joined_across(tmp_path: Path) -> None:
    older = write_log(
        tmp_path / "audit.log.1.gz", [entry("request", "split", KV, headers=BROKER)], gz=True
    )
    live = write_log(tmp_path / "audit.log", [entry("response", "split", KV, headers=BROKER)])
    [call] = vault_log.load([older, live])
    assert call.outcome == "allowed"
    assert call.actor == "user:alice"
    # gzip is recognised by content, not by name
    renamed = tmp_path / "audit.log.2"
    renamed.write_bytes(older.read_bytes())
    assert [e["type"] for e in vault_log.read_entries([renamed, live])] == ["request", "response"]


def test_a_truncated_gzip_keeps_what_was_readable(tmp_path: Path) -> None:
    lines = [entry("request", f"v{i}", KV) for i in range(200)]
    full = write_log(tmp_path / "full.gz", list(lines), gz=True)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) * 2 // 3])
    stats = ReadStats()
    read = list(vault_log.read_entries([cut], stats))
    assert 0 < len(read) < 200
    assert stats.truncated_files == [cut]


def test_headers_absent_tenant_and_provider_come_from_the_path(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "audit.log",
        [
            entry("response", "kv", "secret/data/tenants/acme-2/integrations/twilio"),
            entry("response", "pay", "secret/metadata/tenants/acme-2/payout"),
            entry("response", "tr", "transit/decrypt/tenant-acme-2", operation="update"),
            entry("response", "rot", "transit/keys/tenant-acme-2/rotate", operation="update"),
            entry("response", "sys", "sys/policies/acl/tenant-x"),
        ],
    )
    by_id = {c.vault_request_id: c for c in vault_log.load([log])}
    assert (by_id["kv"].tenant, by_id["kv"].provider) == ("acme-2", "twilio")
    assert (by_id["pay"].tenant, by_id["pay"].provider) == ("acme-2", "payout")
    assert (by_id["tr"].tenant, by_id["tr"].provider) == ("acme-2", None)
    assert by_id["rot"].tenant == "acme-2"
    assert by_id["sys"].tenant is None
    # Without broker headers the actor is the Vault token's display name.
    assert by_id["kv"].actor == "vault:approle"
    assert by_id["kv"].broker_request_id is None


def test_the_path_names_the_tenant_touched_even_if_the_caller_belongs_elsewhere(
    tmp_path: Path,
) -> None:
    headers = dict(BROKER, **{"x-broker-tenant": "other"})
    log = write_log(tmp_path / "audit.log", [entry("response", "x", KV, headers=headers)])
    [call] = vault_log.load([log])
    assert call.tenant == "acme"
    assert call.header_tenant == "other"
    # --tenant finds it under either name
    assert vault_log.load([log], Filters(tenant="acme"))
    assert vault_log.load([log], Filters(tenant="other"))
    assert not vault_log.load([log], Filters(tenant="third"))


def test_transit_calls_inherit_the_provider_of_their_broker_request(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "audit.log",
        [
            entry("response", "kv", KV, headers=BROKER),
            entry("response", "tr", "transit/decrypt/tenant-acme", headers=BROKER),
            entry(
                "response",
                "other",
                "transit/decrypt/tenant-acme",
                headers=dict(BROKER, **{"x-request-id": "req-2"}),
            ),
        ],
    )
    by_id = {c.vault_request_id: c for c in vault_log.load([log])}
    assert by_id["tr"].provider == "shopify"
    assert by_id["other"].provider is None
    only = vault_log.load([log], Filters(provider="shopify"))
    assert {c.vault_request_id for c in only} == {"kv", "tr"}


def test_filters_by_actor_and_time(tmp_path: Path) -> None:
    bob = dict(BROKER, **{"x-broker-actor": "service:bob", "x-request-id": "req-b"})
    log = write_log(
        tmp_path / "audit.log",
        [
            entry("response", "a", KV, headers=BROKER, when="2026-03-01T10:00:00Z"),
            entry("response", "b", KV, headers=bob, when="2026-03-02T10:00:00Z"),
        ],
    )

    def ids(**kwargs: Any) -> list[str]:
        return [c.vault_request_id for c in vault_log.load([log], Filters(**kwargs))]

    assert ids(actor="user:alice") == ["a"]
    assert ids(actor="alice") == ["a"]
    assert ids(actor="bob") == ["b"]
    assert ids(actor="user:bob") == []
    assert ids(since=datetime(2026, 3, 2, tzinfo=UTC)) == ["b"]
    assert ids(until=datetime(2026, 3, 2, tzinfo=UTC)) == ["a"]
    assert ids() == ["a", "b"]
    with pytest.raises(ValueError, match="aware"):
        Filters(since=datetime(2026, 3, 2))


def test_parse_when_accepts_iso_and_relative_forms() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    assert vault_log.parse_when("24h", now=now) == now - timedelta(hours=24)
    assert vault_log.parse_when("7d", now=now) == now - timedelta(days=7)
    assert vault_log.parse_when("30m", now=now) == now - timedelta(minutes=30)
    assert vault_log.parse_when("90s", now=now) == now - timedelta(seconds=90)
    assert vault_log.parse_when("2w", now=now) == now - timedelta(weeks=2)
    assert vault_log.parse_when("2026-03-01", now=now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert vault_log.parse_when("2026-03-01T10:00:00+02:00") == datetime(2026, 3, 1, 8, tzinfo=UTC)
    assert vault_log.parse_when("2026-03-01T10:00:00.123456789Z").microsecond == 123456
    for bad in ("yesterday", "24x", "", "-1h"):
        with pytest.raises(ValueError, match="not a time"):
            vault_log.parse_when(bad, now=now)


def test_default_paths_are_the_live_log_and_its_rotations_oldest_first(tmp_path: Path) -> None:
    vault_dir = tmp_path / "vault"
    vault_dir.mkdir()
    live = write_log(vault_dir / "audit.log", [])
    two = write_log(vault_dir / "audit.log.2.gz", [], gz=True)
    one = write_log(vault_dir / "audit.log.1", [])
    dated = write_log(vault_dir / "audit.log-20260101.gz", [], gz=True)
    write_log(vault_dir / "server.log", [])
    for age, path in enumerate((dated, two, one, live)):
        os.utime(path, (1_700_000_000 + age, 1_700_000_000 + age))
    assert vault_log.default_log_paths(tmp_path) == [dated, two, one, live]
    assert vault_log.default_log_paths(tmp_path / "nowhere") == []


def test_contains_text_selects_whole_calls(tmp_path: Path) -> None:
    marker = "hmac-sha256:feedface"
    log = write_log(
        tmp_path / "audit.log",
        [
            # Only the request carries the value (a write); the call is still whole.
            entry("request", "w", KV, operation="create", data={"data": {"k": marker}}),
            entry("response", "w", KV, operation="create"),
            entry("request", "r", KV),
            entry("response", "r", KV),
        ],
    )
    [call] = vault_log.load([log], where=vault_log.contains_text(marker))
    assert call.vault_request_id == "w"
    assert call.outcome == "allowed"


def test_a_client_address_header_is_read_when_the_gateway_stamps_one(tmp_path: Path) -> None:
    headers = dict(BROKER, **{"x-broker-client-addr": "203.0.113.9"})
    log = write_log(tmp_path / "audit.log", [entry("response", "x", KV, headers=headers)])
    [call] = vault_log.load([log])
    assert call.client_addr == "203.0.113.9"
    assert call.remote_address == "10.0.0.5"
