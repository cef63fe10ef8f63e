"""The console's sections, and who sees each: the scopes of the API routes behind it.

New pages join here: one more `Section`, with the scopes of their API alias, a router in
`broker/console/` and a template under `templates/<section>/`, as the live leases (issue
15) and the access report (issue 16) did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.audit.routes import TenantAdmin as AccessReportReader
from broker.console.access import Visitor
from broker.integrations.routes import Viewer as IntegrationsViewer
from broker.leases.routes import Viewer as LeasesViewer
from broker.payments.routes import FinanceViewer
from broker.settings.routes import SettingsReader


@dataclass(frozen=True)
class Section:
    """One entry of the navigation: a title, where it lives, and the API alias it shares."""

    title: str
    path: str
    alias: Any
    summary: str


SECTIONS = (
    Section("Settings", "/console/settings", SettingsReader, "Notifications, hours, branding…"),
    Section(
        "Integrations",
        "/console/integrations",
        IntegrationsViewer,
        "Connect your shop, WhatsApp and AI providers",
    ),
    Section(
        "Leases",
        "/console/leases",
        LeasesViewer,
        "Keys minted for your services (Twilio, OpenAI), and revoking them",
    ),
    Section("Payments", "/console/payments", FinanceViewer, "Cards on file and payouts"),
    Section("Access report", "/console/access", AccessReportReader, "Who read your credentials"),
)


def visible(visitor: Visitor | None) -> list[Section]:
    """The sections this user may open; none before sign-in."""
    if visitor is None:
        return []
    return [section for section in SECTIONS if visitor.may(section.alias)]
