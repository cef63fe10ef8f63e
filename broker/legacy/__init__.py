"""Migration from the legacy application: Twilio columns into Vault, metadata into settings.

`broker migrate legacy` (see `broker.legacy.cli`) drives `migrate_legacy` and
`finalize_legacy` (`broker.legacy.migrate`) over a `LegacySource`
(`broker.legacy.source`), the only reader of the legacy table the broker ships.
"""

from broker.legacy.migrate import (
    FinalizeReport,
    MigrationReport,
    TenantOutcome,
    finalize_legacy,
    migrate_legacy,
    normalise_tenant_id,
)
from broker.legacy.source import LegacyColumns, LegacyColumnsRetired, LegacySource, LegacyTable

__all__ = [
    "FinalizeReport",
    "LegacyColumns",
    "LegacyColumnsRetired",
    "LegacySource",
    "LegacyTable",
    "MigrationReport",
    "TenantOutcome",
    "finalize_legacy",
    "migrate_legacy",
    "normalise_tenant_id",
]
