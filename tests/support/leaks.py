"""Scanning for planted secrets: a database dump, logs, responses and Vault's audit log must
not hold them, in plaintext or base64."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from tests.support.apps import VaultEndpoint


def pg_dump(database_url: str) -> str:
    """A plain-text dump of the whole database (tables, queue, audit trail)."""
    url = make_url(database_url)
    binary = shutil.which("pg_dump")
    try:
        import pgserver  # noqa: F401 - only to locate its bundled binaries

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
        binary = str(bundled) if bundled.exists() else binary
    except ImportError:
        pass
    assert binary, "pg_dump is needed to scan the database"
    env = dict(os.environ, PGPASSWORD=url.password or "")
    args = [binary, "--no-owner", "-d", url.database or "", "-U", url.username or "postgres"]
    host = url.query.get("host") or url.host
    if host:
        args += ["-h", str(host)]
    if url.port:
        args += ["-p", str(url.port)]
    return subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout


def with_vault_audit_log(haystacks: dict[str, str], vault: VaultEndpoint) -> dict[str, str]:
    """`haystacks`, plus Vault's audit log where the session's Vault writes one."""
    if vault.audit_log is not None:
        return haystacks | {"vault audit log": vault.audit_log.read_text()}
    return haystacks


def assert_absent(
    haystacks: dict[str, str],
    values: Iterable[str],
    message: str = "a planted secret appears in the {where}",
) -> None:
    """None of `values` appears in any haystack, as it is or base64-encoded."""
    forms = [(v, base64.b64encode(v.encode()).decode()) for v in values]
    for where, text in haystacks.items():
        for value in forms:
            for form in value:
                assert form not in text, message.format(where=where)


def assert_served_only_to_fetches(
    responses: list[httpx.Response],
    fetch_path: str,
    *,
    never: list[str],
    served: list[str],
    logs: str,
    database: str,
    vault: VaultEndpoint,
) -> None:
    """`never` appears nowhere; `served` (tokens a service is given) only in the answers to
    `fetch_path`. The logs and the dump must have been there to scan."""
    fetches = "\n".join(f"{r.headers}\n{r.text}" for r in responses)
    others = "\n".join(
        f"{r.headers}\n{r.text}" for r in responses if r.request.url.path != fetch_path
    )
    haystacks = with_vault_audit_log(
        {"responses": others, "logs": logs, "database": database}, vault
    )
    assert_absent(haystacks, [*never, *served])
    assert_absent({"fetch responses": fetches}, never)
    assert logs, "the scan must have seen some logs"
