"""The shape of a tenant id, in one place.

A tenant id names Vault paths and a Transit key (`tenant-<id>`), so it is a
conservative slug: lowercase ASCII letters, digits and inner hyphens, at most 63
characters. The API validates new tenants with it, the audit trail uses it to tell
a tenant id from a pasted value, and the legacy migration to refuse rows it cannot map.
"""

from __future__ import annotations

import re

# Anchored, for pydantic and FastAPI, whose `pattern` searches rather than matches.
TENANT_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
TENANT_ID = re.compile(TENANT_ID_PATTERN, re.ASCII)
