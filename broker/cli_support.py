"""What every `broker` command group shares: configuration, the database URL, the operator.

Each group (`broker keys`, `broker audit`, `broker leases`, `broker shopify`,
`broker credentials`, `broker migrate`) loads its settings, checks the database
URL and names the person running it through these functions, so the messages,
the exit codes and the operator's identity are the same everywhere.
"""

from __future__ import annotations

import getpass
import uuid

import typer
from pydantic import ValidationError

from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core import context
from broker.core.config import ConfigurationError, Settings, get_settings

EXIT_USAGE = 2
"""Bad usage or configuration: nothing was done."""
EXIT_FAILED = 1
"""The command ran and failed."""

OPERATOR_SCOPES = frozenset({Scope.PLATFORM_ADMIN.value})
"""What the person at the command line acts with: the platform's scope, nothing inside a tenant.

Whoever runs `broker` holds the broker's Vault and database credentials, i.e. acts
as the platform (tenant lifecycle, keys, leases, migrations). `tenant:admin` is a
tenant's own administrator: granting it here would make a CLI action read like a
tenant's in any check or record that looks at scopes. No service checks scopes
(routes do, through `require`), so the CLI loses nothing by not holding it.
"""


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def describe_invalid(exc: ValidationError) -> str:
    """A configuration error in one line, naming the variables, never quoting their values."""
    problems = "; ".join(
        f"BROKER_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
    )
    return f"invalid configuration: {problems}"


def load_settings() -> Settings:
    """The configuration, or exit 2 with one line saying what is wrong with it."""
    try:
        return get_settings()
    except ConfigurationError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except ValidationError as exc:
        raise fail(describe_invalid(exc), EXIT_USAGE) from None


def database_url(settings: Settings) -> str:
    """The configured database URL, or exit 2 when there is none."""
    url = configured_database_url(settings)
    if url is None:
        raise fail("BROKER_DATABASE_URL is not set", EXIT_USAGE)
    return url


def configured_database_url(settings: Settings) -> str | None:
    """The configured database URL, if any (for commands that can do without it)."""
    return settings.database_url.get_secret_value() if settings.database_url else None


def operator_principal(*, subject_prefix: str = "cli", tenant_id: str | None = None) -> Principal:
    """The person running the command: `user:<prefix>:<login name>` with OPERATOR_SCOPES."""
    return Principal(
        subject=f"{subject_prefix}:{getpass.getuser()}",
        kind="user",
        scopes=OPERATOR_SCOPES,
        tenant_id=tenant_id,
    )


def bind_operator(principal: Principal, *, action: str | None = None) -> None:
    """Name `principal` on this command's calls: Vault's audit log and the trail show it."""
    context.bind(
        context.RequestContext(
            request_id=f"cli-{uuid.uuid4()}", actor=principal.actor, action=action
        )
    )


def operator(*, action: str | None = None) -> Principal:
    """The operator, bound as the actor of this command's calls."""
    principal = operator_principal()
    bind_operator(principal, action=action)
    return principal
