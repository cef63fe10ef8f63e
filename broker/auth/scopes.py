"""The scopes a token can carry, and what tenant:admin implies."""

from __future__ import annotations

from enum import StrEnum


class Scope(StrEnum):
    """OAuth-style scopes. A token lists them space-separated in its `scope` claim."""

    INTEGRATIONS_VIEW = "integrations:view"
    INTEGRATIONS_MANAGE = "integrations:manage"
    FINANCE_VIEW = "finance:view"
    FINANCE_MANAGE = "finance:manage"
    TENANT_ADMIN = "tenant:admin"
    CREDENTIALS_READ = "credentials:read"
    AUDIT_READ = "audit:read"
    PLATFORM_ADMIN = "platform:admin"
    LEASES_REVOKE = "leases:revoke"


KNOWN_SCOPES = frozenset(scope.value for scope in Scope)

# Shown next to each scope in the OpenAPI document.
SCOPE_DESCRIPTIONS = {
    Scope.INTEGRATIONS_VIEW.value: "See the tenant's integrations and settings (hints only)",
    Scope.INTEGRATIONS_MANAGE.value: "Store, test and remove integration credentials; settings",
    Scope.FINANCE_VIEW.value: "See the tenant's cards (references) and payout destination",
    Scope.FINANCE_MANAGE.value: "Add and remove cards, set the default, set payout details",
    Scope.TENANT_ADMIN.value: "Everything inside the tenant (integrations and finance)",
    Scope.CREDENTIALS_READ.value: "A service fetching the tenant's plain credentials",
    Scope.AUDIT_READ.value: "Read the audit trail (the security team)",
    Scope.PLATFORM_ADMIN.value: "Create, delete and re-key tenants (the platform)",
    Scope.LEASES_REVOKE.value: "Revoke a service's dynamic keys across tenants (incidents)",
}

# tenant:admin implies every scope that acts inside its own tenant. It does not
# imply the service scope (credentials:read), the security team's (audit:read)
# or the platform's (platform:admin): those belong to other kinds of callers.
TENANT_ADMIN_IMPLIES = frozenset(
    {
        Scope.INTEGRATIONS_VIEW,
        Scope.INTEGRATIONS_MANAGE,
        Scope.FINANCE_VIEW,
        Scope.FINANCE_MANAGE,
    }
)


def effective_scopes(granted: frozenset[str]) -> frozenset[str]:
    """The granted scopes plus what tenant:admin implies."""
    if Scope.TENANT_ADMIN in granted:
        return granted | TENANT_ADMIN_IMPLIES
    return granted
