"""Migration from the legacy application: Twilio columns into Vault, metadata into settings.

`broker migrate legacy` (see `broker.legacy.cli`) drives `migrate_legacy` and
`finalize_legacy` (`broker.legacy.migrate`) over a `LegacySource`
(`broker.legacy.source`), the only reader of the legacy table the broker ships.
"""

# Here, not in `runner`: `broker migrate legacy --help` shows them without importing
# the migration (SQLAlchemy, the models, Vault).
DEFAULT_WORKERS = 4
"""Tenants in flight at once: each waits mostly on Vault and PostgreSQL round trips."""
DEFAULT_BATCH = 500
"""Tenants per batch. Each step of a batch takes all of its tenants at once, so larger
batches wait less at the steps' ends: measured on 2 cores, 250 to 500 migrate about 40%
faster than 100. A run that stops leaves at most one batch to settle on the rerun."""
