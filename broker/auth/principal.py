"""The authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.auth.scopes import effective_scopes

PrincipalKind = Literal["user", "service"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: subject, kind, home tenant, scopes, and (for services) tenants served."""

    subject: str
    kind: PrincipalKind
    scopes: frozenset[str]
    tenant_id: str | None = None
    tenants: frozenset[str] = frozenset()
    token_id: str | None = None

    def has(self, scope: str) -> bool:
        """True when the scope is granted directly or implied by tenant:admin."""
        return scope in effective_scopes(self.scopes)

    def may_serve(self, tenant_id: str) -> bool:
        """True when a service token lists `tenant_id` among the tenants it serves."""
        return self.kind == "service" and tenant_id in self.tenants

    @property
    def actor(self) -> str:
        """How the caller is named in audit records: `user:alice`, `service:catalog-sync`."""
        return f"{self.kind}:{self.subject}"
